"""Structured pruning over torchvision's classification models (`make zoo`; needs torch).

Each model is exported randomly initialised (batch 1, opset 18), pruned at 0.5 structured with no
per-model configuration, checked (onnx.checker full, inside the save), and measured: parameters
and MACs of the Conv/Gemm/MatMul weights before and after, ONNX Runtime CPU latency before and
after, and the zero-channel invariant (zero half the removable channels' producers, remove exactly
those channels, compare outputs). Each model runs in its own process, so one crash or blow-up is
one failed row.

    python bench/zoo.py                    # all models, table on stdout, JSON in build/zoo/
    python bench/zoo.py resnet18 vit_b_16  # some of them
    python bench/zoo.py --round-to 8       # the same N for every model
    python bench/zoo.py --legacy           # TorchScript exporter: dynamic batch, Shape arithmetic
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import onnxprune

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "zoo"
MODELS = {
    "resnet18": 224, "resnet50": 224, "resnext50_32x4d": 224, "wide_resnet50_2": 224,
    "mobilenet_v2": 224, "mobilenet_v3_large": 224, "efficientnet_b0": 224,
    "efficientnet_v2_s": 224, "regnet_y_400mf": 224, "densenet121": 224,
    "shufflenet_v2_x1_0": 224, "squeezenet1_0": 224, "mnasnet1_0": 224, "vgg11": 224,
    "alexnet": 224, "googlenet": 224, "inception_v3": 299, "convnext_tiny": 224,
    "vit_b_16": 224, "swin_t": 224, "maxvit_t": 224,
}  # fmt: skip
SPARSITY = 0.5
ROUND_TO = None  # --round-to N on the command line: the same N for every model
LEGACY = False  # --legacy: the TorchScript exporter (dynamic batch, shapes computed by Shape ops)
TIMEOUT_S = 900


def export(name: str, size: int) -> Path:
    path = OUT / f"{name}{'.ts' if LEGACY else ''}.onnx"
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    if LEGACY:  # with grad on: under no_grad, attention takes a fused path it cannot export
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    else:
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18)
    return path


def latencies_ms(paths: list[Path], feeds: dict, repeats: int = 20) -> list[float]:
    """Median ORT CPU latency of each model, runs interleaved so that load from elsewhere on the
    machine hits them alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths
    ]
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(repeats + 3):
        for session, spent in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= 3:
                spent.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def invariant(path: Path) -> tuple[float, bool]:
    """Max relative output error after removing zeroed channels (0 is perfect), and whether any
    removed channel is normalised by a LayerNorm (which renormalises, so exactness is not due)."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    from onnxprune.rewrite.structured import apply_channel_plan
    from onnxprune.selection.channels import ChannelPlan, counted_weights
    from onnxprune.storage import io
    from tests.builders import run
    from tests.channel_models import analyse, choose, feeds, kill

    proto = onnx.load(str(path))
    model, graph = analyse(proto)
    del proto
    # Random initialisation can leave a model's output constant (ViT's zero head, GoogLeNet's
    # dead ReLUs), and then the check proves nothing: weights get He-normal values first.
    rng = np.random.default_rng(0)
    matmul = {n.inputs[1] for n in model.graph if n.op_type == "MatMul" and len(n.inputs) > 1}
    for value in model.graph.initializers.values():
        array = value.const_value.numpy() if value.const_value is not None else None
        if array is None or array.ndim < 2 or array.dtype != np.float32:
            continue
        fan_in = array.shape[0] if value in matmul else array.size // array.shape[0]
        weights = rng.standard_normal(array.shape) * np.sqrt(2 / max(1, fan_in))
        value.const_value = ir.Tensor(weights.astype(np.float32), name=value.name)
    removed = choose(graph)
    kill(graph, removed)
    data = feeds(ir.serde.serialize_model(model))
    expected = run(ir.serde.serialize_model(model), data)
    apply_channel_plan(model, ChannelPlan(graph, removed, counted_weights(model, graph)))
    out = io.save_model(model, OUT / f"{path.stem}.dead.onnx", force=True, check=True)
    got = run(out, data)
    out.unlink()
    layernorm = any(
        m.node.op_type == "LayerNormalization" and removed[m.ids].any() for m in graph.members
    )
    err = 0.0
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape:
            return float("inf"), layernorm
        err = max(err, float(np.abs(g - e).max() / max(float(np.abs(e).max()), 1e-30)))
    return err, layernorm


def one(name: str) -> dict:
    """Everything for one model; runs in a child process."""
    import numpy as np

    from onnxprune import pipeline

    row: dict = {"model": name}
    try:
        start = time.perf_counter()
        src = export(name, MODELS[name])
        row["export_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        out = OUT / f"{name}{'.ts' if LEGACY else ''}.pruned{ROUND_TO or ''}.onnx"
        _, report = pipeline.prune(
            src,
            SPARSITY,
            output=out,
            force=True,
            structured=onnxprune.Structured(round_to=ROUND_TO),
        )
        row["prune_s"] = round(time.perf_counter() - start, 1)
        plan = report.channels
        row["params"] = list(plan.params)
        row["macs"] = list(plan.macs)
        row["frozen_groups"] = sum(1 for g in plan.graph.groups if g.frozen)
        row["reasons"] = sorted({r for g in plan.graph.groups for r in g.reasons})[:6]
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, MODELS[name], MODELS[name]))}
        import onnxruntime as ort

        input_name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        feeds = {input_name.get_inputs()[0].name: feeds["x"].astype(np.float32)}
        row["latency_ms"] = latencies_ms([src, out], feeds)
        row["status"] = "pruned"
        row["invariant_rel_err"], row["invariant_layernorm"] = invariant(src)
    except Exception as exc:
        row["status"] = "failed"
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        row["reason"] = f"{type(exc).__name__}: {first}"
        row["trace"] = traceback.format_exc()[-2000:]
    return row


def _verdict(row: dict) -> str:
    inv = row.get("invariant_rel_err")
    if inv is None:
        return "-"
    if inv < 1e-5:
        return f"ok ({inv:.0e})"
    if row.get("invariant_layernorm"):
        return f"LN approx ({inv:.0e})"
    return f"FAIL ({inv:.1e})"


def _fmt(row: dict) -> list[str]:
    from onnxprune.report.tables import human_count

    if row["status"] != "pruned" and "params" not in row:
        return [row["model"], "FAILED", row.get("reason", "")[:90], "", "", "", "", ""]
    p, m = row["params"], row["macs"]
    lat = row.get("latency_ms", [float("nan")] * 2)
    mac_ratio = m[1] / m[0]
    lat_ratio = lat[1] / lat[0]
    return [
        row["model"],
        row["status"],
        f"{human_count(p[0])} -> {human_count(p[1])}",
        f"{human_count(m[0])} -> {human_count(m[1])} ({mac_ratio:.2f})",
        f"{lat[0]:.1f} -> {lat[1]:.1f} ms ({lat_ratio:.2f})",
        f"{lat_ratio / mac_ratio:.2f}",
        _verdict(row),
        str(row.get("frozen_groups", "")),
    ]


def main(names: list[str]) -> None:
    from onnxprune.report.tables import format_table

    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names or list(MODELS):
        print(f"zoo: {name} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    name,
                    *(["--round-to", str(ROUND_TO)] if ROUND_TO else []),
                    *(["--legacy"] if LEGACY else []),
                ],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                cwd=ROOT,
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "status": "failed",
                "reason": f"crashed (exit {done.returncode}): {done.stderr.strip()[-200:]}",
            }  # fmt: skip
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "failed", "reason": f"timed out after {TIMEOUT_S}s"}
        rows.append(row)
        if row["status"] != "pruned":
            print(f"zoo: {name}: {row.get('reason')}", file=sys.stderr)
        suffix = f"{'.ts' if LEGACY else ''}{ROUND_TO or ''}"
        (OUT / f"results{suffix}.json").write_text(json.dumps(rows, indent=1))
    headers = ["model", "status", "params", "MACs (ratio)", "ORT CPU latency (ratio)",
               "lat/MAC", "invariant", "frozen groups"]  # fmt: skip
    print(format_table(headers, [_fmt(r) for r in rows]))
    pruned = [r for r in rows if r["status"] == "pruned"]
    exact = [r for r in pruned if r.get("invariant_rel_err", 1) < 1e-5]
    ratios = [
        (r["latency_ms"][1] / r["latency_ms"][0]) / (r["macs"][1] / r["macs"][0]) for r in pruned
    ]
    median = statistics.median(ratios) if ratios else float("nan")
    print(
        f"{'TorchScript' if LEGACY else 'dynamo'} export, round-to {ROUND_TO}: "
        f"{len(pruned)} of {len(rows)} pruned, checked and run; "
        f"{len(exact)} exactly invariant (the rest renormalise in LayerNorm); "
        f"median latency ratio / MAC ratio {median:.2f}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    args = sys.argv[1:]
    if "--round-to" in args:
        at = args.index("--round-to")
        ROUND_TO = int(args[at + 1])
        del args[at : at + 2]
    if "--legacy" in args:
        LEGACY = True
        args.remove("--legacy")
    if len(args) == 2 and args[0] == "--one":
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(one(args[1])))
    else:
        main(args)
