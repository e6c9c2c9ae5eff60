"""Does removing half the MACs make a ResNet-50 twice as fast? ONNX Runtime CPU, same run.

Builds a ResNet-50-shaped model with onnx.helper (models.resnet50: bottlenecks 3-4-6-3, BatchNorm
folded, random He weights, 224x224), so no torch is needed; prunes half its MACs structured, with
and without --round-to; and prints dense latency / pruned latency at batch 1 next to the MAC ratio,
which is the limit.
Issue 4 asks for a latency ratio within 15% of the MAC ratio.

    python bench/bench_structured.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from zoo import latencies_ms  # bench/ is the script's folder

import onnxprune
from models import resnet50  # bench/models.py (ruff files it first-party: the root models/)
from onnxprune import pipeline


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "resnet50.onnx"
        onnx.save(resnet50(), str(dense))
        variants = {}
        for round_to in (None, 8, 16):
            out = Path(tmp) / f"pruned{round_to}.onnx"
            _, report = pipeline.prune(
                dense,
                0.5,
                output=out,
                structured=onnxprune.Structured(target="macs", round_to=round_to),
            )
            macs = report.channels.macs
            variants[round_to] = (out, macs[1] / macs[0])
        feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
        paths = [dense, *(p for p, _ in variants.values())]
        times = latencies_ms(paths, feeds, args.repeats)
    print(f"ResNet-50 shape, batch 1, ORT CPU: dense {times[0]:.1f} ms")
    print(f"{'round-to':>8}  {'MAC ratio':>9}  {'latency ratio':>13}  {'speed-up / MAC limit':>20}")
    for (round_to, (_, mac_ratio)), t in zip(variants.items(), times[1:], strict=True):
        ratio = t / times[0]
        print(f"{round_to or '-':>8}  {mac_ratio:9.3f}  {ratio:13.3f}  {mac_ratio / ratio:20.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
