"""How the current onnxprune handles real exporters' graph shapes: models/exports/DIAGNOSTIC.md.

Runs the onnxprune CLI (`.venv/bin/onnxprune`, a subprocess per run, so a crash is one row) on
every model in models/exports/ and on every tests/export_builders.py model, in each mode below,
and records the exit code, the last stderr lines, the wall time, what the JSON report says
(sparsity reached, layers pruned, skipped, not reached) and the validation numbers. It then
checks what a report cannot say about itself:

- every float constant of 1024 or more elements and 2 or more dims (initializers and
  Constant nodes, subgraphs included) should be in the report (pruned, skipped with a reason,
  or not reached); the ones that are not were passed over in silence;
- the zeros actually written, against the zeros the report claims;
- fixed, non-learned tensors (an STFT basis, YOLO's DFL projection) must come out unchanged;
- the outputs' cosine to the dense model after 0.5 magnitude.

    .venv/bin/python bench/exports_diagnostic.py                 # everything (about 10 min)
    .venv/bin/python bench/exports_diagnostic.py crepe_like vad  # models whose name contains
    .venv/bin/python bench/exports_diagnostic.py --no-full-width # skip the 33 MB CREPE layer
    .venv/bin/python bench/exports_diagnostic.py --from-json bench/out/exports/diagnostic.json

With model names, the rows are merged into bench/out/exports/diagnostic.json and no markdown
is written; --from-json redoes the file checks on what the runs left and writes the markdown.

Outputs go to bench/out/exports/ (git-ignored); the table to models/exports/DIAGNOSTIC.md
(only when every model ran, unless --markdown names another file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import export_builders as eb  # noqa: E402

EXPORTS = ROOT / "models" / "exports"
OUT = ROOT / "bench" / "out" / "exports"
CLI = ROOT / ".venv" / "bin" / "onnxprune"
BIG = 1024  # elements: a float constant this large is a weight a pruner should account for
TIMEOUT_S = 300
MEMORY_LIMIT = 16 << 30  # address space of one run: the machine has 24 GiB
FIXED = ("basis", "dfl")  # names of tensors that are signal processing, not learned weights

# (mode, arguments); {C} and {V} are the calibration and validation files
MODES: list[tuple[str, list[str]]] = [
    ("mag 0.5 (generated inputs)", ["-s", "0.5", "--validate"]),
    ("mag 0.5 --data", ["-s", "0.5", "--data", "{V}"]),
    ("structured 0.3 (generated inputs)", ["--structured", "-s", "0.3", "--validate"]),
    ("sparsegpt 0.5", ["-s", "0.5", "--calibration", "{C}", "--data", "{V}"]),
    ("structured 0.3", ["--structured", "-s", "0.3", "--data", "{V}"]),
    ("structured 0.3 macs", ["--structured", "--target", "macs", "-s", "0.3", "--data", "{V}"]),
    ("structured 0.3 calibrated",
     ["--structured", "-s", "0.3", "--calibration", "{C}", "--data", "{V}"]),
    ("2:4", ["--pattern", "2:4", "--data", "{V}"]),
]
SHAPES = {  # sizes of generated inputs the model leaves open (a sequence, an image width)
    "vad_silero_like": ["input=1x512", "state=2x1x128"],
    "builder:vad_lstm": ["input=1x64", "state=2x1x32"],
    "bert_tiny": ["input_ids=1x16", "attention_mask=1x16", "token_type_ids=1x16"],
    "paddle_ocr_rec": ["x=1x3x32x96"],
    "builder:paddle_ocr_opset11": ["x=1x3x16x64"],
}
FULL_WIDTH_MODES = {"mag 0.5 (generated inputs)", "sparsegpt 0.5", "structured 0.3 calibrated"}


@dataclass
class Subject:
    """A model to run: where it is, its data files, where it came from."""

    name: str
    path: Path
    calib: Path | None
    val: Path | None
    origin: str
    modes: set[str] | None = None  # None: every mode
    # --input-shape for the runs on generated inputs, where a dim is symbolic off axis 0
    shapes: list[str] = field(default_factory=list)


@dataclass
class Row:
    model: str
    mode: str
    command: str
    exit_code: int | None
    seconds: float
    stderr_tail: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


# -- what a model holds ---------------------------------------------------------------------------
def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def big_float_constants(model: onnx.ModelProto, least: int = BIG) -> dict[str, np.ndarray]:
    """Float initializers and Constant node values with >= `least` elements, in every graph."""
    found: dict[str, np.ndarray] = {}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}  # fmt: skip
    for graph in _graphs(model.graph):
        tensors = [(t.name, t) for t in graph.initializer]
        for node in graph.node:
            if node.op_type == "Constant":
                tensors += [(node.output[0], a.t) for a in node.attribute if a.name == "value"]
        for name, tensor in tensors:
            if tensor.data_type in floats and int(np.prod(tensor.dims)) >= least:
                found[name] = numpy_helper.to_array(tensor)
    return found


def readers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Op types that read each value, in any graph (subgraphs read outer values by name)."""
    found: dict[str, list[str]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                if name:
                    found.setdefault(name, []).append(node.op_type)
            for attr in node.attribute:  # an If/Loop body's outer-scope reads count for the node
                bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for body in bodies:
                    inner = {o for n in body.node for o in n.output}
                    for sub in _graphs(body):
                        for n in sub.node:
                            for name in n.input:
                                if name and name not in inner:
                                    found.setdefault(name, []).append(n.op_type)
    return {k: sorted(set(v)) for k, v in found.items()}


def _report_names(report: dict[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """Names the JSON report gives: pruned layers, skipped, not reached (weights and nodes)."""
    layers = report.get("layers") or []
    listed = {x.get("name") for x in layers} | {x.get("weight") for x in layers}
    for x in layers:
        listed |= set(x.get("nodes") or [])
    skipped = {x.get("name") for x in report.get("skipped") or []}
    unreached = set()
    for x in report.get("unreached") or []:
        unreached |= {x.get("weight"), x.get("name")}
    return {n for n in listed if n}, {n for n in skipped if n}, {n for n in unreached if n}


# -- one run ---------------------------------------------------------------------------------------
def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _paths(model: str, mode: str) -> tuple[Path, Path]:
    """Where a run's JSON report and pruned model go."""
    slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in mode)
    tag = f"{model.replace(':', '_')}.{slug}"
    return OUT / f"{tag}.json", OUT / f"{tag}.onnx"


def run_one(subject: Subject, mode: str, args: list[str]) -> Row:
    """Run the CLI once; read back the report and the pruned model."""
    report_path, out_model = _paths(subject.name, mode)
    for stale in (out_model, report_path):
        stale.unlink(missing_ok=True)
    filled = [a.replace("{C}", str(subject.calib)).replace("{V}", str(subject.val)) for a in args]
    if "--validate" in filled:
        for shape in subject.shapes:
            filled += ["--input-shape", shape]
    argv = [str(CLI), str(subject.path), *filled, "-o", str(out_model), "--force",
            "--report", str(report_path), "--device", "cpu"]  # fmt: skip
    shown = shlex.join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in argv)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S,
                              preexec_fn=_limit_memory, cwd=ROOT)  # fmt: skip
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        raw = exc.stderr or ""
        stderr = raw.decode() if isinstance(raw, bytes) else raw
        stderr += f"\n(killed after {TIMEOUT_S} s)"
    seconds = time.perf_counter() - start
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    row = Row(subject.name, mode, shown, code, seconds, tail)
    if report_path.exists():
        summarise(row, subject, json.loads(report_path.read_text()), out_model)
    elif code == 0:
        row.flags.append("exit 0 but no JSON report written")
    return row


