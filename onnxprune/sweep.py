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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune import pipeline
from onnxprune.core.progress import step
from onnxprune.errors import InfeasibleError, InvalidArgumentError
from onnxprune.options import Calibration, Selection, Structured
from onnxprune.runtime import open_session, select_runtime
from onnxprune.scoring import importance
from onnxprune.validate import (
    ModelResult,
    agreement,
    agreement_note,
    compare,
    model_file,
    prepare_inputs,
    run_model,
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
            if criterion not in importance.names():
                raise InvalidArgumentError(
                    f"--criteria {criterion!r}: choose from {', '.join(importance.names())}"
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
    structured: bool | Structured | None = None,
    calibration: Calibration | None = None,
    criteria: Sequence[str] | None = None,
    batch_axes: dict[str, int] | None = None,
) -> Sweep:
    """Prune `model` at each sparsity with each method, validate each against the dense model.

    With `calibration`, the lines compare the calibrated `criteria` (default: all three) with
    plain global magnitude.

    `structured` (channel removal's settings) as in `pipeline.prune`; structured rows are timed
    too (median latency of one batch), unstructured ones are not (zeros are not faster).
    `batch_axes` (input -> axis) overrides the batch axes read from the model, for the data and
    the calibration samples alike.
    """
    sparsities = parse_sparsities(sparsities)
    structured = Structured() if structured is True else structured or None
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
            batch_axes=batch_axes,
        )
        for notice in inputs.notices:
            log.info("%s", notice)
        timed = structured is not None
        reference = run_model(path, inputs, runtime, specs, latency=timed, session=session)
        del session
        rows = []
        if calibration is not None and not criteria:
            criteria = importance.names()
        for label, method, keep, criterion in methods_for(
            min_keep, timed, criteria if calibration is not None else None
        ):
            for sparsity in sparsities:
                row = SweepRow(method=label, sparsity=sparsity)
                rows.append(row)
                try:
                    pruned, report = pipeline.prune(
                        path,
                        Selection(sparsity, method=method, min_keep=keep),
                        structured=structured or False,
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
                    run = run_model(pruned_path, inputs, runtime, specs, latency=timed)
                if report.channels is not None:
                    row.achieved = report.channels.achieved
                else:
                    row.achieved = report.sparsity
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
        structured=timed,
        target="params" if structured is None else structured.target,
        generated=inputs.generated,
        agreement_note=agreement_note(reference),
    )
