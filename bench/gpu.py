"""GPU latency of pruned models, with where ONNX Runtime placed the nodes (`make bench-gpu`).

Exports a few torchvision models (randomly initialised; latency does not depend on the weights'
values), prunes each structurally (`--target macs -s 0.5 --round-to 8`) and unstructurally
(`-s 0.5`), and measures ONNX Runtime CUDA latency (IO binding: host-device copies not timed) at
batch 1 and 64 for the dense and each pruned model, as ratios to the dense one measured in the
same run, beside the MAC ratio. `--profile` adds, per model, the op types whose summed kernel time
changed most between dense and structured (ONNX Runtime's profiler), to find what got slower.

    python bench/gpu.py        # resnet50, mobilenet_v2, efficientnet_b0, vit_b_16
    python bench/gpu.py resnet50 --profile --batches 1,64

Needs torch and torchvision (for the exports) and onnxruntime-gpu with CUDA; without CUDA it says
why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

import onnxprune

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "gpu"
DEFAULT = ["resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16"]


def export(name: str) -> Path:
    """A dynamic-batch export (TorchScript exporter) so one file serves batch 1 and 64."""
    path = OUT / f"{name}.onnx"
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    return path


def session(path: Path, *, profile: bool = False):
    import onnxruntime as ort

    from onnxprune.runtime import CPU, CUDA, placement_of

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(OUT / f"profile_{path.stem}")
    s = ort.InferenceSession(str(path), options, providers=[CUDA, CPU])
    return s, placement_of(str(path), (CUDA, CPU))


def latency_ms(path: Path, batch: int) -> float:
    from onnxprune.validate import measure_latency

    s, _ = session(path)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return measure_latency(s, {"x": x}).median_ms


def op_times(path: Path, batch: int) -> dict[str, float]:
    """Microseconds per op type over 20 profiled runs (kernel events of ORT's profiler)."""
    s, _ = session(path, profile=True)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(25):
        s.run(None, {"x": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[args.get("op_name", "?")] += event.get("dur", 0) / 25
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from onnxprune.runtime import cuda_problem

    problem = cuda_problem()
    if problem:
        print(f"bench/gpu.py: skipped, CUDA cannot run here: {problem}")
        return
    logging.disable(logging.WARNING)
    from onnxprune.validate.metrics import model_cost

    OUT.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    print("| model | variant | MACs ratio | " + " | ".join(f"batch {b}" for b in batches)
          + " | placement |")  # fmt: skip
    print("|---" * (4 + len(batches)) + "|")
    for name in args.models:
        dense = export(name)
        variants = {"dense": dense}
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            structured = Path(tmp) / "structured.onnx"
            onnxprune.prune(
                dense,
                0.5,
                output=structured,
                structured=onnxprune.Structured(
                    target="macs", round_to=8, input_shapes={"x": (1, 3, 224, 224)}
                ),
            )
            unstructured = Path(tmp) / "unstructured.onnx"
            onnxprune.prune(dense, 0.5, output=unstructured)
            variants.update(structured=structured, unstructured=unstructured)
            base_macs = model_cost(dense, {"x": (1, 3, 224, 224)}).macs
            base = {b: latency_ms(dense, b) for b in batches}
            for label, path in variants.items():
                macs = model_cost(path, {"x": (1, 3, 224, 224)}).macs
                times = base if label == "dense" else {b: latency_ms(path, b) for b in batches}
                cells = [
                    f"{times[b]:.2f} ms" if label == "dense" else f"{times[b] / base[b]:.2f}x"
                    for b in batches
                ]
                placed = session(path)[1]
                print(f"| {name} | {label} | {macs / max(base_macs, 1):.2f} | "
                      + " | ".join(cells) + f" | {placed.summary() if placed else '?'} |",
                      flush=True)  # fmt: skip
            if args.profile:
                for b in batches:
                    before, after = op_times(dense, b), op_times(structured, b)
                    change = sorted(
                        ((after.get(op, 0) - before.get(op, 0), op) for op in before | after),
                        reverse=True,
                    )
                    top = ", ".join(
                        f"{op} {before.get(op, 0):.0f}->{after.get(op, 0):.0f} us"
                        for _, op in change[:6]
                    )
                    print(f"  {name} batch {b}, op time dense -> structured: {top}")
    print(f"(ONNX Runtime {__import__('onnxruntime').__version__}, CUDA provider; "
          f"{os.cpu_count()} CPUs)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
