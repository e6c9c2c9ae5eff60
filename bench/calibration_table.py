"""Accuracy after one-shot pruning, magnitude against calibrated criteria: the README's table.

For each model (the bundled digits CNN, and the MNIST CNN twins and ViT of `make mnist-models`),
at each sparsity and at 2:4, prune with plain global magnitude (no data), wanda and sparsegpt
(sequential, the default) and sparsegpt one-pass, calibrated on training samples, and measure
top-1 accuracy and the mean cosine of the logits to the dense model's on held-out samples.

    python bench/calibration_table.py [--models digits,cnn-folded,cnn-unfolded,vit]

With --structured, whole channels go instead (--target params and macs, settings 0.1,0.3,0.5 by
default; --heads for whole attention heads), and each row also gives sparsegpt with --round-to 8
and that model's median CPU latency for a batch of 32 as a ratio to the dense model's, measured in
the same run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import onnxprune
from onnxprune.calibration import Calibration
from onnxprune.errors import InfeasibleError
from onnxprune.options import Selection

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
    "ocr": (ROOT / "build/ocr/ocr_rec.onnx", ROOT / "build/ocr/ocr_calib.npz",
            ROOT / "build/ocr/ocr_test.npz"),
}  # fmt: skip


def accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in %, or for a sequence model ([N, T, classes] scores, labels [N, L] padded
    with -1: the OCR recogniser of `make ocr-model`) greedy-CTC character accuracy in %."""
    if out.ndim == 3:
        sys.path.insert(0, str(ROOT / "models"))
        from ocr_eval import greedy_decode, score

        return 100 * score(greedy_decode(out), y)[0]
    return 100 * float((out.argmax(1) == y).mean())


def cosines(out: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Per-sample cosine of the flattened outputs."""
    out, dense = out.reshape(len(out), -1), dense.reshape(len(dense), -1)
    return np.sum(out * dense, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(dense, axis=1))


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


def latency(model: ir.Model, x: np.ndarray, repeats: int = 50) -> float:
    """Median seconds of one batch in ONNX Runtime's CPU provider, after a warm-up."""
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measured_models(keys: str):
    """(key, path, calibration file, test inputs, labels, dense model) of each model present;
    quiet logs, as the tables print their own lines."""
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    for key in keys.split(","):
        path, calib, test = MODELS[key]
        if not path.exists():
            print(f"{key}: {path} is missing (make mnist-models / make ocr-model build it)")
            continue
        data = np.load(test)
        yield key, path, calib, data["input"], data["labels"], onnxprune.load_model(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=None, help="default " + ",".join(SETTINGS))
    parser.add_argument("--structured", action="store_true", help="remove whole channels")
    parser.add_argument("--targets", default="params,macs", help="--structured: what -s counts")
    parser.add_argument("--heads", action="store_true", help="--structured: whole heads")
    args = parser.parse_args()
    if args.structured:
        structured_table(args)
        return
    args.settings = args.settings or ",".join(SETTINGS)
    for key, path, calib, x, y, dense_model in measured_models(args.models):
        dense = logits(dense_model, x)
        print(f"\n{key}: {path.name}, dense {accuracy(dense, y):.2f}%, "
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
                model, _ = onnxprune.prune(
                    path, Selection(sparsity, pattern=pattern), calibration=options
                )
                out = logits(model, x)
                cosine = cosines(out, dense)
                seconds = time.perf_counter() - start
                cells.append(f"{accuracy(out, y):.2f}% ({cosine.mean():.3f}, {seconds:.0f} s)")
            print(f"| {setting} | " + " | ".join(cells) + " |", flush=True)


def structured_table(args: argparse.Namespace) -> None:
    """Channels removed: accuracy (cosine to dense, seconds) per criterion, and latency."""
    for key, path, calib, x, y, dense_model in measured_models(args.models):
        dense = logits(dense_model, x)
        dense_latency = latency(dense_model, x[:32])
        print(f"\n{key}: {path.name}, dense {accuracy(dense, y):.2f}%, "
              f"{len(y)} held-out samples, calibration {calib.name}, structured"
              f"{' --heads' if args.heads else ''}")  # fmt: skip
        print("| removed | " + " | ".join(m for m, _, _ in METHODS)
              + " | sparsegpt --round-to 8 | latency (round-to 8) |")  # fmt: skip
        print("|---|" + "---:|" * (len(METHODS) + 2))
        for target in args.targets.split(","):
            for setting in (args.settings or "0.1,0.3,0.5").split(","):
                cells = []
                for _, criterion, mode in METHODS:
                    start = time.perf_counter()
                    options = None
                    if criterion is not None:
                        options = Calibration(
                            data=calib, criterion=criterion, mode=mode, device="cpu"
                        )
                    model, _ = onnxprune.prune(
                        path,
                        float(setting),
                        calibration=options,
                        structured=onnxprune.Structured(target=target, heads=args.heads),
                    )
                    out = logits(model, x)
                    cosine = cosines(out, dense)
                    seconds = time.perf_counter() - start
                    cells.append(f"{accuracy(out, y):.2f}% ({cosine.mean():.3f}, {seconds:.0f} s)")
                # ONNX Runtime's CPU kernels slow down on channel counts that are not multiples
                # of 8 (MNIST CNN, 30% of MACs: 2.4x the dense latency, 0.7x with --round-to 8)
                options = Calibration(data=calib, device="cpu")
                try:
                    model, _ = onnxprune.prune(
                        path,
                        float(setting),
                        calibration=options,
                        structured=onnxprune.Structured(
                            target=target, heads=args.heads, round_to=8
                        ),
                    )
                except InfeasibleError:  # layers too narrow to round and still reach it
                    print(f"| {setting} of {target} | " + " | ".join(cells) + " | infeasible | |")
                    continue
                out = logits(model, x)
                cells.append(f"{accuracy(out, y):.2f}% ({cosines(out, dense).mean():.3f})")
                ratio = latency(model, x[:32]) / dense_latency
                print(f"| {setting} of {target} | " + " | ".join(cells) + f" | x{ratio:.2f} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
