"""Calibrated pruning's time and memory, against one ONNX Runtime pass over the same samples.

Each run is a fresh child process, so each peak RSS (VmHWM) is its own:
  - ORT pass: one plain ONNX Runtime CPU pass over the samples (session creation and one
    warm-up batch not counted);
  - calibrated: `onnxprune.prune(model, Selection(--sparsity), calibration=Calibration(samples,
    criterion, mode, device="cpu", batch_size))` end to end (model load included, no output
    file), once per --mode; with --structured, Structured(target="macs") channel removal instead.
Printed per run: wall and CPU seconds, wall / ORT pass, peak RSS, peak RSS / model file size,
`report.calibration.passes` (runs of the model or of one segment over the samples), and where
the time went (timers wrapped around capture, the sequential walk's segment runs, X^T X sums and
the solvers). Targets: calibrated <= 10x the ORT pass; peak RSS <= 2x the model + one segment's
statistics (the largest segment's paired sums, 3 K^2 float64 per layer input).

Models: --model resnet50 (default), ResNet-50's layer shapes with random weights
(bench/models.py), fed --samples random normal 3x224x224 images (seed 0); --model decoder, the
LLaMA-style decoder export in --decoder-dir with its calibration token sequences (calib.npz:
input_ids, attention_mask; calib128.npz past 32).

    python bench/bench_calibrate.py --samples 32 --batch-size 16            # both modes
    python bench/bench_calibrate.py --mode one-pass --threads 1
    python bench/bench_calibrate.py --model decoder --mode sequential
    python bench/bench_calibrate.py --mode sequential --samples 16 --profile bench/out/seq.prof
    python bench/bench_calibrate.py --structured --mode one-pass     # channels: choose + re-solve
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import inspect
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

SEED = 0
SHAPE = (3, 224, 224)
MIB = 2**20
HERE = Path(__file__).resolve().parent
DECODER_DIR = Path("/work/wt/redesign/build/decoder")
MODES = ("one-pass", "sequential")
# the onnxprune of this checkout, whatever the environment's editable install points at
sys.path.insert(0, str(HERE.parent))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def samples(args) -> dict:
    """The calibration samples as input name -> array (samples on axis 0)."""
    import numpy as np

    if args.model == "resnet50":
        rng = np.random.default_rng(SEED)
        return {"input": rng.standard_normal((args.samples, *SHAPE), dtype=np.float32)}
    folder = Path(args.decoder_dir)
    path = folder / ("calib.npz" if args.samples <= 32 else "calib128.npz")
    with np.load(path) as data:
        found = {k: data[k] for k in data.files}
    if len(next(iter(found.values()))) < args.samples:
        raise SystemExit(f"{path} holds fewer than {args.samples} sequences")
    return {k: v[: args.samples] for k, v in found.items()}


def model_bytes(model: Path) -> int:
    """The model file's size, its external data files included."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    files = {model}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            files.add(model.parent / entry["location"])
    return sum(f.stat().st_size for f in files)


# --- children: each prints one JSON line --------------------------------------------------------


def child_ort(model: Path, args) -> dict:
    """One plain ORT CPU pass: the session onnxprune opens for calibration, minus the extra
    outputs."""
    from onnxprune.runtime import open_session, select_runtime

    data = samples(args)
    n, batch = args.samples, args.batch_size
    session = open_session(model, select_runtime("cpu"))
    session.run(None, {k: v[:batch] for k, v in data.items()})  # warm-up, not counted
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        session.run(None, {k: v[i : i + batch] for k, v in data.items()})
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "providers": session.get_providers(),
    }


