"""Regenerate models/exports/: small models with the graph shapes of real held-out exports.

Torch exports (this interpreter: torch, transformers, onnx, onnxruntime):
  vad_silero_like   Silero-VAD-like: fixed STFT Conv1d basis, conv encoder, LSTM reached
                    through If branches chosen by `sr`, state [2, N, 128] (torch.jit.script +
                    the legacy exporter, opset 16)
  crepe_like        CREPE-like pitch model: Pads computed from constants only, a wide 64-tap
                    conv over 128 channels (legacy exporter, opset 13, no constant folding)
  yolov8_like       YOLOv8-structured detector: C2f, SPPF, FPN/PAN, Detect head with DFL
                    (legacy exporter, opset 17, batch 1 and 32x32 fixed, as ultralytics does)
  bert_tiny         transformers' BertModel from a small config (legacy exporter, opset 17)

Then, unless --torch-only, it runs the other two exporters in their own interpreters:
  exports_tf.py      (--tf-python):     magika_like, real tensorflow + tf2onnx
  exports_paddle.py  (--paddle-python): paddle_ocr_rec, paddle_cls, real paddle2onnx

Every model has <name>_calib.npz and <name>_val.npz beside it. Weights are random or trained
for a few seconds on synthetic data (nothing can be downloaded). Seeds are fixed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exports_common import OUT, finish, save_data

HERE = Path(__file__).resolve().parent
SR = 16000


def _export(module: nn.Module, args: tuple, path: Path, **kwargs) -> None:
    """The legacy (TorchScript) exporter, quietly; the module stays in eval mode after."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
    module.eval()


def _load(path: Path):
    import onnx

    model = onnx.load(str(path))
    path.unlink()
    return model


# -- 1. Silero-VAD-like ------------------------------------------------------------------------
N_FFT, HOP, CHUNK, HIDDEN = 128, 64, 512, 128


def stft_basis(n_fft: int) -> torch.Tensor:
    """Hann-windowed DFT rows, cos then -sin: [2 * (n_fft // 2 + 1), 1, n_fft]."""
    bins = n_fft // 2 + 1
    t = torch.arange(n_fft, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * torch.pi * t / n_fft)
    angle = 2 * torch.pi * torch.outer(torch.arange(bins, dtype=torch.float64), t) / n_fft
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    return basis[:, None, :].float()


