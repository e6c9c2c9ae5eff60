"""Sweep: prune at several sparsities with each method and validate every result.

Global ranking, global ranking with a per-layer minimum retention, and uniform per-layer pruning,
on the user's own model and data; or, with `structured=True`, channel removal with and without the
minimum retention, timed as well, since speed is what removing channels is for. The reference runs
once; each pruned model runs in memory (saved to a temporary folder only so that ONNX Runtime can
open it and its file size can be measured).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune import pipeline, writer
from onnxprune.calibration import Calibration
from onnxprune.errors import InfeasibleError, InvalidArgumentError
from onnxprune.report import format_table, human_bytes, step
from onnxprune.validate import (
    GENERATED_CAVEAT,
    ModelResult,
    agreement,
    agreement_note,
    compare,
    mac_figure,
    macs_text,
    model_file,
    open_session,
    prepare_inputs,
    run_model,
    select_runtime,
)

log = logging.getLogger("onnxprune")

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
DEFAULT_MIN_KEEP = "0.01"


@dataclass
class SweepRow:
    """One pruned model: how it was pruned and what it scored against the dense reference."""

    method: str
    sparsity: float
    achieved: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    min_cosine: float | None = None
    gzip_bytes: int | None = None
    file_bytes: int | None = None
    macs: int | None = None  # a lower bound where macs_complete is false
    nonzero_macs: int | None = None
    macs_complete: bool = True
    macs_unknown: list[str] = field(default_factory=list)  # nodes whose MACs are not known
    latency_ms: float | None = None  # structured sweeps only
    collapsed: int = 0  # layers left with under 1% of their weights
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Sweep:
    reference: ModelResult
    rows: list[SweepRow]
    min_keep: str | None
    inputs: str
    samples: int
    labels: bool
    notices: list[str] = field(default_factory=list)
    structured: bool = False
    target: str = "params"
    generated: bool = False  # inputs made up from the model's types, not the user's samples
    agreement_note: str | None = None  # why there is no top-1 agreement, where there is none

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(row.method for row in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference.to_dict(),
            "min_keep": self.min_keep,
            "inputs": self.inputs,
            "samples": self.samples,
            "labels": self.labels,
            "generated_inputs": self.generated,
            "top1_agreement_note": self.agreement_note,
            "rows": [row.to_dict() for row in self.rows],
            "notices": self.notices,
            "structured": self.structured,
            "target": self.target,
        }


def parse_sparsities(text: str | Sequence[float]) -> list[float]:
    """'0.5,0.8,0.9' -> [0.5, 0.8, 0.9]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--sparsities {text!r}: give comma-separated numbers, e.g. 0.5,0.8,0.9"
        ) from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise InvalidArgumentError(f"--sparsities {text!r}: each must be in [0, 1)")
    return values


CRITERIA = ("magnitude", "wanda", "sparsegpt")


def methods_for(
    min_keep: str | float | None,
    structured: bool = False,
    criteria: Sequence[str] | None = None,
) -> list[tuple[str, str, str | float | None, str | None]]:
    """(label, method, min_keep, criterion) for the lines of the comparison.

    Structured sweeps rank globally. With `criteria` (calibration data given), plain global
    magnitude is the baseline and each criterion, calibrated, gets a line of its own.
    """
    name = "structured" if structured else "global"
    methods: list[tuple[str, str, str | float | None, str | None]] = [(name, "global", None, None)]
    if criteria:
        for criterion in criteria:
            if criterion not in CRITERIA:
                raise InvalidArgumentError(
                    f"--criteria {criterion!r}: choose from {', '.join(CRITERIA)}"
                )
            label = f"{criterion}+calibration"
            methods.append((label, "global", None, criterion))
            if min_keep not in (None, "", 0, "0"):
                methods.append((f"{label}+min-keep {min_keep}", "global", min_keep, criterion))
        return methods
    if min_keep not in (None, "", 0, "0"):
        methods.append((f"{name}+min-keep {min_keep}", "global", min_keep, None))
    if not structured:
        methods.append(("uniform", "uniform", None, None))
    return methods