def summarise(row: Row, subject: Subject, report: dict[str, Any], out_model: Path) -> None:
    """The report's numbers, and the checks against the model files themselves."""
    s = row.summary
    structured = bool(report.get("structured"))
    s["achieved"] = report.get("achieved_sparsity")
    if structured:
        s["params"] = report.get("params")
        s["channels_removed"] = report.get("channels_removed")
        s["frozen_groups"] = len(report.get("frozen_groups") or [])
    else:
        s["prunable"] = report.get("prunable_weights")
        s["zeros_claimed"] = report.get("zeros_after")
    validation = report.get("validation") or {}
    if validation:
        outs = validation.get("outputs") or []
        s["cosine"] = {o.get("name"): o.get("cosine") for o in outs}
        s["min_cosine"] = validation.get("min_cosine")
        s["agreement"] = validation.get("top1_agreement")
        s["accuracy_drop"] = validation.get("accuracy_drop")
        s["generated_inputs"] = validation.get("generated_inputs")
    warnings = report.get("warnings") or []
    s["warnings"] = len(warnings)

    source = onnx.load(str(subject.path))
    # 1-D tensors are biases and normalisation parameters, never weights
    big = {n: a for n, a in big_float_constants(source).items() if a.ndim >= 2}
    listed, skipped, unreached = _report_names(report)
    s["big_constants"] = len(big)
    s["in_report"] = sum(1 for n in big if n in listed | skipped | unreached)
    silent = sorted(n for n in big if n not in listed | skipped | unreached)
    if silent:
        read_by = readers(source)
        described = {n: "/".join(read_by.get(n, ["nothing"])) for n in silent}
        s["not_in_report"] = described
        # embedding tables (read by Gather alone) are left out of the report by design
        odd = {n: r for n, r in described.items() if r != "Gather"}
        if odd:
            shown = ", ".join(f"{n} (read by {r})" for n, r in list(odd.items())[:6])
            row.flags.append(f"{len(odd)} of {len(big)} float constants >= {BIG} elements "
                             f"not in the report: {shown}" + (" ..." if len(odd) > 6 else ""))
    if not out_model.exists():
        return
    written = onnx.load(str(out_model))
    pruned = big_float_constants(written, least=1)
    every = big_float_constants(source, least=1)
    if not structured:
        # the zeros the report claims, counted in the tensors it names, in the written file
        named = [x.get("name") for x in report.get("layers") or [] if x.get("name") in every]
        before = sum(int((every[n] == 0).sum()) for n in named)
        after = sum(int((pruned[n] == 0).sum()) for n in named if n in pruned)
        s["zeros_written"] = after - before
        claimed = (report.get("zeros_after") or 0) - (report.get("zeros_before") or 0)
        if claimed and after - before < 0.99 * claimed:
            row.flags.append(f"report claims {claimed} new zeros; the tensors it names hold "
                             f"{after - before} more zeros in the written file")
    for name, array in every.items():
        if any(f in name.lower() for f in FIXED):
            new = pruned.get(name)
            if new is None:
                row.flags.append(f"fixed tensor {name} gone or renamed in the output")
            elif new.shape != array.shape or not np.array_equal(new, array):
                zeros = float((new == 0).mean()) if new.size else 0.0
                row.flags.append(f"fixed tensor {name} changed: {array.shape} -> {new.shape}, "
                                 f"{zeros:.0%} zeros")  # fmt: skip
    cos = s.get("min_cosine")
    # builders hold random weights: their cosines are recorded, not flagged
    quality = not subject.name.startswith("builder:")
    if quality and cos is not None and (cos != cos or cos < 0.9) and row.mode.startswith(
        ("mag", "sparse")):
        row.flags.append(f"min output cosine {cos:.3f} after {row.mode}")
    if validation and validation.get("generated_inputs"):
        s["inputs"] = "generated"
    if subject.val is not None:
        own = own_check(subject, out_model)
        s["own"] = own
        if "error" in own:
            row.flags.append(f"the pruned model does not run on the validation data: "
                             f"{own['error']}")
            return
        worst = min(own["centred_cosine"].values(), default=1.0)
        if not quality:
            return
        if worst < 0.9 and (cos is None or cos >= 0.95):
            row.flags.append(f"reported cosine {cos if cos is None else round(cos, 4)} hides a "
                             f"change: cosine of the outputs minus the dense mean (per position) "
                             f"is {worst:.3f} ({own['centred_cosine']})")
        if s.get("inputs") == "generated" and worst < 0.9:
            row.flags.append(f"on the validation data (not the generated inputs onnxprune "
                             f"validated on) the centred output cosine is {worst:.3f}")