class Timers:
    """Wall seconds and calls of wrapped functions by call path (a wrapped call inside another
    is a child of it). A generator function is timed inside its steps only, not while its
    consumer works between them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.order: dict[str, int] = {}
        self.stack: list[str] = []

    def _enter(self, key: str) -> tuple[str, float, float]:
        path = " / ".join((*self.stack, key))
        self.order.setdefault(path, len(self.order))
        self.stack.append(key)
        return path, time.perf_counter(), time.process_time()

    def _leave(self, path: str, start: float, cpu: float, call: bool) -> None:
        self.stack.pop()
        self.seconds[path] += time.perf_counter() - start
        self.cpu[path] += time.process_time() - cpu
        self.calls[path] += call

    def wrap(self, owner: object, attr: str, key: str) -> None:
        """Replace owner.attr (looked up at call time by its callers) by a timed wrapper."""
        original = getattr(owner, attr, None)
        if original is None:
            return  # renamed since: that part is not broken down
        if inspect.isgeneratorfunction(original):

            @functools.wraps(original)
            def stepped(*args, **kwargs):
                inner = original(*args, **kwargs)
                first = True
                while True:
                    path, start, cpu = self._enter(key)
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        self._leave(path, start, cpu, first)
                        first = False
                    yield item

            setattr(owner, attr, stepped)
            return

        @functools.wraps(original)
        def timed(*args, **kwargs):
            path, start, cpu = self._enter(key)
            try:
                return original(*args, **kwargs)
            finally:
                self._leave(path, start, cpu, True)

        setattr(owner, attr, timed)

    def result(self) -> list:
        paths = sorted(self.seconds, key=self.order.__getitem__)
        return [(p, self.seconds[p], self.cpu[p], self.calls[p]) for p in paths]


def instrument(found: dict) -> Timers:
    """Timers around calibration's stages, without touching onnxprune's source; `found` gets
    the sequential walk's segment count and its largest segment's statistics (bytes)."""
    from onnxprune.calibration import capture, solvers, walk
    from onnxprune.repair import channels as repair_channels
    from onnxprune.repair import weights as repair_weights
    from onnxprune.scoring import channels as scoring_channels
    from onnxprune.scoring import weights as scoring_weights

    timers = Timers()
    timers.wrap(capture, "measure", "first pass: dense model, every layer's X^T X")
    timers.wrap(capture.Runner, "run", "ORT run, layer inputs as outputs")
    timers.wrap(capture.LayerStats, "add", "X^T X sums")
    timers.wrap(scoring_weights, "weight_scores", "scoring")
    timers.wrap(scoring_channels, "channel_importance", "channel scoring")
    timers.wrap(repair_weights.RepairWeightsPass, "call", "repair")
    timers.wrap(repair_channels.RefitChannelsPass, "call", "repair (re-solve)")
    timers.wrap(walk.SequentialWalk, "rounds", "sequential walk (between repairs)")
    timers.wrap(walk, "run_segment", "segment runs (ORT, sessions included)")
    timers.wrap(walk, "paired_chunks", "im2col rows, pruned and dense")
    for name in ("inverse_factor", "sparsegpt", "refit", "output_error", "resolve_inputs"):
        timers.wrap(solvers, name, f"solvers.{name}")

    made = walk.SequentialWalk.__init__

    def counted(self, *args, **kwargs):
        made(self, *args, **kwargs)
        biggest = 0
        for segment in self.segments:
            designs, _ = capture.plan_designs(self.model, [self.weights[i] for i in segment.layers])
            keys = {capture.design_key(d): d for ds in designs.values() for d in ds}
            size = sum(3 * 8 * d.groups * d.in_features**2 for d in keys.values())
            biggest = max(biggest, size)
        found["segments"] = found.get("segments", 0) + len(self.segments)
        found["segment_stats"] = max(found.get("segment_stats", 0), biggest)

    walk.SequentialWalk.__init__ = counted
    return timers


def child_prune(model: Path, args) -> dict:
    import onnxprune
    from onnxprune.options import Calibration, Selection, Structured

    calibration = Calibration(
        data=samples(args),
        criterion=args.criterion,
        mode=args.mode[0],
        device="cpu",
        batch_size=args.batch_size,
    )
    found: dict = {}
    timers = instrument(found)
    select = Selection(args.sparsity, exclude=("lm_head",) if args.model == "decoder" else ())
    structured = Structured(target="macs") if args.structured else False
    profile = cProfile.Profile() if args.profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    _, report = onnxprune.prune(model, select, structured=structured, calibration=calibration)
    if profile is not None:
        profile.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    summary = report.calibration
    result: dict = {
        "seconds": seconds,
        "cpu": cpu,
        "sparsity": report.channels.achieved if args.structured else report.sparsity,
        "passes": getattr(summary, "passes", None),
        "parts": timers.result(),
        **found,
    }
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
    model = Path(args.model_path)
    result = child_ort(model, args) if args.child == "ort" else child_prune(model, args)
    result["vm_hwm"] = peak_rss()
    print(json.dumps(result))


# --- parent ------------------------------------------------------------------------------------


def run_child(kind: str, model: Path, args, mode: str | None = None) -> dict:
    """A child's JSON result; its "vm_hwm" is its peak resident memory (bytes)."""
    cmd = [sys.executable, __file__, "--child", kind, "--model-path", str(model)]
    cmd += ["--model", args.model, "--decoder-dir", str(args.decoder_dir)]
    cmd += ["--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    cmd += ["--criterion", args.criterion, "--sparsity", str(args.sparsity)]
    if mode is not None:
        cmd += ["--mode", mode]
    if args.structured:
        cmd.append("--structured")
    env = dict(os.environ)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.threads)
    if args.profile and mode is not None:
        cmd += ["--profile", profile_path(args, mode)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} {mode or ''} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def loadavg() -> list[str]:
    with open("/proc/loadavg") as file:
        return file.read().split()[:3]


