"""Start-up and the demo's headline, as ratios against baselines taken in the same run.

    python bench/startup.py            # CPU seconds of light commands against `python -c pass`
    python bench/startup.py --demo     # also the demo's channel model: latency against dense
    python bench/startup.py --tree /tmp/old   # start-up of another checkout (git archive of a
                                              # commit), run by this interpreter

Start-up: each command runs in a fresh process, RUNS times, alternating with the baseline; the CPU
time (user + system) of each child is read from wait4, so a busy machine's waiting is not counted.
The target is under 0.3 s of CPU for `onnxprune --help` and argument errors.

Demo: the dense digits CNN and the channel model `make demo` writes (built here the same way when
it is missing), timed on a batch of 32 of the demo's held-out images as validation times them
(ONNX Runtime on the CPU, default session options), the two runs interleaved; the median of
REPEATS rounds' ratios (pruned / dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ONNXPRUNE = [PYTHON, "-m", "onnxprune"]
RUNS = 9
REPEATS = 5
ROUND_RUNS = 200
WARMUP = 10
COMMANDS = {
    "python -c pass (baseline)": [PYTHON, "-c", "pass"],
    "onnxprune --help": [*ONNXPRUNE, "--help"],
    "onnxprune --version": [*ONNXPRUNE, "--version"],
    "onnxprune -s 2 x.onnx (argument error)": [*ONNXPRUNE, "-s", "2", "x.onnx"],
    "onnxprune sweep --help": [*ONNXPRUNE, "sweep", "--help"],
}
# What `make demo` runs for its channel model (see the Makefile).
DEMO_CHANNELS = [
    "models/digits_cnn.onnx", "--structured", "--target", "macs", "--sparsity", "0.5",
    "--round-to", "8", "--calibration", "models/digits_calib.npz", "--device", "cpu", "-q",
]  # fmt: skip


def cpu_seconds(command: list[str], tree: Path = ROOT) -> float:
    """User + system CPU seconds of one run of `command` in a fresh process (`python -m
    onnxprune` imports the package of `tree`, the working folder)."""
    proc = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def startup(tree: Path = ROOT) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(RUNS):
        for name, command in COMMANDS.items():
            times[name].append(cpu_seconds(command, tree))
    base = statistics.median(times["python -c pass (baseline)"])
    return {
        name: {"cpu_s": statistics.median(t), "ratio": statistics.median(t) / base}
        for name, t in times.items()
    }


def demo_latency() -> dict[str, object]:
    """Dense against the demo's channel model on ONNX Runtime's CPU provider (default session
    options, as validation makes them), one batch of 32 held-out images, runs interleaved so that
    load from elsewhere hits both alike; REPEATS rounds of ROUND_RUNS runs each, the median ratio
    of each round."""
    import numpy as np
    import onnxruntime as ort

    channels = ROOT / "build" / "digits_cnn.channels.onnx"
    if not channels.is_file():
        channels.parent.mkdir(exist_ok=True)
        subprocess.run([*ONNXPRUNE, *DEMO_CHANNELS, "-o", str(channels)], cwd=ROOT, check=True)
    with np.load(ROOT / "models" / "digits_val.npz") as data:
        feed = {"input": data["input"][:32]}
    sessions = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (ROOT / "models" / "digits_cnn.onnx", channels)
    ]
    ratios = []
    for _ in range(REPEATS):
        times: list[list[float]] = [[], []]
        for _ in range(WARMUP):
            for session in sessions:
                session.run(None, feed)
        for _ in range(ROUND_RUNS):
            for i, session in enumerate(sessions):
                start = time.perf_counter()
                session.run(None, feed)
                times[i].append(time.perf_counter() - start)
        ratios.append(statistics.median(times[1]) / statistics.median(times[0]))
    return {"latency_ratios": ratios, "median_ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also time the demo's channel model")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose start-up to time")
    args = parser.parse_args()
    for name, row in startup(args.tree).items():
        print(f"{name:42s} {row['cpu_s']:.3f} s CPU  x{row['ratio']:.2f} of python -c pass")
    if args.demo:
        demo = demo_latency()
        ratios = ", ".join(f"{r:.3f}" for r in demo["latency_ratios"])  # type: ignore[union-attr]
        print(f"demo channel model latency / dense: median x{demo['median_ratio']:.3f} ({ratios})")


if __name__ == "__main__":
    main()
