"""PP-OCR-like recogniser and PP-LCNet-like classifier: real PaddlePaddle, real paddle2onnx.

Run by make_exports.py in its own interpreter (paddlepaddle, paddle2onnx, onnx, onnxruntime).
Weights are random (BatchNorm statistics random too, so no channel is trivially dead). Current
paddle2onnx writes dynamic dims as dim_param; the older releases that produced the held-out
models wrote them as dim_value -1, so the declared input (and output) dims are patched to -1
after export: the one edit made to the exporter's graph.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import paddle  # noqa: E402
import paddle2onnx  # noqa: E402
from paddle import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exports_common import finish, save_data, set_dims  # noqa: E402

HEIGHT, WIDTH, CLASSES = 32, 96, 12  # recogniser input; 10 digits + 1 extra + CTC blank
CLS_SIZE, CLS_CLASSES = 48, 4


class ConvBNLayer(nn.Layer):
    """Conv (no bias) + BatchNorm + hardswish, PP-LCNet's unit."""

    def __init__(self, c_in: int, c_out: int, k: int, stride=1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2D(c_in, c_out, k, stride, (k - 1) // 2, groups=groups,
                              bias_attr=False)  # fmt: skip
        self.bn = nn.BatchNorm2D(c_out)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _backbone(width: int, rec: bool) -> nn.Sequential:
    """Stem, depthwise-separable blocks; the recogniser keeps the width (stride (2, 1))."""
    down = (2, 1) if rec else 2
    return nn.Sequential(
        ConvBNLayer(3, width, 3, 2),
        ConvBNLayer(width, width, 3, 1, groups=width), ConvBNLayer(width, 2 * width, 1),
        ConvBNLayer(2 * width, 2 * width, 3, down, groups=2 * width),
        ConvBNLayer(2 * width, 4 * width, 1),
        ConvBNLayer(4 * width, 4 * width, 3, down, groups=4 * width),
        ConvBNLayer(4 * width, 4 * width, 1),
    )  # fmt: skip


class Recogniser(nn.Layer):
    """Backbone, height pooled away, the map turned into a sequence with reshape([0, C, -1]),
    an SVTR-like block (fused qkv, reshape [0, -1, 3, heads, d], softmax attention, reshape
    [0, -1, C], MLP with hardswish), a CTC head with softmax."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.backbone = _backbone(width, rec=True)
        c = 4 * width
        self.c, self.heads = c, heads
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.act = nn.Hardswish()
        self.head = nn.Linear(c, CLASSES)

    def forward(self, x):
        h = self.backbone(x)  # [N, C, 4, W/2]
        h = paddle.mean(h, axis=2, keepdim=True)
        h = paddle.reshape(h, [0, self.c, -1]).transpose([0, 2, 1])  # [N, T, C]
        d = self.c // self.heads
        qkv = paddle.reshape(self.qkv(self.norm1(h)), [0, -1, 3, self.heads, d])
        qkv = qkv.transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0] * d**-0.5, qkv[1], qkv[2]
        att = nn.functional.softmax(paddle.matmul(q, k.transpose([0, 1, 3, 2])), axis=-1)
        mixed = paddle.matmul(att, v).transpose([0, 2, 1, 3])
        h = h + self.proj(paddle.reshape(mixed, [0, -1, self.c]))
        h = h + self.fc2(self.act(self.fc1(self.norm2(h))))
        return nn.functional.softmax(self.head(h), axis=2)


class Classifier(nn.Layer):
    """PP-LCNet-like: backbone, global average pool, flatten, Linear, softmax."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = _backbone(width, rec=False)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(4 * width, CLS_CLASSES)

    def forward(self, x):
        h = paddle.flatten(self.pool(self.backbone(x)), start_axis=1)
        return nn.functional.softmax(self.fc(h), axis=-1)


def _randomise_norms(model: nn.Layer, rng: np.random.Generator) -> None:
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value((1 + 0.2 * rng.standard_normal(c)).astype("float32"))
            layer.bias.set_value((0.1 * rng.standard_normal(c)).astype("float32"))
            layer._mean.set_value((0.1 * rng.standard_normal(c)).astype("float32"))
            layer._variance.set_value((1 + 0.3 * rng.random(c)).astype("float32"))


def _text_lines(rng: np.random.Generator, n: int) -> np.ndarray:
    """Dark strokes on light paper: random bars and dots, normalised as PP-OCR does (x-0.5)/0.5."""
    img = np.ones((n, 3, HEIGHT, WIDTH), np.float32)
    for i in range(n):
        for _ in range(rng.integers(4, 9)):
            x0, w = rng.integers(0, WIDTH - 8), rng.integers(2, 8)
            y0, h = rng.integers(4, 12), rng.integers(8, 20)
            img[i, :, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 0.3)
        img[i] += 0.05 * rng.standard_normal((3, HEIGHT, WIDTH)).astype(np.float32)
    return (img - 0.5) / 0.5


def _export(model: nn.Layer, spec: list, opset: int) -> onnx.ModelProto:
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "model")
        paddle.jit.save(model, prefix, input_spec=spec)
        params = prefix + ".pdiparams"
        program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
        out = os.path.join(tmp, "model.onnx")
        paddle2onnx.export(program, params, out, opset_version=opset, auto_upgrade_opset=False,
                           enable_onnx_checker=True)  # fmt: skip
        return onnx.load(out)


def main() -> None:
    paddle.seed(0)
    rng = np.random.default_rng(40)
    rec = Recogniser()
    _randomise_norms(rec, rng)
    rec.eval()
    calib = _text_lines(np.random.default_rng(41), 8)
    val = _text_lines(np.random.default_rng(42), 8)
    expected = rec(paddle.to_tensor(val[:2])).numpy()
    spec = [paddle.static.InputSpec([None, 3, HEIGHT, None], "float32", "x")]
    proto = _export(rec, spec, opset=11)
    set_dims(proto.graph.input[0], [-1, 3, HEIGHT, -1])
    # -1 for the batch; the time axis left unnamed: shape inference on a -1 width gives 0
    set_dims(proto.graph.output[0], [-1, None, CLASSES])
    finish(proto, "paddle_ocr_rec", {"x": val[:2]}, [expected], atol=1e-4)
    save_data("paddle_ocr_rec", "calib", {"x": calib})
    save_data("paddle_ocr_rec", "val", {"x": val})

    paddle.seed(1)
    cls = Classifier()
    _randomise_norms(cls, np.random.default_rng(50))
    cls.eval()
    images = np.random.default_rng(51).uniform(-1, 1, (16, 3, CLS_SIZE, CLS_SIZE)).astype("float32")
    calib, val = images[:8], images[8:]
    probs = cls(paddle.to_tensor(val)).numpy()
    spec = [paddle.static.InputSpec([None, 3, CLS_SIZE, CLS_SIZE], "float32", "x")]
    proto = _export(cls, spec, opset=13)
    set_dims(proto.graph.input[0], [-1, 3, CLS_SIZE, CLS_SIZE])
    set_dims(proto.graph.output[0], [-1, CLS_CLASSES])
    finish(proto, "paddle_cls", {"x": val[:2]}, [probs[:2]])
    save_data("paddle_cls", "calib", {"x": calib})
    save_data("paddle_cls", "val", {"x": val, "labels": probs.argmax(1).astype(np.int64)})


if __name__ == "__main__":
    main()
