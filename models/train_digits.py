"""Train the bundled demo CNN on scikit-learn's digits and export it to ONNX.

Produces, next to this script:

* ``digits_cnn.onnx`` - the trained network (opset 17, IR version 10, dynamic batch,
  input ``input`` float32 [N, 1, 8, 8], output ``logits`` float32 [N, 10]; all weights are
  initializers stored inside the file).
* ``digits_val.npz`` - the held-out split: ``input`` float32 [N, 1, 8, 8] scaled to [0, 1]
  and ``labels`` int64 [N].

The digits data ships inside scikit-learn, so nothing is downloaded. Needs torch, onnx,
onnxruntime and scikit-learn::

    python models/train_digits.py

The graph deliberately contains the structures a pruner has to handle: a residual Add, a
channel Concat, BatchNormalization nodes the exporter cannot fold into a Conv, a depthwise
Conv and a Flatten of a spatial feature map feeding a Gemm classifier.
"""

from __future__ import annotations

import argparse
import collections
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
IR_VERSION = 10
REQUIRED_OPS = {"Add", "Concat", "BatchNormalization", "Conv", "Gemm"}


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (8,458 trainable parameters).

    stem       Conv3x3(1->16) + BN + ReLU                    (BN folds into the Conv)
    residual   x + [DWConv3x3(16) + BN + ReLU + Conv1x1(16->16) + BN]
               -> BN -> ReLU                                 (BN after Add: kept)
    concat     Concat([Conv1x1(16->16), Conv3x3(16->16)], channels) -> BN -> ReLU
                                                             (BN after Concat: kept)
    pool       MaxPool2x2 -> 32 x 4 x 4
    head       Flatten (512) -> Linear(512->10)              (Gemm)
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.res_branch = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),  # depthwise
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False),  # pointwise
            nn.BatchNorm2d(width),
        )
        self.post_add = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.cat_a = nn.Conv2d(width, width, 1)
        self.cat_b = nn.Conv2d(width, width, 3, padding=1)
        self.post_cat = nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.post_add(x + self.res_branch(x))
        x = torch.cat([self.cat_a(x), self.cat_b(x)], dim=1)
        x = self.pool(self.post_cat(x))
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_split(seed: int, test_size: float):
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(xt) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb, yb = xt[idx], yt[idx]
            # Light augmentation: shift by up to one pixel in each direction.
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}  loss {total / len(xt):.4f}")


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
        dynamo=False,
    )


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    example = torch.zeros(2, 1, 8, 8)
    # The TorchScript-based exporter gives a plain graph (Flatten, one named initializer per
    # tensor); the dynamo exporter emits a Reshape and may share equal-valued initializers.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        _export_legacy(model, example, path)
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION  # ONNX Runtime rejects the newest IR versions
    proto.doc_string = "onnxprune demo: small CNN for scikit-learn digits (models/train_digits.py)"
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_export(path: Path, x: np.ndarray, y: np.ndarray, torch_acc: float) -> float:
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == IR_VERSION, proto.ir_version
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == OPSET, opsets
    for init in proto.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    missing = REQUIRED_OPS - set(ops)
    assert not missing, f"exported graph lacks {missing}: {dict(ops)}"
    assert ops.keys() & {"Flatten", "Reshape"}, dict(ops)
    depthwise = [
        n.name
        for n in proto.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert depthwise, "no depthwise Conv in exported graph"
    print("ONNX ops:", dict(sorted(ops.items())))

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    ort_acc = accuracy(logits, y)
    print(f"ONNX Runtime held-out accuracy: {ort_acc:.4f} ({len(y)} samples)")
    assert abs(ort_acc - torch_acc) <= 0.005, (ort_acc, torch_acc)
    return ort_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--test-size", type=float, default=0.25)
    args = parser.parse_args()

    seed_everything(args.seed)
    torch.set_num_threads(1)  # bit-for-bit repeatable training on CPU
    x_train, x_test, y_train, y_test = load_split(args.seed, args.test_size)
    print(f"train {len(y_train)}  held-out {len(y_test)}")

    model = DigitsCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    train(model, x_train, y_train, args.epochs, args.seed)

    model.eval()
    with torch.no_grad():
        torch_acc = accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)
    print(f"torch held-out accuracy: {torch_acc:.4f}")
    if torch_acc < 0.95:
        raise SystemExit(f"accuracy {torch_acc:.4f} is below the 0.95 floor")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    export(model, onnx_path)
    check_export(onnx_path, x_test, y_test, torch_acc)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes)")

    val_path = args.out_dir / "digits_val.npz"
    np.savez_compressed(val_path, input=x_test.astype(np.float32), labels=y_test.astype(np.int64))
    print(f"wrote {val_path}")


if __name__ == "__main__":
    main()