def _sample_axis(name: str, shape: tuple[int, ...]) -> int:
    """The batch axis of an output: 1 for a recurrent state [2, N, H] (Silero), else 0."""
    return 1 if name.lower().endswith("staten") and len(shape) == 3 else 0


def _run_all(path: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs on all samples; one sample at a time where the model's batch is fixed at 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name: i for i in session.get_inputs()}
    feeds = {k: v for k, v in data.items() if k in inputs}
    first = inputs[next(iter(inputs))].shape
    if first and first[0] == 1 and len(next(iter(feeds.values()))) > 1:
        parts = [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})
                 for i in range(len(next(iter(feeds.values()))))]  # fmt: skip
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}
    return dict(zip(names, session.run(None, feeds), strict=True))


def own_check(subject: Subject, out_model: Path) -> dict[str, Any]:
    """Dense and pruned outputs on the validation data, computed here: the plain cosine and the
    cosine after subtracting the dense outputs' mean over samples (constant parts, such as
    YOLO's anchor grid in its box coordinates, make a plain cosine look perfect)."""
    data = dict(np.load(subject.val))
    try:
        dense, pruned = _run_all(subject.path, data), _run_all(out_model, data)
    except Exception as exc:  # the diagnostic records it; a failed run is a finding
        return {"error": str(exc).splitlines()[0][:300]}
    plain, centred, max_err = {}, {}, {}
    for name, d in dense.items():
        p = pruned[name].astype(np.float64)
        d = d.astype(np.float64)
        if p.shape != d.shape:
            return {"error": f"output {name}: shape {p.shape} against the dense {d.shape}"}
        mean = d.mean(axis=_sample_axis(name, d.shape), keepdims=True)
        plain[name] = round(_cosine(d, p), 4)
        centred[name] = round(_cosine(d - mean, p - mean), 4)
        max_err[name] = float(np.abs(d - p).max()) if d.size else 0.0
    return {"cosine": plain, "centred_cosine": centred, "max_abs_err": max_err}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


