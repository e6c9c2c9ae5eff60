"""The unstructured report's table (per layer: shape, params, kept, sparsity, output error) with
its totals and notes, and `inspect`'s table of magnitudes."""

from __future__ import annotations

import math
from typing import Any

from onnxprune.report import Report
from onnxprune.report.channels import format_channels
from onnxprune.report.tables import format_table, human_bytes, human_count, pct, shorten
from onnxprune.scoring.magnitude import MagnitudeStats
from onnxprune.selection import Plan


def _compensation_lines(found: Any) -> list[str]:
    """What constant compensation did: a line, and its notices."""
    drift = found.drift
    versus = (
        f" (output drift on generated inputs {drift['all']:.3g} with, {drift['quiet']:.3g} without)"
        if drift
        else ""
    )
    border = (
        f"; {found.bordered} zero-pad their input: exact inside, approximate at the border"
        if found.bordered
        else ""
    )
    lines = []
    if found.chosen == "all" and found.layers:
        lines.append(
            "constants: what the removed channels still carried (a BatchNorm shift, an added "
            f"constant, f(0) != 0) folded into the biases of {found.layers} layer(s) that read "
            f"them{border}{versus}"
        )
    elif found.chosen == "quiet":
        lines.append(
            "constants: the removed channels' constants not folded: they moved the outputs "
            f"further from the dense model's{versus}; "
            + (
                f"those of dead channels only, in {found.layers} layer(s)"
                if found.layers
                else "no removed channel is dead"
            )
        )
    return lines + [f"constants: {notice}" for notice in found.notices]


def untaken_line(branch: Any) -> str:
    """An If branch the run's inputs never take (`weights.Untaken`), and what that means."""
    given = ", ".join(
        f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in branch.inputs.items()
    )
    names = branch.weights
    what = (
        f"{len(names)} weight(s) read only there ({', '.join(names[:3])}"
        + (" ..." if len(names) > 3 else "")
        + ") are pruned all the same; no sample reaches them, so validation cannot show what "
        "their pruning does"
        if names
        else "no weight is read only there"
    )
    return f"never runs: the {branch.branch} of If {branch.node!r} for {given}: {what}"


def skipped_lines(skipped: list[tuple[str, str]]) -> list[str]:
    """One line per skipped tensor; where many share a kind of reason (biases, tables), one
    line for them with a few names."""
    if len(skipped) <= 8:
        return [f"skipped {name}: {reason}" for name, reason in skipped]
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for name, reason in skipped:
        by_kind.setdefault(reason.split(":")[-1].strip(), []).append((name, reason))
    lines = []
    for items in by_kind.values():
        if len(items) == 1:
            lines.append(f"skipped {items[0][0]}: {items[0][1]}")
            continue
        names = ", ".join(n for n, _ in items[:3]) + (
            f" and {len(items) - 3} more" if len(items) > 3 else ""
        )
        lines.append(f"skipped {len(items)} tensors ({names}): e.g. {items[0][1]}")
    return lines


NAME_WIDTH = 44
NODE_WIDTH = 32


def _consumers(weight: Any) -> str:
    """The node that uses a weight (exporters often name nodes better than tensors), +N more."""
    names = [n for n in dict.fromkeys(weight.node_names) if n]
    if not names:
        return ""
    more = f" +{len(names) - 1}" if len(names) > 1 else ""
    return shorten(names[0], NODE_WIDTH - len(more)) + more


def _error(error: float | None) -> str:
    return "-" if error is None else f"{error:.4f}"


def _calibration_line(summary: Any, errors: list[float], structured: bool = False) -> str:
    worst = f", worst output error {max(errors):.4f}" if errors else ""
    provider = summary.providers[0].replace("ExecutionProvider", "") if summary.providers else "?"
    if structured:
        return (
            f"channels chosen by {summary.criterion} ({summary.mode}), {summary.samples} "
            f"calibration samples on {provider}; {len(errors)} layers re-solved by least "
            f"squares, bias corrected in {summary.bias_corrected}{worst} (||W x - W' x'|| / "
            "||W x|| about the mean, on the calibration samples)"
        )
    return (
        f"criterion {summary.criterion} ({summary.mode}), {summary.samples} calibration samples "
        f"on {provider}, bias corrected in {summary.bias_corrected} layers{worst}; out error = "
        "||W x - W' x'|| / ||W x|| on the calibration samples"
    )


