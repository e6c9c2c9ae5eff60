"""Unstructured pruning speed and memory, as ratios to a baseline measured in the same run.

Model: ResNet-50's layer shapes (25.5 M weights, random, built with onnx.helper).
Baseline: a fresh process doing a plain `onnx.load` + `onnx.save` of the same file.
Measured: a fresh process running `onnxprune MODEL --sparsity 0.9` (checker included).
Each figure is the median of --runs runs, the two commands alternating so drift hits both.

    python bench/bench_prune.py [--runs 5] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "out"


def build_model() -> Path:
    """Built in a child process: a child's peak RSS counts its parent's size at fork time."""
    path = OUT / "resnet50_shape.onnx"
    code = "import sys, pathlib, models; models.cached(pathlib.Path(sys.argv[1]), models.resnet50)"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=HERE, check=True)
    return path


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss * 1024


IN_PROCESS = """
import statistics, sys, time
import onnx, onnxprune
src, out, copy, sparsity, runs = sys.argv[1:4] + [float(sys.argv[4]), int(sys.argv[5])]
base, prune = [], []
for _ in range(runs):
    t = time.perf_counter(); onnx.save(onnx.load(src), copy); base.append(time.perf_counter() - t)
    t = time.perf_counter(); onnxprune.prune(src, sparsity, output=out, force=True)
    prune.append(time.perf_counter() - t)
print(statistics.median(base), statistics.median(prune))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()

    model = build_model()
    size = model.stat().st_size
    py = sys.executable
    baseline = [
        py,
        "-c",
        "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])",
        str(model),
        str(OUT / "copy.onnx"),
    ]
    prune = [
        py,
        "-m",
        "onnxprune",
        str(model),
        "--sparsity",
        str(args.sparsity),
        "--quiet",
        "--force",
        "-o",
        str(OUT / "pruned.onnx"),
    ]
    measure(baseline), measure(prune)  # warm-up: page cache, bytecode caches
    base_t, base_m, prune_t, prune_m, ratios = [], [], [], [], []
    for _ in range(args.runs):
        bt, bm = measure(baseline)
        pt, pm = measure(prune)
        base_t.append(bt)
        base_m.append(bm)
        prune_t.append(pt)
        prune_m.append(pm)
        ratios.append(pt / bt)
    inproc = subprocess.run(
        [
            py,
            "-c",
            IN_PROCESS,
            str(model),
            str(OUT / "pruned.onnx"),
            str(OUT / "copy.onnx"),
            str(args.sparsity),
            str(args.runs),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    in_base, in_prune = float(inproc[0]), float(inproc[1])
    mib = 2**20
    print(
        f"model: ResNet-50 shape, 25.5 M float32 weights, {size / mib:.1f} MiB, "
        f"sparsity {args.sparsity}, {args.runs} runs, {os.cpu_count()} CPUs"
    )
    print(
        f"baseline onnx.load+onnx.save: {statistics.median(base_t):.2f} s, "
        f"peak RSS {statistics.median(base_m) / mib:.0f} MiB"
    )
    print(
        f"onnxprune:                    {statistics.median(prune_t):.2f} s, "
        f"peak RSS {statistics.median(prune_m) / mib:.0f} MiB"
    )
    print(
        f"time ratio prune / (load+save): median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target <= 1.5)"
    )
    print(
        f"same, inside one process after imports: {in_prune:.2f} s / {in_base:.2f} s = "
        f"{in_prune / in_base:.2f} (the rest is start-up; onnx-ir imports sympy, 0.2 s)"
    )
    print(
        f"peak memory / file size: {statistics.median(prune_m) / size:.2f} "
        f"(target <= 2.5); baseline's: {statistics.median(base_m) / size:.2f}"
    )


if __name__ == "__main__":
    main()
