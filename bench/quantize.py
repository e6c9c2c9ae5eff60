"""Prune, then quantize: the recipe for edge models, measured. The README's "Quantized models".

For the bundled digits CNN and the MNIST CNN (BatchNorm folded, `make mnist-models`, where
built), measure top-1 accuracy on the held-out samples, the file size (and gzip's, what a
download or an app bundle ships: dense storage keeps zeros) and ONNX Runtime's median CPU
latency for a batch of 32 (one thread), as ratios to the dense float model measured in the same
run, of:

- dense fp32, and dense int8: onnxruntime.quantization.quantize_static (QDQ, per-channel int8
  weights, uint8 activations) calibrated on the model's calibration samples;
- pruned fp32: onnxprune with those samples, unstructured 85% (sparsegpt) and structured 50% of
  the MACs (channel counts multiples of 8); pruned int8: the same, then quantize_static as above;
- quantize-then-prune: onnxprune on the int8 model (quantized weights are ranked by magnitude
  and zeroed; calibration cannot re-solve them), to show what that order costs.

    python bench/quantize.py [--models digits,cnn-folded] [--out bench/out/quantize]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_table import MODELS, accuracy

import onnxprune
from onnxprune.validate import measure_latency

BATCH = 32
SPARSITY = 0.85  # unstructured, sparsegpt
MACS = 0.5  # structured, share of the MACs removed


def quantize(source: Path, target: Path, calib: Path) -> Path:
    """quantize_static in QDQ format: per-channel int8 weights, uint8 activations, calibrated
    on (up to 256 of) the calibration samples."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    samples = np.load(calib)
    name = next(k for k in samples.files if k != "labels")
    x = samples[name][:256]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(x[i : i + BATCH] for i in range(0, len(x), BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    input_name = ort.InferenceSession(str(source)).get_inputs()[0].name
    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return target


def measure(path: Path, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy, file size (raw and gzipped) and median CPU latency at batch 32."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.concatenate(
        [session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    latency = measure_latency(session, {name: x[:BATCH]}, repeats=50, budget_s=10.0)
    data = path.read_bytes()
    return {
        "accuracy": accuracy(out, y),
        "bytes": len(data),
        "gzip": len(gzip.compress(data, 9)),
        "ms": latency.median_ms,
    }


def variants(path: Path, calib: Path, work: Path) -> list[tuple[str, Callable[[], Path]]]:
    """(label, how to make the model) in the table's order; each step reuses the files before."""

    def pruned(stem: str, **settings) -> Path:
        out = work / f"{stem}.onnx"
        onnxprune.prune(path, output=out, force=True, calibration=calib, **settings)
        return out

    def quantize_then_prune(stem: str, **settings) -> Path:
        out = work / f"{stem}.onnx"
        onnxprune.prune(work / "int8.onnx", output=out, force=True, **settings)
        return out

    unstructured = {"sparsity": SPARSITY, "criterion": "sparsegpt"}
    structured = {"sparsity": MACS, "structured": True, "target": "macs", "round_to": 8}
    return [
        ("dense fp32", lambda: path),
        ("dense int8", lambda: quantize(path, work / "int8.onnx", calib)),
        (f"pruned fp32, unstructured {SPARSITY:.0%}", lambda: pruned("u", **unstructured)),
        (
            f"pruned fp32, structured {MACS:.0%} of MACs, round-to 8",
            lambda: pruned("s", **structured),
        ),
        (
            "pruned int8, unstructured (prune, then quantize)",
            lambda: quantize(work / "u.onnx", work / "u_int8.onnx", calib),
        ),
        (
            "pruned int8, structured (prune, then quantize)",
            lambda: quantize(work / "s.onnx", work / "s_int8.onnx", calib),
        ),
        (
            "int8, then pruned unstructured (quantize, then prune)",
            lambda: quantize_then_prune("int8_u", sparsity=SPARSITY),
        ),
        (
            "int8, then pruned structured (quantize, then prune)",
            lambda: quantize_then_prune("int8_s", **structured),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,cnn-folded")
    parser.add_argument("--out", type=Path, default=None, help="keep the models made here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"ONNX Runtime {ort.__version__}, CPU, 1 thread, batch {BATCH}; ratios to dense fp32")
    for key in args.models.split(","):
        path, calib, test = MODELS[key]
        if not path.exists():
            print(f"\n{key}: not built (see the Makefile)")
            continue
        data = np.load(test)
        x = data[next(k for k in data.files if k != "labels")]
        y = data["labels"]
        print(f"\n{key} ({path.name}, {len(y)} held-out samples)\n")
        print("| model | top-1 % | file | gzip | latency (ms) |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as scratch:
            work = args.out / key if args.out else Path(scratch)
            work.mkdir(parents=True, exist_ok=True)
            base = None
            for label, make in variants(path, calib, work):
                got = measure(make(), x, y)
                base = base or got
                print(
                    f"| {label} | {got['accuracy']:.2f} | {got['bytes'] / 1024:.1f} KiB "
                    f"({got['bytes'] / base['bytes']:.2f}x) | {got['gzip'] / 1024:.1f} KiB "
                    f"({got['gzip'] / base['gzip']:.2f}x) | {got['ms']:.3f} "
                    f"({got['ms'] / base['ms']:.2f}x) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