def _calibration_notes(summary: Any) -> list[str]:
    lines = [f"ranked by magnitude, not repaired: {n}: {r}" for n, r in summary.fallback]
    return lines + [f"calibration: {notice}" for notice in summary.notices]


def _sparse_lines(report: Report) -> list[str]:
    """What sparse storage did: tensors written as sparse initializers and the bytes saved."""
    storage = report.extra.get("sparse_storage")
    if storage is None:
        return []
    if not storage["tensors"]:
        return [
            f"sparse storage: none of {storage['considered']} tensors is smaller sparse; "
            "all written dense"
        ]
    return [
        f"sparse storage: {storage['tensors']} of {storage['considered']} tensors as sparse "
        f"initializers ({'/'.join(storage['index_types'])} indices), "
        f"{human_bytes(storage['dense_bytes'])} -> {human_bytes(storage['sparse_bytes'])} "
        f"(saved {human_bytes(storage['saved_bytes'])})"
    ]


def spread_line(spread: dict[str, Any]) -> str:
    """One line: how the layers' sparsities spread (`Report.spread`)."""
    q1, median, q3 = spread["quartiles"]
    low, high = spread["min"], spread["max"]
    line = (
        f"spread ({spread['how']}): layers from {pct(low['sparsity'])} "
        f"({shorten(low['layer'], 32)}) to {pct(high['sparsity'])} ({shorten(high['layer'], 32)}), "
        f"quartiles {pct(q1)} / {pct(median)} / {pct(q3)}"
    )
    above = spread["weights_in_layers_above_0.9"]
    if above:
        line += f"; {pct(above)} of the weights sit in layers pruned beyond 90%"
    return line