def sweep(
    model: str | os.PathLike,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    data: str | os.PathLike | dict[str, np.ndarray] | None = None,
    min_keep: str | float | None = DEFAULT_MIN_KEEP,
    batch_size: int | None = None,
    device: str = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    structured: bool = False,
    target: str = "params",
    round_to: int | None = None,
    calibration: Calibration | None = None,
    criteria: Sequence[str] | None = None,
    heads: bool = False,
) -> Sweep:
    """Prune `model` at each sparsity with each method, validate each against the dense model.

    With `calibration`, the lines compare the calibrated `criteria` (default: all three) with
    plain global magnitude.

    `structured`, `target`, `round_to` and `heads` are those of `pipeline.prune`; structured rows
    are timed too (median latency of one batch), unstructured ones are not (zeros are not faster).
    """
    sparsities = parse_sparsities(sparsities)
    channels = pipeline.structured_options(
        structured, target=target, round_to=round_to, heads=heads, input_shapes=input_shapes
    )
    runtime = select_runtime(device)
    if runtime.note:
        log.info("%s", runtime.note)
    with model_file(model) as path:
        session = open_session(path, runtime)
        specs, inputs = prepare_inputs(
            session,
            data=data,
            batch_size=batch_size,
            input_shapes=input_shapes,
            seed=seed,
            model=path,
        )
        for notice in inputs.notices:
            log.info("%s", notice)
        reference = run_model(path, inputs, runtime, specs, latency=structured, session=session)
        del session
        rows = []
        if calibration is not None and not criteria:
            criteria = CRITERIA
        for label, method, keep, criterion in methods_for(
            min_keep, structured, criteria if calibration is not None else None
        ):
            for sparsity in sparsities:
                row = SweepRow(method=label, sparsity=sparsity)
                rows.append(row)
                try:
                    pruned, report = pipeline.prune(
                        path,
                        sparsity,
                        method=method,
                        min_keep=keep,
                        structured=channels or False,
                        calibration=None
                        if criterion is None or calibration is None
                        else dataclasses.replace(calibration, criterion=criterion),
                    )
                except InfeasibleError as exc:
                    row.error = str(exc)
                    continue
                with (
                    step(f"validating {label} at {sparsity:g}"),
                    model_file(pruned, "pruned.onnx") as pruned_path,
                ):
                    run = run_model(pruned_path, inputs, runtime, specs, latency=structured)
                if report.channels is not None:
                    row.achieved = report.channels.achieved
                else:
                    row.achieved = report.plan.sparsity
                row.file_bytes = run.result.cost.file_bytes
                row.macs = run.result.cost.macs
                row.macs_complete = run.result.cost.macs_complete
                row.macs_unknown = run.result.cost.macs_unknown
                if run.result.latency is not None:
                    row.latency_ms = run.result.latency.median_ms
                row.accuracy = run.result.accuracy
                row.min_cosine = min((d.cosine for d in compare(reference, run)), default=None)
                row.agreement = agreement(reference, run)
                row.gzip_bytes = run.result.cost.gzip_bytes
                row.nonzero_macs = run.result.cost.nonzero_macs
                row.collapsed = sum(1 for w in report.warnings if w.startswith("layer collapse"))
    return Sweep(
        reference=reference.result,
        rows=rows,
        min_keep=None if min_keep is None else str(min_keep),
        inputs=inputs.source,
        samples=inputs.samples,
        labels=inputs.labels is not None,
        notices=list(inputs.notices),
        structured=structured,
        target=target,
        generated=inputs.generated,
        agreement_note=agreement_note(reference),
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _macs(row: SweepRow, nonzero: bool = False) -> str:
    """A row's MACs as validation prints them (a lower bound says so; never a partial total)."""
    return mac_figure(row.nonzero_macs if nonzero else row.macs, row.macs_unknown)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def format_sweep(result: Sweep) -> str:
    """One row per pruned model, the dense reference first.

    Unstructured rows show what zeros buy (gzip size, non-zero MACs); structured rows what
    removed channels buy (file size, MACs, latency).
    """
    ref = result.reference
    headers = ["method", "sparsity", "achieved", "accuracy", "agreement", "min cosine"]
    if result.structured:
        headers += ["file size", "MACs", "latency"]
        dense = [
            human_bytes(ref.cost.file_bytes),
            macs_text(ref.cost),
            _ms(ref.latency.median_ms if ref.latency else None),
        ]
    else:
        headers += ["gzip size", "MACs (non-zero)"]
        dense = [human_bytes(ref.cost.gzip_bytes), macs_text(ref.cost, nonzero=True)]
    rows = [["dense", "0", "-", _pct(ref.accuracy), "-", "-", *dense]]
    for row in result.rows:
        if row.error:
            rows.append([row.method, f"{row.sparsity:g}", "infeasible", *[""] * 5])
            continue
        if result.structured:
            costs = [human_bytes(row.file_bytes), _macs(row), _ms(row.latency_ms)]
        else:
            costs = [human_bytes(row.gzip_bytes), _macs(row, nonzero=True)]
        rows.append(
            [
                row.method,
                f"{row.sparsity:g}",
                f"{row.achieved:.4f}",
                _pct(row.accuracy),
                _pct(row.agreement),
                "-" if row.min_cosine is None else f"{row.min_cosine:.4f}",
                *costs,
            ]
        )
    lines = [format_table(headers, rows)]
    lines.append(
        f"{result.samples} samples from {result.inputs} on {ref.providers[0]}; {_meaning(result)}"
    )
    if result.agreement_note:
        lines.append(f"agreement: {result.agreement_note.removeprefix('no top-1: ')}")
    if result.generated:
        lines.append(GENERATED_CAVEAT)
    for row in result.rows:
        if row.collapsed:
            lines.append(
                f"{row.method} at {row.sparsity:g}: {row.collapsed} layer(s) kept under 1% of "
                "their weights (layer collapse)"
            )
        if row.error:
            lines.append(f"{row.method} at {row.sparsity:g}: {row.error}")
    return "\n".join(lines)


def _meaning(result: Sweep) -> str:
    """What the sparsity column counts."""
    if result.structured:
        what = "parameters" if result.target == "params" else "multiply-accumulates"
        return f"sparsity counts the {what} of prunable layers removed with their channels"
    return "sparsity counts prunable weights (Conv, Gemm, MatMul) set to zero"


def format_markdown(result: Sweep) -> str:
    """The accuracy table as Markdown: sparsity down, method across."""
    metric = "accuracy" if result.labels else "agreement"
    methods = result.methods
    lines = [
        "| sparsity | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    sparsities = list(dict.fromkeys(row.sparsity for row in result.rows))
    cell = {(row.method, row.sparsity): row for row in result.rows}
    dense = result.reference.accuracy if result.labels else 1.0
    lines.append("| 0 (dense) | " + " | ".join(_pct(dense) for _ in methods) + " |")
    for s in sparsities:
        values = []
        for m in methods:
            row = cell.get((m, s))
            if row is None or row.error:
                values.append("infeasible")
            else:
                values.append(_pct(getattr(row, metric)))
        lines.append(f"| {s:g} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def check_plotting() -> None:
    """Fail before a long sweep, not after it, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        raise InvalidArgumentError(
            "--plot needs matplotlib: pip install 'onnxprune[plot]' (or pip install matplotlib)"
        ) from None


def plot_sweep(result: Sweep, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Accuracy (or agreement without labels) against sparsity, one line per method."""
    return writer.write_file(path, drawing(result), force=force)


def drawing(result: Sweep) -> Callable[[Path], None]:
    """What `plot_sweep` draws, as a writer's `produce(temporary_path)` (a PNG)."""
    check_plotting()
    import matplotlib.pyplot as plt

    metric = "accuracy" if result.labels else "agreement"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # distinct markers and dashes: lines that coincide (min-keep not binding) stay visible
    styles = [("o", "-", 7), ("s", "--", 5), ("^", ":", 6), ("D", "-.", 5)]
    for i, method in enumerate(result.methods):
        marker, dashes, size = styles[i % len(styles)]
        points = [
            (row.sparsity, 100 * getattr(row, metric))
            for row in result.rows
            if row.method == method and not row.error and getattr(row, metric) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle=dashes, markersize=size, label=method)
    if result.labels and result.reference.accuracy is not None:
        ax.axhline(100 * result.reference.accuracy, color="gray", linestyle="--", label="dense")
    ax.set_xlabel(f"sparsity: {_meaning(result).removeprefix('sparsity counts ')}")
    ax.set_ylabel(f"top-1 {metric} (%)")
    ax.set_title(f"{Path(result.reference.path).name}: {metric} against sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def produce(tmp: Path) -> None:
        try:
            fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)

    return produce
