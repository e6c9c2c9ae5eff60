"""Calibrated pruning speed and memory, as a ratio to one ONNX Runtime pass over the same samples.

Model: ResNet-50's layer shapes (models.resnet50: 25.5 M random weights, BatchNorm folded).
Samples: --samples random normal float32 [n, 3, 224, 224] (seed 0), fed in --batch-size batches.
Baseline: one plain ONNX Runtime CPU pass over the samples in a fresh process (session creation
and one warm-up batch not counted). Measured, each in a fresh process: `onnxprune.prune(model,
--sparsity, calibration=Calibration(data, device="cpu", ...))` end to end (model load included,
no output file), broken down by wrapping calibration's functions with timers (capture: ORT and
X^T X sums; scoring and ranking; repair: SparseGPT and bias correction; wall and CPU seconds),
and the plain magnitude prune for reference. Peak memory is each child's VmHWM. The issue asks
for calibrated / ORT pass <= 10 at 128 samples.

--mode defaults to Calibration's default. Sequential mode runs the pruned and the dense model over
all samples once per wave of layers (51 passes on ResNet-50): about 8 s per sample in ORT alone, so
use --samples 16 or 32 with it and scale. On a machine shared with other work, --threads 1 gives
steadier figures than the libraries' default of one thread per core.

    python bench/bench_calibrate.py [--samples 128] [--criterion sparsegpt] [--batch-size 16]
    python bench/bench_calibrate.py --mode one-pass --threads 1 --layers
    python bench/bench_calibrate.py --mode sequential --samples 16 --profile bench/out/seq.prof
    python bench/bench_calibrate.py --structured --mode one-pass     # channels: choose + re-solve

--structured measures calibrated channel removal instead (--sparsity of the MACs, as
`onnxprune --structured --target macs --calibration`): capture, channel scoring, ranking,
the least-squares re-solve of every layer that read a removed channel, and the rewrite.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

from bench_prune import build_model  # bench/ is the script's folder

SEED = 0
SHAPE = (3, 224, 224)
MIB = 2**20


def samples(n: int):
    import numpy as np

    return np.random.default_rng(SEED).standard_normal((n, *SHAPE), dtype=np.float32)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- children: each prints one JSON line --------------------------------------------------------


def child_ort(model: Path, n: int, batch: int) -> dict:
    """One plain ORT CPU pass, the session onnxprune opens for calibration minus the extra
    outputs."""
    from onnxprune.runtime import open_session, select_runtime

    data = samples(n)
    session = open_session(model, select_runtime("cpu"))
    name = session.get_inputs()[0].name
    session.run(None, {name: data[:batch]})  # warm-up, not counted
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        session.run(None, {name: data[i : i + batch]})
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "providers": session.get_providers(),
    }


class Timers:
    """Wall seconds and calls of wrapped functions, by call path (a wrapped call inside another
    is a child of it: its time is part of its parent's), and optionally per layer."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.order: dict[str, int] = {}
        self.layers: dict[str, float] = collections.defaultdict(float)
        self.stack: list[str] = []

    def wrap(self, owner: object, attr: str, key: str, layer=None) -> None:
        """Replace owner.attr by a timed wrapper; `layer(*args)` names the layer a call is for."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            path = " / ".join((*self.stack, key))
            self.order.setdefault(path, len(self.order))
            self.stack.append(key)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.stack.pop()
                self.seconds[path] += spent
                self.cpu[path] += time.process_time() - cpu
                self.calls[path] += 1
                if layer is not None:
                    self.layers[layer(*args, **kwargs)] += spent

        setattr(owner, attr, timed)

    def result(self) -> dict:
        paths = sorted(self.seconds, key=self.order.__getitem__)
        return {
            "parts": [(p, self.seconds[p], self.cpu[p], self.calls[p]) for p in paths],
            "layers": sorted(self.layers.items(), key=lambda item: -item[1]),
        }


def _gram_layer(stats, rows, dense=None) -> str:
    g, k = stats.gram.shape[:2]
    return f"X^T X, K={k}" + (f" G={g}" if g > 1 else "") + " (all layers of that width)"


def _rows_layer(design, activation) -> str:
    return f"im2col {design.signature[0]} of {design.activation.name}, K={design.in_features}"


def instrument(layers: bool) -> Timers:
    """Timers around calibration's stages and their parts, without touching onnxprune's source.

    Module attributes are replaced, so a function counts where it is looked up at call time:
    prune.py imported collect and shift_bias by name, so its own references are wrapped too.
    """
    from onnxprune.calibration import capture
    from onnxprune.calibration import prune as cprune
    from onnxprune.calibration import solvers as reconstruct

    timers = Timers()
    timers.wrap(capture, "collect", "capture")  # the first pass (capture.measure)
    timers.wrap(cprune, "collect", "capture")  # sequential rounds
    timers.wrap(cprune, "_masks", "scoring and ranking")
    timers.wrap(cprune, "repair", "repair")
    timers.wrap(capture, "exposed_model", "serialize the model with layer inputs as outputs")
    timers.wrap(capture, "open_session", "ORT session creation")
    timers.wrap(capture.Runner, "run", "ORT run with every layer input as an output, NaN check")
    timers.wrap(capture, "_chunks", "im2col rows", _rows_layer if layers else None)
    timers.wrap(capture.LayerStats, "add", "X^T X and sums", _gram_layer if layers else None)
    for name in ("inverse_factor", "damped_inverse"):  # cached per layer: the first use pays
        if hasattr(capture, name):
            timers.wrap(capture, name, f"{name} (Cholesky, triangular inverse)")
    timers.wrap(reconstruct, "scores", "scores")
    timers.wrap(reconstruct, "output_energy", "output_energy")
    timers.wrap(cprune, "compare_layers", "compare (lamp sort)")
    timers.wrap(cprune.selection, "plan", "selection.plan")
    timers.wrap(cprune, "_full_mask", "masks")
    timers.wrap(reconstruct, "sparsegpt", "sparsegpt column sweep")
    timers.wrap(reconstruct, "output_error", "output_error")
    timers.wrap(cprune, "shift_bias", "bias shift into the graph")
    return timers


def instrument_channels() -> Timers:
    """Timers around calibrated structured pruning's stages (calibration/channels.py)."""
    from onnxprune.calibration import capture
    from onnxprune.calibration import channels as cchannels
    from onnxprune.calibration import solvers as reconstruct

    timers = Timers()
    timers.wrap(capture, "collect", "capture")  # the first pass (capture.measure)
    timers.wrap(cchannels, "collect", "capture")  # sequential rounds
    timers.wrap(cchannels, "importance", "channel scores (group OBS per consumer)")
    timers.wrap(cchannels, "plan_channels", "ranking (plan_channels)")
    timers.wrap(cchannels, "solve", "least-squares re-solve")
    timers.wrap(cchannels, "apply_channel_plan", "channel removal (rewrite)")
    timers.wrap(cchannels, "_write", "store weights and bias shifts")
    timers.wrap(capture.Runner, "run", "ORT run with every layer input as an output, NaN check")
    timers.wrap(capture, "_chunks", "im2col rows")
    timers.wrap(capture.LayerStats, "add", "X^T X and sums")
    timers.wrap(reconstruct, "damped_inverse", "damped inverse (scores)")
    timers.wrap(reconstruct, "inverse_factor", "inverse factor (re-solve)")
    return timers


def child_prune(model: Path, n: int, batch: int, criterion: str | None, args) -> dict:
    import onnxprune
    from onnxprune.calibration import Calibration

    calibration = None
    timers = None
    if criterion is not None:
        mode = {"mode": args.mode} if args.mode else {}  # else Calibration's default
        if args.rounds:
            mode["rounds"] = args.rounds
        calibration = Calibration(
            data={"input": samples(n)}, criterion=criterion, batch_size=batch, device="cpu", **mode
        )
        timers = instrument_channels() if args.structured else instrument(args.layers)
    profile = cProfile.Profile() if args.profile and criterion is not None else None
    start, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    extra = {"structured": True, "target": "macs"} if args.structured else {}
    _, report = onnxprune.prune(model, args.sparsity, calibration=calibration, **extra)
    if profile is not None:
        profile.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    plan = report.channels if args.structured else report.plan
    result: dict = {
        "seconds": seconds,
        "cpu": cpu,
        "sparsity": plan.achieved if args.structured else plan.sparsity,
    }
    if calibration is not None:
        summary = plan.calibration
        result["mode"] = f"{summary.mode}, {summary.passes} pass(es) over the samples"
    if timers is not None:
        result.update(timers.result())
    if profile is not None:
        profile.dump_stats(args.profile)
    return result


def limit_threads(threads: int) -> None:
    """ONNX Runtime sessions opened from now on (onnxprune's too) use `threads` intra-op threads;
    BLAS got its count from the environment at start (run_child)."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class Options(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.intra_op_num_threads = threads

    ort.SessionOptions = Options


def child(args) -> None:
    if args.threads:
        limit_threads(args.threads)
    model = Path(args.model)
    if args.child == "ort":
        result = child_ort(model, args.samples, args.batch_size)
    elif args.child == "magnitude":
        result = child_prune(model, args.samples, args.batch_size, None, args)
    else:
        result = child_prune(model, args.samples, args.batch_size, args.criterion, args)
    result["vm_hwm"] = peak_rss()
    print(json.dumps(result))


# --- parent ------------------------------------------------------------------------------------


def run_child(kind: str, model: Path, args) -> tuple[dict, int]:
    """A child's JSON result and its peak resident memory (bytes, its VmHWM at the end)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        str(model),
        "--samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--criterion",
        args.criterion,
        "--sparsity",
        str(args.sparsity),
    ]
    if args.mode:
        cmd += ["--mode", args.mode]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    if args.layers:
        cmd.append("--layers")
    if args.structured:
        cmd.append("--structured")
    env = dict(os.environ)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.threads)
    if args.profile and kind == "calibrated":
        cmd += ["--profile", args.profile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, result["vm_hwm"]


def revision() -> str:
    """The commit of the onnxprune measured, and whether its working tree differs."""
    import onnxprune

    root = Path(onnxprune.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "."], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return str(root)
    return f"{root} at {commit or '?'}{' (modified)' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--criterion", default="sparsegpt", choices=("sparsegpt", "wanda"))
    parser.add_argument(
        "--batch-size", type=int, default=16, help="ORT batch, calibration's default 16"
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--mode", choices=("one-pass", "sequential"), help="default: Calibration's default"
    )
    parser.add_argument("--rounds", type=int, help="sequential: at most this many rounds")
    parser.add_argument("--layers", action="store_true", help="im2col and Gram time per layer")
    parser.add_argument("--profile", help="cProfile the calibrated prune into this file")
    parser.add_argument("--no-magnitude", action="store_true", help="skip the magnitude run")
    parser.add_argument(
        "--structured", action="store_true", help="calibrated channel removal (--sparsity of MACs)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="BLAS and ORT intra-op threads in every child (default: the libraries' own, all "
        "cores); 1 gives steadier figures on a machine shared with other work",
    )
    parser.add_argument(
        "--child", choices=("ort", "calibrated", "magnitude"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    model = build_model()
    source = revision()
    load = os.getloadavg()[0]
    ort_result, ort_peak = run_child("ort", model, args)
    cal, cal_peak = run_child("calibrated", model, args)
    mag, mag_peak = (None, 0) if args.no_magnitude else run_child("magnitude", model, args)

    ort_s, cal_s = ort_result["seconds"], cal["seconds"]
    print(
        f"ResNet-50 shape (25.5 M weights), {args.samples} samples {'x'.join(map(str, SHAPE))} "
        f"float32, batch {args.batch_size}, ORT CPU ({ort_result['providers'][0]}), "
        f"{os.cpu_count()} CPUs, {args.threads or 'default'} threads, sparsity {args.sparsity}, "
        f"criterion {args.criterion}, mode {cal['mode']}"
        + (", structured (channels, --sparsity of MACs)" if args.structured else "")
    )
    print(f"onnxprune: {source}")
    ort_c, cal_c = ort_result["cpu"], cal["cpu"]
    print(f"{'':60}{'wall s':>8} {'x ORT':>6} {'CPU s':>8} {'x ORT':>6} {'peak RSS MiB':>12}")

    def row(label: str, wall: float, cpu: float, peak: int | None = None) -> None:
        memory = f" {peak / MIB:12.0f}" if peak is not None else ""
        print(f"{label:60}{wall:8.2f} {wall / ort_s:6.2f} {cpu:8.2f} {cpu / ort_c:6.2f}{memory}")

    row("ORT pass (session, warm-up excluded)", ort_s, ort_c, ort_peak)
    row("calibrated prune, end to end", cal_s, cal_c, cal_peak)
    top_wall = top_cpu = 0.0
    for path, wall, cpu, calls in cal["parts"]:
        depth = path.count(" / ")
        if depth == 0:
            top_wall, top_cpu = top_wall + wall, top_cpu + cpu
        name = path.rsplit(" / ", 1)[-1]
        row("  " * (depth + 1) + name + (f" ({calls}x)" if depth else ""), wall, cpu)
    row("  rest (load, find weights, apply plan)", cal_s - top_wall, cal_c - top_cpu)
    if mag is not None:
        row("magnitude prune (reference)", mag["seconds"], mag["cpu"], mag_peak)
    print(
        f"ratio calibrated / ORT pass: {cal_s / ort_s:.2f} wall, {cal_c / ort_c:.2f} CPU time "
        f"(target <= 10)"
    )
    print(
        f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} "
        "CPUs (other work on the machine stretches wall times; CPU times are this process's)"
    )
    if args.layers:
        print("capture per layer:")
        for label, seconds in cal["layers"]:
            print(f"  {label:70}{seconds:9.2f}")
    if args.profile:
        print(f"cProfile of the calibrated prune: {args.profile} (top 25 by own time)")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