# -- what to run -----------------------------------------------------------------------------------
def export_subjects() -> list[Subject]:
    readme_origin = {
        "vad_silero_like": "torch.jit.script + torch.onnx.export(dynamo=False)",
        "crepe_like": "torch.onnx.export(dynamo=False, do_constant_folding=False)",
        "yolov8_like": "torch.onnx.export(dynamo=False)",
        "bert_tiny": "transformers BertModel + torch.onnx.export(dynamo=False)",
        "magika_like": "tensorflow + tf2onnx",
        "paddle_ocr_rec": "paddle2onnx (input dims patched to -1)",
        "paddle_cls": "paddle2onnx (input dims patched to -1)",
    }
    subjects = []
    for path in sorted(EXPORTS.glob("*.onnx")):
        name = path.stem
        calib, val = EXPORTS / f"{name}_calib.npz", EXPORTS / f"{name}_val.npz"
        subjects.append(Subject(name, path, calib if calib.exists() else None,
                                val if val.exists() else None,
                                readme_origin.get(name, "export"),
                                shapes=SHAPES.get(name, [])))  # fmt: skip
    return subjects


def _builder_data(name: str, model: onnx.ModelProto, samples: int) -> tuple[Path, Path]:
    """Calibration and validation .npz for a builder's model, from its `feeds`."""
    paths = []
    for kind, seed in (("calib", 1), ("val", 2)):
        data = eb.feeds(model, batch=samples, seed=seed)
        path = OUT / f"builder_{name}_{kind}.npz"
        np.savez(path, **data)
        paths.append(path)
    return paths[0], paths[1]


def builder_subjects(full_width: bool) -> list[Subject]:
    subjects = []
    builders = dict(eb.all_builders())
    if full_width:
        builders["crepe_full_width"] = eb.crepe_like(channels=1024, out_channels=128)
    for name, model in builders.items():
        path = OUT / f"builder_{name}.onnx"
        onnx.save(model, str(path))
        calib, val = _builder_data(name, model, 8 if name == "crepe_full_width" else 32)
        modes = FULL_WIDTH_MODES if name == "crepe_full_width" else None
        subjects.append(Subject(f"builder:{name}", path, calib, val,
                                "tests/export_builders.py", modes,
                                SHAPES.get(f"builder:{name}", [])))  # fmt: skip
    return subjects


# -- the table -------------------------------------------------------------------------------------
def _status(row: Row) -> str:
    if row.exit_code is None:
        return "TIMEOUT"
    if row.exit_code == 0:
        return "ok" if not row.flags else "ok?"
    return f"exit {row.exit_code}"