def profile_path(args, mode: str) -> str:
    if len(args.mode) == 1:
        return args.profile
    path = Path(args.profile)
    return str(path.with_name(f"{path.stem}.{mode}{path.suffix}"))


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
    parser.add_argument("--model", default="resnet50", choices=("resnet50", "decoder"))
    parser.add_argument("--decoder-dir", type=Path, default=DECODER_DIR)
    parser.add_argument("--export", default="decoder.legacy.onnx", help="decoder: the export")
    parser.add_argument(
        "--samples", type=int, help="default: 128 images (resnet50), 32 sequences (decoder)"
    )
    parser.add_argument("--criterion", default="sparsegpt", choices=("sparsegpt", "wanda"))
    parser.add_argument(
        "--batch-size", type=int, default=16, help="ORT batch, calibration's default 16"
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--mode", action="append", choices=MODES, help="repeatable; default: both modes"
    )
    parser.add_argument(
        "--profile",
        help="cProfile each calibrated prune into this file (.MODE before the "
        "suffix when both modes run)",
    )
    parser.add_argument(
        "--structured", action="store_true", help="calibrated channel removal (--sparsity of MACs)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="BLAS and ORT intra-op threads in every child (default: the libraries' own, all "
        "cores); 1 gives steadier figures on a machine shared with other work",
    )
    parser.add_argument("--child", choices=("ort", "calibrated"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 128 if args.model == "resnet50" else 32
    args.mode = list(dict.fromkeys(args.mode or MODES))
    if args.child:
        child(args)
        return

    if args.model == "resnet50":
        sys.path.insert(0, str(HERE))
        from bench_prune import build_model

        model = build_model()
        image = "x".join(map(str, SHAPE))
        what = f"ResNet-50 shapes (25.5 M weights), {args.samples} images {image}"
    else:
        model = args.decoder_dir / args.export
        what = f"decoder {model}, {args.samples} token sequences (lm_head excluded)"
    size = model_bytes(model)
    source = revision()
    load = loadavg()
    ort = run_child("ort", model, args)
    runs = {mode: run_child("calibrated", model, args, mode) for mode in args.mode}
    load_after = loadavg()

    print(
        f"{what}, batch {args.batch_size}, ORT CPU ({ort['providers'][0]}), "
        f"{os.cpu_count()} CPUs, {args.threads or 'default'} threads, sparsity {args.sparsity}, "
        f"criterion {args.criterion}" + (", structured (MACs)" if args.structured else "")
    )
    print(f"model file {size / MIB:.1f} MiB; onnxprune: {source}")
    print(f"load average {' '.join(load)} before, {' '.join(load_after)} after")
    ort_s, ort_c = ort["seconds"], ort["cpu"]
    print(
        f"{'':58}{'wall s':>8} {'x ORT':>6} {'CPU s':>8} {'x ORT':>6} "
        f"{'peak MiB':>9} {'x model':>7} {'passes':>6}"
    )

    def row(label, wall, cpu, peak=None, passes=None) -> None:
        tail = f" {peak / MIB:9.0f} {peak / size:7.2f}" if peak is not None else ""
        tail += f" {passes:>6}" if passes is not None else ""
        print(f"{label:58}{wall:8.2f} {wall / ort_s:6.2f} {cpu:8.2f} {cpu / ort_c:6.2f}{tail}")

    row("ORT pass (session, warm-up excluded)", ort_s, ort_c, ort["vm_hwm"])
    for mode, cal in runs.items():
        row(f"calibrated, {mode}, end to end", cal["seconds"], cal["cpu"], cal["vm_hwm"],
            cal["passes"])  # fmt: skip
        top_wall = top_cpu = 0.0
        for path, wall, cpu, calls in cal["parts"]:
            depth = path.count(" / ")
            if depth == 0:
                top_wall, top_cpu = top_wall + wall, top_cpu + cpu
            row("  " * (depth + 1) + path.rsplit(" / ", 1)[-1] + f" ({calls}x)", wall, cpu)
        row("  rest (load, find weights, plan, apply)", cal["seconds"] - top_wall,
            cal["cpu"] - top_cpu)  # fmt: skip
    print()
    for mode, cal in runs.items():
        ratio, peak = cal["seconds"] / ort_s, cal["vm_hwm"]
        parts = [
            f"{mode}: {ratio:.1f}x the ORT pass (target <= 10: "
            + ("met)" if ratio <= 10 else "not met)"),
            f"peak RSS {peak / MIB:.0f} MiB = {peak / size:.2f}x the model, "
            f"{(peak - ort['vm_hwm']) / MIB:.0f} MiB above the ORT pass's peak",
        ]
        if "segments" in cal:
            stats = cal["segment_stats"]
            bound = 2 * size + stats
            parts.append(
                f"{cal['segments']} segments, the largest's statistics {stats / MIB:.0f} MiB: "
                f"2x model + that = {bound / MIB:.0f} MiB ("
                + ("met)" if peak <= bound else "not met)")
            )
        parts.append(f"sparsity {cal['sparsity']:.3f}")
        print("; ".join(parts))
    if args.profile:
        for mode in args.mode:
            path = profile_path(args, mode)
            print(f"cProfile of the {mode} prune: {path} (top 25 by own time)")
            pstats.Stats(path).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
