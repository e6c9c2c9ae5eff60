"""Accuracy after one-shot pruning, magnitude against calibrated criteria: the README's table.

For each model (the bundled digits CNN, and the MNIST CNN twins and ViT of `make mnist-models`),
at each sparsity and at 2:4, prune with plain global magnitude (no data), wanda and sparsegpt
(sequential, the default) and sparsegpt one-pass, calibrated on training samples, and measure
top-1 accuracy and the mean cosine of the logits to the dense model's on held-out samples.

    python bench/calibration_table.py [--models digits,cnn-folded,cnn-unfolded,vit]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import onnxprune
from onnxprune.calibration import Calibration

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "build" / "mnist"
MODELS = {
    "digits": (ROOT / "models/digits_cnn.onnx", ROOT / "models/digits_calib.npz",
               ROOT / "models/digits_val.npz"),
    "cnn-folded": (MNIST / "mnist_cnn_folded.onnx", MNIST / "mnist_calib.npz",
                   MNIST / "mnist_test.npz"),
    "cnn-unfolded": (MNIST / "mnist_cnn_unfolded.onnx", MNIST / "mnist_calib.npz",
                     MNIST / "mnist_test.npz"),
    "vit": (MNIST / "mnist_vit.onnx", MNIST / "mnist_calib.npz", MNIST / "mnist_test.npz"),
}  # fmt: skip
SETTINGS = ("0.5", "0.8", "0.9", "0.95", "0.98", "2:4")
METHODS = (
    ("magnitude", None, None),
    ("wanda", "wanda", "sequential"),
    ("sparsegpt one-pass", "sparsegpt", "one-pass"),
    ("sparsegpt", "sparsegpt", "sequential"),
)


def logits(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The model's first output on every test sample, in ONNX Runtime's CPU provider."""
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    for key in args.models.split(","):
        path, calib, test = MODELS[key]
        if not path.exists():
            print(f"{key}: {path} is missing (make mnist-models builds it)")
            continue
        data = np.load(test)
        x, y = data["input"], data["labels"]
        dense = logits(onnxprune.load_model(path), x)
        print(f"\n{key}: {path.name}, dense {100 * (dense.argmax(1) == y).mean():.2f}%, "
              f"{len(y)} held-out samples, calibration {calib.name}")  # fmt: skip
        print("| setting | " + " | ".join(m for m, _, _ in METHODS) + " |")
        print("|---|" + "---:|" * len(METHODS))
        for setting in args.settings.split(","):
            pattern = setting if ":" in setting else None
            sparsity = 0.0 if pattern else float(setting)
            cells = []
            for _, criterion, mode in METHODS:
                start = time.perf_counter()
                options = None
                if criterion is not None:
                    options = Calibration(data=calib, criterion=criterion, mode=mode, device="cpu")
                model, _ = onnxprune.prune(path, sparsity, pattern=pattern, calibration=options)
                out = logits(model, x)
                cosine = np.sum(out * dense, 1) / np.linalg.norm(out, axis=1)
                cosine /= np.linalg.norm(dense, axis=1)
                accuracy = 100 * (out.argmax(1) == y).mean()
                seconds = time.perf_counter() - start
                cells.append(f"{accuracy:.2f}% ({cosine.mean():.3f}, {seconds:.0f} s)")
            print(f"| {setting} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