def format_report(report: Report) -> str:
    """The terminal table of a prune run, in graph order, with totals and sizes."""
    if report.channels is not None:
        plan = report.channels
        lines = [format_channels(plan)]
        if report.calibration is not None:
            errors = [e for e in report.errors.values() if e is not None]
            lines.append(_calibration_line(report.calibration, errors, True))
            lines += _calibration_notes(report.calibration)
        if report.compensation is not None:
            lines += _compensation_lines(report.compensation)
        lines += skipped_lines(report.skipped)
        lines += [untaken_line(u) for u in report.untaken]
        if report.size_after is not None:
            lines.append(
                f"size: {human_bytes(report.size_before)} -> {human_bytes(report.size_after)}"
                + (f"  written to {report.output_path}" if report.output_path else "")
            )
        lines += _sparse_lines(report)
        return "\n".join(lines)
    plan = report.plan
    assert plan is not None
    calibrated = report.calibration is not None
    rows = [
        [
            shorten(layer.weight.name, NAME_WIDTH),
            _consumers(layer.weight),
            layer.weight.op_type,
            "x".join(map(str, layer.weight.shape)),
            human_count(layer.size),
            human_count(layer.size - report.pruned(layer)),
            pct(report.pruned(layer) / layer.size if layer.size else 0.0),
            *([_error(report.errors.get(layer.weight.name))] if calibrated else []),
        ]
        for layer in plan.layers
    ]
    pruned = report.total_pruned
    footer = [
        f"total ({len(plan.layers)} layers)",
        "",
        "",
        "",
        human_count(plan.total),
        human_count(plan.total - pruned),
        pct(report.sparsity),
        *([""] if calibrated else []),
    ]
    lines = [
        format_table(
            ["layer", "node", "op", "shape", "params", "kept", "sparsity"]
            + (["out error"] if calibrated else []),
            rows,
            footer=footer,
            left=3,
        )
    ]
    method = plan.method + (f", min-keep {plan.min_keep}" if plan.min_keep else "")
    if report.calibration is not None:
        found = (report.errors.get(layer.weight.name) for layer in plan.layers)
        errors = [e for e in found if e is not None]
        lines.append(_calibration_line(report.calibration, errors))
    if plan.pattern is None:
        lines.append(
            f"method {method}: target sparsity {plan.target:g}, achieved {report.sparsity:.6f} "
            f"({pruned} of {plan.total} prunable weights are zero)"
        )
    else:
        lines.append(
            f"pattern {method}: {pruned} of {plan.total} prunable weights are zero "
            f"(sparsity {report.sparsity:.6f})"
        )
        if tuple(plan.pattern) == (2, 4):
            lines.append(SPARSE_KERNELS)
    spread = report.spread()
    if spread is not None and len(plan.layers) > 1:
        lines.append(spread_line(spread))
    if plan.layer_keep:
        kept = ", ".join(f"{name} {pct(f)}" for name, f in plan.layer_keep.items())
        lines.append(
            f"sensitivity: {len(plan.layer_keep)} layer(s) whose output error, pruned alone to "
            f"{plan.target:g}, exceeds the tolerance keep at least: {kept}"
        )
    if report.size_before is not None:
        lines.append(
            f"size: {human_bytes(report.size_before)} -> {human_bytes(report.size_after)}"
            + (f"  written to {report.output_path}" if report.output_path else "")
        )
    lines += _sparse_lines(report)
    lines += skipped_lines(report.skipped)
    lines += [untaken_line(u) for u in report.untaken]
    if report.calibration is not None:
        lines += _calibration_notes(report.calibration)
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def format_inspect(stats: list[tuple[Any, MagnitudeStats]], plan: Plan | None) -> str:
    """Per-layer sizes and magnitude statistics, and what a plan would keep, for `inspect`."""
    kept = {id(layer.weight): layer for layer in plan.layers} if plan else {}
    headers = ["layer", "node", "op", "shape", "dtype", "params", "zeros"]
    headers += ["min|w|", "mean|w|", "max|w|"]
    if plan:
        headers += ["would keep", "sparsity"]
    rows = []
    for weight, s in stats:
        row = [
            shorten(weight.name, NAME_WIDTH),
            _consumers(weight),
            weight.op_type,
            "x".join(map(str, weight.shape)),
            weight.dtype.name.lower(),
            human_count(s.size),
            human_count(s.zeros),
            f"{s.min:.3g}",
            f"{s.mean:.3g}",
            f"{s.max:.3g}" if math.isfinite(s.max) else str(s.max),
        ]
        if plan:
            layer = kept[id(weight)]
            row += [human_count(layer.kept), pct(layer.sparsity)]
        rows.append(row)
    total = sum(s.size for _, s in stats)
    footer = [
        f"total ({len(stats)} layers)",
        "",
        "",
        "",
        "",
        human_count(total),
        human_count(sum(s.zeros for _, s in stats)),
        "",
        "",
        "",
    ]
    if plan:
        footer += [human_count(plan.total - plan.pruned), pct(plan.sparsity)]
    out = [format_table(headers, rows, footer=footer, left=3)]
    if plan:
        out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out)


# 2:4 is what sparse tensor cores (Ampere and later) run; ONNX Runtime uses them through TensorRT.
SPARSE_KERNELS = (
    "2:4 runs on sparse tensor cores through TensorRT with its sparsity option: onnxprune "
    "validate MODEL PRUNED --provider TensorRT --provider-option trt_sparsity_enable=1 (in code: "
    "TensorrtExecutionProvider with {'trt_sparsity_enable': '1'})"
)


def unvalidated_note(model: str, report: Report) -> str:
    """The one line a run without validation ends on: nothing says what pruning cost yet."""
    if report.channels is not None:
        metric = "MACs" if report.channels.metric == "macs" else "parameters"
        what = f"removing {report.channels.achieved:.0%} of the {metric} as channels"
    else:
        what = f"pruning to sparsity {report.sparsity:.2f}"
    out = report.output_path or "OUTPUT"
    return (
        f"nothing was validated: what {what} cost in accuracy is unknown; add --data val.npz "
        f"(with 'labels'; --max-accuracy-drop to gate), or run: onnxprune validate {model} {out} "
        "--data val.npz"
    )