class SileroLike(nn.Module):
    """STFT as a Conv1d with a fixed basis (stride = hop), magnitude, a conv encoder, one LSTM
    step sequence over the frames carrying (h, c) in `state` [2, N, 128], a 1x1 conv decoder and
    a sigmoid averaged over frames. `sr` picks a branch: 16 kHz as is, 8 kHz every other sample
    with half the hop, any other rate zeros. Scripted, so the branches export as If nodes that
    share the weights stored once in the main graph."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("forward_basis_buffer", stft_basis(N_FFT))
        bins = N_FFT // 2 + 1
        self.encoder = nn.Sequential(
            nn.Conv1d(bins, 64, 3, padding=1), nn.ReLU(),
            nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv1d(64, HIDDEN, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.rnn = nn.LSTM(HIDDEN, HIDDEN)
        self.decoder = nn.Conv1d(HIDDEN, 1, 1)
        self.n_fft, self.hop = N_FFT, HOP  # attributes: TorchScript reads no globals

    def run(self, x: torch.Tensor, state: torch.Tensor, hop: int):
        x = F.pad(x.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = F.conv1d(x, self.forward_basis_buffer, stride=hop)
        bins = self.n_fft // 2 + 1
        re, im = spec[:, :bins], spec[:, bins:]
        h = self.encoder(torch.sqrt(re * re + im * im + 1e-9))
        y, (hn, cn) = self.rnn(h.permute(2, 0, 1), (state[0:1], state[1:2]))
        prob = torch.sigmoid(self.decoder(torch.relu(y).permute(1, 2, 0))).mean(2)
        return prob, torch.cat([hn, cn], 0)

    def forward(self, x: torch.Tensor, sr: torch.Tensor, state: torch.Tensor):
        if sr == 16000:
            return self.run(x, state, self.hop)
        elif sr == 8000:
            return self.run(x[:, ::2], state, self.hop // 2)
        else:
            return torch.zeros(x.shape[0], 1), torch.zeros_like(state)


def _voice_clips(rng: np.random.Generator, n: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """n clips of `chunks` x 512 samples at 16 kHz, half voiced: harmonic stacks with a gliding
    f0 of 80-300 Hz under a syllable-rate envelope, in noise; half noise alone (white or brown)
    or near silence. Labels per clip."""
    length = chunks * CHUNK
    t = np.arange(length) / SR
    clips, labels = np.zeros((n, length), np.float32), np.zeros(n, np.float32)
    for i in range(n):
        noise = rng.standard_normal(length)
        if rng.random() < 0.5:
            noise = np.cumsum(noise)
            noise /= np.abs(noise).max() + 1e-9
        level = 10 ** rng.uniform(-3, -1)
        sig = level * noise
        if i % 2 == 0:
            f0 = rng.uniform(80, 300) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
            phase = 2 * np.pi * np.cumsum(f0) / SR
            voice = sum(np.sin(k * phase) / k for k in range(1, 12))
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
            sig = sig + 10 ** rng.uniform(-1.5, -0.5) * voice * envelope
            labels[i] = 1
        clips[i] = sig
    return clips, labels


def _vad_streams(model: SileroLike, clips: np.ndarray) -> dict[str, np.ndarray]:
    """Chunks of each clip with the state the model carries into them: input [M, 512], sr,
    state [2, M, 128]."""
    n, length = clips.shape
    chunks = length // CHUNK
    state = torch.zeros(2, n, HIDDEN)
    inputs, states = [], []
    with torch.no_grad():
        for k in range(chunks):
            x = torch.from_numpy(clips[:, k * CHUNK : (k + 1) * CHUNK])
            inputs.append(x.numpy())
            states.append(state.numpy())
            _, state = model.run(x, state, HOP)
    return {
        "input": np.concatenate(inputs).astype(np.float32),
        "sr": np.array(SR, np.int64),
        "state": np.concatenate(states, axis=1).astype(np.float32),
    }


def make_vad() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SileroLike()
    opt = torch.optim.Adam([p for n, p in model.named_parameters()], lr=3e-3)
    for _ in range(150):
        clips, labels = _voice_clips(rng, 32, 2)
        state = torch.zeros(2, 32, HIDDEN)
        loss = 0.0
        for k in range(2):
            x = torch.from_numpy(clips[:, k * CHUNK : (k + 1) * CHUNK])
            prob, state = model.run(x, state, HOP)
            loss = loss + F.binary_cross_entropy(prob[:, 0].clamp(1e-6, 1 - 1e-6),
                                                 torch.from_numpy(labels))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = _vad_streams(model, _voice_clips(np.random.default_rng(1), 16, 2)[0])
    val = _vad_streams(model, _voice_clips(np.random.default_rng(2), 16, 2)[0])
    x = torch.from_numpy(val["input"][:4])
    state = torch.from_numpy(val["state"][:, :4])
    with torch.no_grad():
        expected = [t.numpy() for t in model(x, torch.tensor(SR), state)]
    scripted = torch.jit.script(model)
    tmp = OUT / "vad.tmp.onnx"
    _export(scripted, (x, torch.tensor(SR), state), tmp, opset_version=16,
            input_names=["input", "sr", "state"], output_names=["output", "stateN"],
            dynamic_axes={"input": {0: "N"}, "state": {1: "N"}, "output": {0: "N"},
                          "stateN": {1: "N"}})  # fmt: skip
    proto = _load(tmp)
    feeds = {"input": val["input"][:4], "sr": np.array(SR, np.int64), "state": val["state"][:, :4]}
    finish(proto, "vad_silero_like", feeds, expected)
    save_data("vad_silero_like", "calib", calib)
    save_data("vad_silero_like", "val", val)


# -- 4. CREPE-like -----------------------------------------------------------------------------
FRAME, PITCH_BINS = 1024, 36


class CrepeLike(nn.Module):
    """CREPE's layout at a small capacity: the 1024-sample frame as [N, 1, 1024, 1]; conv1 with
    128 filters of 128 taps, stride 4; conv2 reads those 128 channels through a 64-tap kernel;
    two more 64-tap convs; each conv preceded by 'same' zero padding and followed by ReLU,
    BatchNorm and a 2x1 MaxPool; a Linear to 36 pitch bins and a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        spec = [(1, 128, 128, 4), (128, 16, 64, 1), (16, 16, 64, 1), (16, 16, 64, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, (k, 1), stride=(s, 1)) for i, o, k, s in spec)
        self.norms = nn.ModuleList(nn.BatchNorm2d(o) for _, o, _, _ in spec)
        self.kernels = [k for _, _, k, _ in spec]
        self.classifier = nn.Linear(16 * 16, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames[:, None, :, None]
        for conv, norm, k in zip(self.convs, self.norms, self.kernels, strict=True):
            x = F.pad(x, (0, 0, (k - 1) // 2, k // 2))
            x = F.max_pool2d(norm(torch.relu(conv(x))), (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)
        return torch.sigmoid(self.classifier(x))


def _pitched_frames(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames of harmonic tones whose f0 sits in one of 36 bins, 6 per octave from 55 Hz."""
    labels = rng.integers(0, PITCH_BINS, n)
    t = np.arange(FRAME) / SR
    frames = np.zeros((n, FRAME), np.float32)
    for i, b in enumerate(labels):
        f0 = 55 * 2 ** ((b + rng.uniform(-0.3, 0.3)) / 6)
        phase = rng.uniform(0, 2 * np.pi)
        amps = rng.uniform(0, 1, 5) ** 2
        amps[0] = 1
        wave = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t + phase) for k, a in enumerate(amps))
        frames[i] = wave / np.abs(wave).max() + 0.02 * rng.standard_normal(FRAME)
    return frames, labels.astype(np.int64)


def make_crepe() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(10)
    model = CrepeLike()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(120):
        x, y = _pitched_frames(rng, 32)
        target = F.one_hot(torch.from_numpy(y), PITCH_BINS).float()
        loss = F.binary_cross_entropy(model(torch.from_numpy(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cx, _ = _pitched_frames(np.random.default_rng(11), 32)
    vx, vy = _pitched_frames(np.random.default_rng(12), 32)
    with torch.no_grad():
        expected = model(torch.from_numpy(vx[:4])).numpy()
        accuracy = float((model(torch.from_numpy(vx)).argmax(1).numpy() == vy).mean())
    print(f"crepe_like: torch accuracy on val {accuracy:.3f}")
    tmp = OUT / "crepe.tmp.onnx"
    # no constant folding: the Pad amounts stay a chain from Shape of a constant, as in the
    # CREPE exports this imitates
    _export(model, (torch.from_numpy(vx[:4]),), tmp, opset_version=13, do_constant_folding=False,
            input_names=["frames"], output_names=["pitch"],
            dynamic_axes={"frames": {0: "N"}, "pitch": {0: "N"}})  # fmt: skip
    finish(_load(tmp), "crepe_like", {"frames": vx[:4]}, [expected])
    save_data("crepe_like", "calib", {"frames": cx})
    save_data("crepe_like", "val", {"frames": vx, "labels": vy})


# -- 5. YOLOv8-like ----------------------------------------------------------------------------
IMG, NC, REG_MAX = 32, 4, 8


class ConvBnSilu(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnSilu(c, c, 3), ConvBnSilu(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, chunk in two halves, the last half through n bottlenecks, all Concat-ed, 1x1."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBnSilu(c_in, 2 * self.c)
        self.cv2 = ConvBnSilu((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBnSilu(c_in, c_in // 2), ConvBnSilu(c_in * 2, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(F.max_pool2d(y[-1], 5, 1, 2) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Per level a box branch (to 4 * reg_max) and a class branch (to nc), Concat-ed; levels
    flattened and Concat-ed; DFL (softmax over bins, a fixed 1x1 conv with weights 0..reg_max-1),
    distances to xywh boxes with the anchors, times the strides; sigmoid classes; Concat."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__()
        c2, c3 = max(16, channels[0] // 4, REG_MAX * 4), max(channels[0], NC)
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBnSilu(c, c2, 3), ConvBnSilu(c2, c2, 3),
                                               nn.Conv2d(c2, 4 * REG_MAX, 1)) for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBnSilu(c, c3, 3), ConvBnSilu(c3, c3, 3),
                                               nn.Conv2d(c3, NC, 1)) for c in channels)
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float).view(1, REG_MAX, 1, 1)
        anchors, stride_rows = [], []
        for s in strides:
            side = IMG // s
            sy, sx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5,
                                    indexing="ij")  # fmt: skip
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            stride_rows.append(torch.full((side * side, 1), float(s)))
        self.register_buffer("anchors", torch.cat(anchors).T.unsqueeze(0))
        self.register_buffer("strides", torch.cat(stride_rows).T.unsqueeze(0))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        no = 4 * REG_MAX + NC
        x = [torch.cat((b(f), c(f)), 1) for f, b, c in zip(feats, self.cv2, self.cv3, strict=True)]
        x = torch.cat([xi.view(feats[0].shape[0], no, -1) for xi in x], 2)
        box, cls = x.split((4 * REG_MAX, NC), 1)
        b, _, a = box.shape
        dist = self.dfl(box.view(b, 4, REG_MAX, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class YoloLike(nn.Module):
    """YOLOv8's backbone, neck and head at widths 8/16/32/32 (n=1 bottleneck per C2f)."""

    def __init__(self) -> None:
        super().__init__()
        w = (8, 16, 32, 32)
        self.b0, self.b1 = ConvBnSilu(3, w[0], 3, 2), ConvBnSilu(w[0], w[1], 3, 2)
        self.b2 = C2f(w[1], w[1], 1, True)
        self.b3, self.b4 = ConvBnSilu(w[1], w[2], 3, 2), C2f(w[2], w[2], 1, True)  # P3/8
        self.b5, self.b6 = ConvBnSilu(w[2], w[3], 3, 2), C2f(w[3], w[3], 1, True)  # P4/16
        self.b7, self.b8 = ConvBnSilu(w[3], w[3], 3, 2), C2f(w[3], w[3], 1, True)  # P5/32
        self.sppf = SPPF(w[3], w[3])
        self.h12 = C2f(w[3] + w[3], w[3])
        self.h15 = C2f(w[3] + w[2], w[2])
        self.h16, self.h18 = ConvBnSilu(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.h19, self.h21 = ConvBnSilu(w[3], w[3], 3, 2), C2f(w[3] + w[3], w[3])
        self.detect = Detect((w[2], w[3], w[3]), (8, 16, 32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(images)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.sppf(self.b8(self.b7(p4)))
        up = F.interpolate(p5, scale_factor=2.0, mode="nearest")
        n4 = self.h12(torch.cat([up, p4], 1))
        up = F.interpolate(n4, scale_factor=2.0, mode="nearest")
        o3 = self.h15(torch.cat([up, p3], 1))
        o4 = self.h18(torch.cat([self.h16(o3), n4], 1))
        o5 = self.h21(torch.cat([self.h19(o4), p5], 1))
        return self.detect([o3, o4, o5])


def _shapes_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB in [0, 1]: a textured background with 1-3 filled squares or discs, and the
    training targets per anchor [n, 4 + NC, 21]: the box (centre x, y, width, height in pixels)
    and class (square or disc, dark or bright) of the object centred in each anchor's cell at
    every level, zeros elsewhere."""
    images = np.empty((n, 3, IMG, IMG), np.float32)
    targets = np.zeros((n, 4 + NC, 21), np.float32)
    cells = [(s, IMG // s) for s in (8, 16, 32)]
    yy, xx = np.mgrid[:IMG, :IMG]
    for i in range(n):
        img = rng.uniform(0.2, 0.6, (3, 1, 1)) + 0.05 * rng.standard_normal((3, IMG, IMG))
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(4, 28), rng.integers(4, 28), rng.integers(2, 8)
            disc = rng.random() < 0.5
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if disc else (
                (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r))  # fmt: skip
            colour = rng.uniform(0, 1, (3, 1))
            img[:, mask] = colour
            cls = 2 * int(disc) + int(colour.mean() > 0.5)
            offset = 0
            for stride, side in cells:
                a = offset + (cy // stride) * side + cx // stride
                targets[i, :4, a] = [cx + 0.5, cy + 0.5, 2 * r, 2 * r]
                targets[i, 4:, a] = 0
                targets[i, 4 + cls, a] = 1
                offset += side * side
        images[i] = np.clip(img, 0, 1)
    return images, targets


def make_yolo() -> None:
    torch.manual_seed(0)
    model = YoloLike()
    rng = np.random.default_rng(20)
    # a short training run (class scores by BCE, boxes by L1 where an object is), so that the
    # outputs depend on the image as a detector's do: a random detector's barely do
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        x, t = (torch.from_numpy(a) for a in _shapes_images(rng, 32))
        out = model(x)
        positive = t[:, 4:].sum(1, keepdim=True) > 0
        loss = F.binary_cross_entropy(out[:, 4:].clamp(1e-6, 1 - 1e-6), t[:, 4:])
        loss = loss + ((out[:, :4] - t[:, :4]).abs() * positive).sum() / positive.sum() / IMG
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib, _ = _shapes_images(np.random.default_rng(21), 16)
    val, _ = _shapes_images(np.random.default_rng(22), 16)
    x = torch.from_numpy(val[:1])
    with torch.no_grad():
        expected = model(x).numpy()
    tmp = OUT / "yolo.tmp.onnx"
    # ultralytics' default export: batch 1 and the image size fixed, opset 17, BN folded
    _export(model, (x,), tmp, opset_version=17, input_names=["images"], output_names=["output0"])
    finish(_load(tmp), "yolov8_like", {"images": val[:1]}, [expected])
    save_data("yolov8_like", "calib", {"images": calib})
    save_data("yolov8_like", "val", {"images": val})


# -- 6. BERT from transformers -----------------------------------------------------------------
VOCAB, SEQ = 1000, 16


class BertOutputs(nn.Module):
    """BertModel's two outputs as a tuple, inputs by keyword (transformers 5 signature)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids)  # fmt: skip
        return out.last_hidden_state, out.pooler_output


def _sentences(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """[CLS] a [SEP] b [SEP] then padding: token ids from a Zipf-like law over 1000 ids, the two
    segments marked in token_type_ids, padding masked out."""
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    types = np.zeros((n, SEQ), np.int64)
    for i in range(n):
        a, b = rng.integers(2, 7), rng.integers(0, 6)
        words = np.minimum(rng.zipf(1.3, a + b) + 4, VOCAB - 1)
        seq = [2, *words[:a], 3] + ([*words[a:], 3] if b else [])
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        types[i, a + 2 : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def make_bert() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # weights drawn with std 0.2, not BERT's 0.02: at 0.02 the residual stream carries nearly
    # all of the output, so pruning the MLPs barely moves it and validation says nothing
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=SEQ * 4, attn_implementation="eager",
                        initializer_range=0.2)  # fmt: skip
    model = BertOutputs(BertModel(config)).eval()
    calib = _sentences(np.random.default_rng(30), 128)
    val = _sentences(np.random.default_rng(31), 128)
    feeds = {k: v[:4] for k, v in val.items()}
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                       "token_type_ids"))  # fmt: skip
    with torch.no_grad():
        expected = [t.numpy() for t in model(*args)]
    tmp = OUT / "bert.tmp.onnx"
    dynamic = {k: {0: "batch", 1: "sequence"} for k in (*feeds, "last_hidden_state")}
    _export(model, args, tmp, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={**dynamic, "pooler_output": {0: "batch"}})  # fmt: skip
    model.eval()
    finish(_load(tmp), "bert_tiny", feeds, expected)
    save_data("bert_tiny", "calib", calib)
    save_data("bert_tiny", "val", val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-only", action="store_true")
    parser.add_argument("--tf-python", default=str(HERE.parent / ".venv-tf" / "bin" / "python"))
    parser.add_argument("--paddle-python",
                        default=str(HERE.parent / ".venv-paddle" / "bin" / "python"))
    parser.add_argument("--only", nargs="*", help="vad crepe yolo bert tf paddle")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    steps = {"vad": make_vad, "crepe": make_crepe, "yolo": make_yolo, "bert": make_bert}
    chosen = args.only or [*steps, "tf", "paddle"]
    for name in chosen:
        if name in steps:
            steps[name]()
    if args.torch_only:
        return
    for name, python, script in (("tf", args.tf_python, "exports_tf.py"),
                                 ("paddle", args.paddle_python, "exports_paddle.py")):
        if name in chosen:
            subprocess.run([python, str(HERE / script)], check=True)


if __name__ == "__main__":
    main()