def _cell(row: Row) -> str:
    s = row.summary
    parts = [_status(row)]
    if row.exit_code == 0 and s.get("min_cosine") is not None:
        parts.append(f"cos {s['min_cosine']:.3f}")
    if row.exit_code == 0 and s.get("accuracy_drop") is not None:
        parts.append(f"drop {s['accuracy_drop']:.3f}")
    centred = (s.get("own") or {}).get("centred_cosine")
    if row.exit_code == 0 and centred:
        parts.append(f"[c {min(centred.values()):.3f}]")
    return " ".join(parts)


def _cause(row: Row) -> str:
    """The error line without the paths that make each run's message its own."""
    text = row.stderr_tail[-1] if row.stderr_tail else f"exit {row.exit_code}, nothing on stderr"
    for path in (str(EXPORTS) + "/", str(OUT) + "/", str(ROOT) + "/"):
        text = text.replace(path, "")
    return text.strip()


def _numbers(row: Row) -> str:
    s = row.summary
    parts = []
    if s.get("achieved") is not None:
        parts.append(f"reached {s['achieved']:.3f}")
    if s.get("min_cosine") is not None:
        parts.append(f"min cos {s['min_cosine']:.3f}")
    if s.get("agreement") is not None:
        parts.append(f"top1 agree {s['agreement']:.3f}")
    if s.get("accuracy_drop") is not None:
        parts.append(f"acc drop {s['accuracy_drop']:.3f}")
    own = s.get("own") or {}
    if own.get("centred_cosine"):
        parts.append("own centred cos " + ", ".join(
            f"{k} {v:.3f}" for k, v in own["centred_cosine"].items()))
    if "big_constants" in s:
        parts.append(f"big consts in report {s['in_report']}/{s['big_constants']}")
    if s.get("inputs") == "generated":
        parts.append("generated inputs")
    return "; ".join(parts)


