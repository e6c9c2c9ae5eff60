"""Report: a run's numbers as a terminal table and as JSON, the same numbers the tests assert."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxprune import writer
from onnxprune.scoring import MagnitudeStats
from onnxprune.selection import Plan

log = logging.getLogger("onnxprune")

# A step is announced on stderr only once it has taken this long, so fast runs stay quiet.
PROGRESS_AFTER_S = 1.0


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a slow step on the log (stderr in the CLI) and how long it took."""
    start = time.perf_counter()
    timer = threading.Timer(PROGRESS_AFTER_S, lambda: log.info("%s ...", message))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        elapsed = time.perf_counter() - start
        if elapsed >= PROGRESS_AFTER_S:
            log.info("%s: done in %.1f s", message, elapsed)


@dataclass
class Report:
    """Everything a prune run decided and measured."""

    plan: Plan | None  # None for structured runs, which fill `channels` instead
    input_path: str | None = None
    output_path: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    channels: Any = None  # a selection.channels.ChannelPlan for structured runs
    # an io.StagedModel: the output written but not yet in place (pipeline.prune(commit=False))
    staged: Any = field(default=None, repr=False, compare=False)

    @property
    def warnings(self) -> list[str]:
        return (self.channels or self.plan).warnings

    def to_dict(self) -> dict[str, Any]:
        if self.channels is not None:
            from onnxprune.report.channels import channel_dict

            return {
                "input": self.input_path,
                "output": self.output_path,
                **channel_dict(self.channels),
                **_channel_calibration(self.channels),
                "size_bytes": {"before": self.size_before, "after": self.size_after},
                "seconds": self.seconds,
                **self.extra,
            }
        plan = self.plan
        return {
            "input": self.input_path,
            "output": self.output_path,
            "method": plan.method,
            "target_sparsity": plan.target,
            "achieved_sparsity": plan.sparsity,
            "min_keep": None if plan.min_keep is None else str(plan.min_keep),
            "pattern": None if plan.pattern is None else "{}:{}".format(*plan.pattern),
            "criterion": plan.criterion,
            "calibration": None if plan.calibration is None else plan.calibration.to_dict(),
            "prunable_weights": plan.total,
            "zeros_before": plan.zeros_before,
            "zeros_after": plan.pruned,
            "kept": plan.total - plan.pruned,
            "size_bytes": {"before": self.size_before, "after": self.size_after},
            "seconds": self.seconds,
            "layers": [
                {
                    "name": layer.weight.name,
                    "op": layer.weight.op_type,
                    "nodes": layer.weight.node_names,
                    "shape": list(layer.weight.shape),
                    "dtype": layer.weight.dtype.name,
                    "params": layer.size,
                    "zeros_before": layer.zeros,
                    "min_keep": layer.keep_min,
                    "kept": layer.kept,
                    "sparsity": layer.sparsity,
                    "output_error": layer.error,
                }
                for layer in plan.layers
            ],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "warnings": list(plan.warnings),
            **self.extra,
        }


def _channel_calibration(plan: Any) -> dict[str, Any]:
    """What calibration did in a structured run: its summary and each re-solved layer's error."""
    summary = plan.calibration
    return {
        "criterion": "magnitude" if summary is None else summary.criterion,
        "calibration": None if summary is None else summary.to_dict(),
        "output_errors": dict(plan.errors),
        "compensation": None if plan.compensation is None else plan.compensation.to_dict(),
    }


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


def json_text(data: dict[str, Any]) -> str:
    """A report's JSON, as every command writes it."""
    return json.dumps(data, indent=2) + "\n"


def write_json(data: dict[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write JSON through the one writer, like the model: whole or not at all, no clobbering."""
    return writer.write_text(path, json_text(data), force=force)


def human_count(n: int | float) -> str:
    """1234567 -> '1.23M': parameter counts people can read at a glance."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _shorten(text: str, width: int) -> str:
    return (
        text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width - width // 2) :]
    )


def format_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    footer: list[str] | None = None,
    left: int = 1,
) -> str:
    """A plain aligned table: the first `left` columns (names) left-aligned, the rest right."""
    all_rows = [headers, *rows, *([footer] if footer else [])]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(headers))
    out = [line(headers), rule, *(line(r) for r in rows)]
    if footer:
        out += [rule, line(footer)]
    return "\n".join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


NAME_WIDTH = 44
NODE_WIDTH = 32


def _consumers(weight: Any) -> str:
    """The node that uses a weight (exporters often name nodes better than tensors), +N more."""
    names = [n for n in dict.fromkeys(weight.node_names) if n]
    if not names:
        return ""
    more = f" +{len(names) - 1}" if len(names) > 1 else ""
    return _shorten(names[0], NODE_WIDTH - len(more)) + more


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


def format_report(report: Report) -> str:
    """The terminal table of a prune run, in graph order, with totals and sizes."""
    if report.channels is not None:
        from onnxprune.report.channels import format_channels

        plan = report.channels
        lines = [format_channels(plan)]
        if plan.calibration is not None:
            lines.append(_calibration_line(plan.calibration, list(plan.errors.values()), True))
            lines += _calibration_notes(plan.calibration)
        if plan.compensation is not None:
            lines += _compensation_lines(plan.compensation)
        if report.size_after is not None:
            lines.append(
                f"size: {human_bytes(report.size_before)} -> {human_bytes(report.size_after)}"
                + (f"  written to {report.output_path}" if report.output_path else "")
            )
        lines += _sparse_lines(report)
        return "\n".join(lines)
    plan = report.plan
    calibrated = plan.calibration is not None
    rows = [
        [
            _shorten(layer.weight.name, NAME_WIDTH),
            _consumers(layer.weight),
            layer.weight.op_type,
            "x".join(map(str, layer.weight.shape)),
            human_count(layer.size),
            human_count(layer.kept),
            _pct(layer.sparsity),
            *([_error(layer.error)] if calibrated else []),
        ]
        for layer in plan.layers
    ]
    footer = [
        f"total ({len(plan.layers)} layers)",
        "",
        "",
        "",
        human_count(plan.total),
        human_count(plan.total - plan.pruned),
        _pct(plan.sparsity),
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
    if calibrated:
        errors = [layer.error for layer in plan.layers if layer.error is not None]
        lines.append(_calibration_line(plan.calibration, errors))
    if plan.pattern is None:
        lines.append(
            f"method {method}: target sparsity {plan.target:g}, achieved {plan.sparsity:.6f} "
            f"({plan.pruned} of {plan.total} prunable weights are zero)"
        )
    else:
        lines.append(
            f"pattern {method}: {plan.pruned} of {plan.total} prunable weights are zero "
            f"(sparsity {plan.sparsity:.6f})"
        )
    if report.size_before is not None:
        lines.append(
            f"size: {human_bytes(report.size_before)} -> {human_bytes(report.size_after)}"
            + (f"  written to {report.output_path}" if report.output_path else "")
        )
    lines += _sparse_lines(report)
    for name, reason in report.skipped:
        lines.append(f"skipped {name}: {reason}")
    if calibrated:
        lines += _calibration_notes(plan.calibration)
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
            _shorten(weight.name, NAME_WIDTH),
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
            row += [human_count(layer.kept), _pct(layer.sparsity)]
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
        footer += [human_count(plan.total - plan.pruned), _pct(plan.sparsity)]
    out = [format_table(headers, rows, footer=footer, left=3)]
    if plan:
        out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out)