def markdown(rows: list[Row], subjects: list[Subject], started: str) -> str:
    modes = [m for m, _ in MODES]
    lines = [
        "# onnxprune on real exporters' graph shapes: diagnostic",
        "",
        f"Generated by `.venv/bin/python bench/exports_diagnostic.py` ({started}; onnxprune at "
        f"commit `{_commit()}`). Every row ran the CLI in a subprocess with `--device cpu`, a "
        f"timeout ({TIMEOUT_S} s; a killed run's stderr says the one it had) and a "
        f"{MEMORY_LIMIT >> 30} GiB address-space limit; outputs "
        "and JSON reports in bench/out/exports/ (git-ignored). `ok?` = exit 0 with a "
        "suspicious finding (see the flags). Checks made against the files, not taken from "
        f"the report: every float constant of >= {BIG} elements and >= 2 dims "
        "(initializers and Constant nodes, If/Loop bodies included) must be named in the "
        "report (layers, skipped or unreached); the zeros written must match the zeros "
        "claimed; fixed tensors (names containing `basis` or `dfl`, any size) must be "
        "unchanged; the outputs' cosine to the dense model after 0.5 magnitude / sparsegpt "
        "should stay >= 0.9 (flagged for the exports only: the `builder:` models hold "
        "random weights, so their cosines are recorded, not judged). Timings are wall time "
        "on a shared 2-core machine whose load average was 5 to 6 during the run (other "
        "work): compare them only roughly.",
        "",
        "## Summary",
        "",
        "| model | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    by = {(r.model, r.mode): r for r in rows}
    for subject in subjects:
        cells = []
        for m in modes:
            r = by.get((subject.name, m))
            cells.append("-" if r is None else _cell(r))
        lines.append(f"| {subject.name} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: status; `cos`: onnxprune's reported smallest output cosine to the "
              "dense model (on its generated inputs in the two `generated inputs` columns, "
              "else on the validation data); `drop`: its top-1 accuracy drop where the data "
              "have labels; `[c ...]`: this script's own check on the validation data, the "
              "smallest cosine over outputs after subtracting the dense outputs' mean over "
              "samples (per position), which a constant part of an output (YOLO's anchor "
              "grid) cannot hide. `-`: not run (no data for that mode).",
              "", "## Failures by cause", ""]
    causes: dict[str, list[Row]] = {}
    for r in rows:
        if r.exit_code != 0:
            causes.setdefault(_cause(r), []).append(r)
    for cause, hit in sorted(causes.items(), key=lambda kv: -len(kv[1])):
        models = sorted({r.model for r in hit})
        lines.append(f"- `{_md(cause)}`: {len(hit)} run(s); " + "; ".join(
            f"{m} ({', '.join(r.mode for r in hit if r.model == m)})" for m in models))
    lines += ["", "## Failures and flags, run by run", ""]
    for r in rows:
        if r.exit_code != 0 or r.flags:
            why = r.stderr_tail[-1] if r.exit_code != 0 and r.stderr_tail else "; ".join(r.flags)
            lines.append(f"- **{r.model}**, {r.mode}: {_status(r)}: {_md(why)}")
    lines += ["", "## Every run", ""]
    for subject in subjects:
        lines += [f"### {subject.name}", "", f"`{os.path.relpath(subject.path, ROOT)}`; "
                  f"made by {subject.origin}.", ""]  # fmt: skip
        for r in rows:
            if r.model != subject.name:
                continue
            lines.append(f"- {r.mode}: **{_status(r)}** in {r.seconds:.1f} s"
                         + (f"; {_numbers(r)}" if _numbers(r) else ""))  # fmt: skip
            lines.append(f"  - `{r.command}`")
            for f in r.flags:
                lines.append(f"  - flag: {_md(f)}")
            quiet = r.summary.get("not_in_report") or {}
            expected = [n for n, rd in quiet.items() if rd == "Gather"]
            if expected:
                lines.append(f"  - not in the report, read by Gather only (embedding tables, "
                             f"by design): {', '.join(expected)}")
            if r.exit_code != 0 and r.stderr_tail:
                for line in r.stderr_tail:
                    lines.append(f"  - stderr: `{line.strip()[:400]}`")
            cos = r.summary.get("cosine")
            if cos and len(cos) > 1:
                lines.append("  - cosine per output: " + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in cos.items()))  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:500]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run models whose name contains one of these")
    parser.add_argument("--no-full-width", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None,
                        help="rewrite the markdown from a diagnostic.json, running nothing")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    subjects = export_subjects() + builder_subjects(not args.no_full_width)
    if args.only:
        subjects = [s for s in subjects if any(o in s.name for o in args.only)]
    started = time.strftime("%Y-%m-%d")
    if args.from_json:
        rows: list[Row] = [Row(**r) for r in json.loads(args.from_json.read_text())]
        by_name = {x.name: x for x in subjects}
        for row in rows:  # the checks again, on the reports and models the runs left
            subject = by_name.get(row.model)
            report_path, out_model = _paths(row.model, row.mode)
            if subject is None or not report_path.exists():
                continue
            row.summary, row.flags = {}, []
            summarise(row, subject, json.loads(report_path.read_text()), out_model)
        (OUT / "diagnostic.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        target = args.markdown or EXPORTS / "DIAGNOSTIC.md"
        target.write_text(markdown(rows, subjects, started))
        print(f"wrote {target}")
        return
    rows = []
    for subject in subjects:
        for mode, mode_args in MODES:
            if subject.modes is not None and mode not in subject.modes:
                continue
            if ("{V}" in " ".join(mode_args) and subject.val is None) or (
                "{C}" in " ".join(mode_args) and subject.calib is None):
                continue
            row = run_one(subject, mode, mode_args)
            rows.append(row)
            print(f"{subject.name:36} {mode:28} {_status(row):8} {row.seconds:6.1f}s "
                  f"{_numbers(row)}", flush=True)  # fmt: skip
            for f in row.flags:
                print(f"{'':36} flag: {f}", flush=True)
            if row.exit_code != 0 and row.stderr_tail:
                print(f"{'':36} {row.stderr_tail[-1][:200]}", flush=True)
    store = OUT / "diagnostic.json"
    if args.only and store.exists():  # merge: these models' rows replace the stored ones
        ran = {r.model for r in rows}
        kept = [Row(**r) for r in json.loads(store.read_text()) if r["model"] not in ran]
        rows = kept + rows
    store.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    target = args.markdown or (EXPORTS / "DIAGNOSTIC.md" if not args.only else None)
    if target is not None:
        target.write_text(markdown(rows, subjects, started))
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
