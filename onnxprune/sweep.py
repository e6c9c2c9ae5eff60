"""Sweep: prune at several sparsities with each method and validate every result; or `pick`, the
highest sparsity whose model stays within an accuracy (agreement, cosine, perplexity) budget.

Global ranking, global ranking with a per-layer minimum retention, and uniform per-layer pruning,
on the user's own model and data; or, with `structured=True`, channel removal with and without the
minimum retention, timed as well, since speed is what removing channels is for. The reference runs
once; each pruned model runs in memory (saved to a temporary folder only so that ONNX Runtime can
open it and its file size can be measured).

`pick` walks the coarse grid upwards until a model leaves the budget, then bisects between the
last model within it and the first outside (a few steps): accuracy falls with sparsity, mostly,
so the search finds the edge without pruning at every point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxprune import pipeline
from onnxprune.core.progress import labelled, step
from onnxprune.errors import InfeasibleError, InvalidArgumentError
from onnxprune.inputs.readers import Samples
from onnxprune.options import (
    Budget,
    Calibration,
    Device,
    Selection,
    Structured,
    parse_sparsities,
)
from onnxprune.runtime import Runtime
from onnxprune.scoring import importance
from onnxprune.validate import (
    ModelResult,
    Run,
    agreement,
    agreement_note,
    baseline,
    compare,
    model_file,
    run_model,
)

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
DEFAULT_MIN_KEEP = "0.01"
# pick: bisections after the grid (each halves the interval: 0.05 wide -> about 0.003)
DEFAULT_BISECTIONS = 4


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
    perplexity: float | None = None  # with metric "perplexity"
    within: bool | None = None  # pick: inside the budget

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("perplexity", "within"):  # only where measured or searched
            if data[key] is None:
                del data[key]
        return data


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
    metric: str = "top1"

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
            **({"metric": self.metric} if self.metric != "top1" else {}),
        }


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


@dataclass
class Bench:
    """What every row is judged against: the dense model run once on the inputs, the runtime,
    and how rows are pruned (structured settings, calibration)."""

    path: str | os.PathLike
    runtime: Runtime
    specs: list
    inputs: Any
    reference: Run
    structured: Structured | None
    calibration: Calibration | None
    metric: str

    @property
    def timed(self) -> bool:
        return self.structured is not None

    def row(
        self,
        label: str,
        sparsity: float,
        method: str,
        keep: str | float | None,
        criterion: str | None,
    ) -> SweepRow:
        """One pruned model, in memory, validated against the reference; labelled progress."""
        row = SweepRow(method=label, sparsity=sparsity)
        calibration = None
        if criterion is not None and self.calibration is not None:
            calibration = dataclasses.replace(self.calibration, criterion=criterion)
        with labelled(f"{label} at {sparsity:g}"):
            try:
                pruned, report = pipeline.prune(
                    self.path,
                    Selection(sparsity, method=method, min_keep=keep),
                    structured=self.structured or False,
                    calibration=calibration,
                )
            except InfeasibleError as exc:
                row.error = str(exc)
                return row
            with step("validating"), model_file(pruned, "pruned.onnx") as pruned_path:
                run = run_model(
                    pruned_path, self.inputs, self.runtime, self.specs, latency=self.timed,
                    metric=self.metric,
                )  # fmt: skip
        row.achieved = report.channels.achieved if report.channels is not None else report.sparsity
        cost = run.result.cost
        assert cost is not None
        row.file_bytes, row.gzip_bytes = cost.file_bytes, cost.gzip_bytes
        row.macs, row.nonzero_macs = cost.macs, cost.nonzero_macs
        row.macs_complete, row.macs_unknown = cost.macs_complete, cost.macs_unknown
        if run.result.latency is not None:
            row.latency_ms = run.result.latency.median_ms
        row.accuracy = run.result.accuracy
        row.perplexity = run.result.perplexity
        row.min_cosine = min((d.cosine for d in compare(self.reference, run)), default=None)
        row.agreement = agreement(self.reference, run)
        row.collapsed = sum(1 for w in report.warnings if w.startswith("layer collapse"))
        return row

    def result(self, rows: list[SweepRow], min_keep: str | float | None) -> Sweep:
        inputs = self.inputs
        return Sweep(
            reference=self.reference.result,
            rows=rows,
            min_keep=None if min_keep is None else str(min_keep),
            inputs=inputs.source,
            samples=inputs.samples,
            labels=inputs.labels is not None,
            notices=list(inputs.notices),
            structured=self.timed,
            target="params" if self.structured is None else self.structured.target,
            generated=inputs.generated,
            agreement_note=agreement_note(self.reference),
            metric=self.metric,
        )


@contextlib.contextmanager
def _bench(
    model: str | os.PathLike,
    *,
    data: Samples | None,
    batch_size: int | None,
    device: str | Device,
    input_shapes: dict[str, tuple[int, ...]] | None,
    seed: int,
    structured: bool | Structured | None,
    calibration: Calibration | None,
    metric: str,
    batch_axes: dict[str, int] | None = None,
) -> Iterator[Bench]:
    structured = Structured() if structured is True else structured or None
    with baseline(
        model, data=data, batch_size=batch_size, device=device, input_shapes=input_shapes,
        seed=seed, metric=metric, batch_axes=batch_axes, latency=structured is not None,
    ) as base:  # fmt: skip
        yield Bench(
            base.path, base.runtime, base.specs, base.inputs, base.reference, structured,
            calibration, metric,
        )  # fmt: skip


def sweep(
    model: str | os.PathLike,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    data: Samples | None = None,
    min_keep: str | float | None = DEFAULT_MIN_KEEP,
    batch_size: int | None = None,
    device: str | Device = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    structured: bool | Structured | None = None,
    calibration: Calibration | None = None,
    criteria: Sequence[str] | None = None,
    metric: str = "top1",
    batch_axes: dict[str, int] | None = None,
) -> Sweep:
    """Prune `model` at each sparsity with each method, validate each against the dense model.

    With `calibration`, the lines compare the calibrated `criteria` (default: all three) with
    plain global magnitude.

    `structured` (channel removal's settings) as in `pipeline.prune`; structured rows are timed
    too (median latency of one batch), unstructured ones are not (zeros are not faster).
    `metric` "perplexity" scores each model's next-token perplexity as well. `batch_axes`
    (input -> axis) overrides the batch axes read from the model, for the data and the
    calibration samples alike.
    """
    sparsities = parse_sparsities(sparsities)
    with _bench(
        model, data=data, batch_size=batch_size, device=device, input_shapes=input_shapes,
        seed=seed, structured=structured, calibration=calibration, metric=metric,
        batch_axes=batch_axes,
    ) as bench:  # fmt: skip
        rows = []
        if calibration is not None and not criteria:
            criteria = importance.names()
        for label, method, keep, criterion in methods_for(
            min_keep, bench.timed, criteria if calibration is not None else None
        ):
            for sparsity in sparsities:
                rows.append(bench.row(label, sparsity, method, keep, criterion))
        return bench.result(rows, min_keep)


def within(row: SweepRow, reference: ModelResult, budget: Budget) -> bool:
    """Whether a pruned model stays inside every limit of the budget (NaN never does)."""
    if row.error:
        return False
    checks = []
    if budget.max_accuracy_drop is not None:
        ref, cand = reference.accuracy, row.accuracy
        checks.append(
            ref is not None and cand is not None and ref - cand <= budget.max_accuracy_drop
        )
    if budget.min_agreement is not None:
        checks.append(row.agreement is not None and row.agreement >= budget.min_agreement)
    if budget.min_cosine is not None:
        checks.append(row.min_cosine is not None and row.min_cosine >= budget.min_cosine)
    if budget.max_perplexity_ratio is not None:
        ref_ppl, ppl = reference.perplexity, row.perplexity
        checks.append(
            ref_ppl is not None and ppl is not None and ppl / ref_ppl <= budget.max_perplexity_ratio
        )
    return all(checks)


@dataclass
class Pick:
    """A search's path (every model tried, in order) and the one it chose (None: none fit)."""

    sweep: Sweep
    budget: Budget
    best: SweepRow | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": {k: v for k, v in self.budget.limits.items() if v is not None},
            "chosen": None if self.best is None else self.best.sparsity,
            "path": [row.to_dict() for row in self.sweep.rows],
        }


def pick(
    model: str | os.PathLike,
    budget: Budget,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    data: Samples | None = None,
    min_keep: str | float | None = None,
    batch_size: int | None = None,
    device: str | Device = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    structured: bool | Structured | None = None,
    calibration: Calibration | None = None,
    metric: str = "top1",
    steps: int = DEFAULT_BISECTIONS,
    batch_axes: dict[str, int] | None = None,
) -> Pick:
    """The highest sparsity (share of MACs or parameters with `structured`) within `budget`: the
    grid of `sparsities` walked upwards to the first model outside it, then `steps` bisections
    between the last model inside and that one (sparsities to 4 decimals). With `calibration`,
    rows are pruned with its criterion."""
    grid = sorted(set(parse_sparsities(sparsities)))
    budget.check(metric)
    with _bench(
        model, data=data, batch_size=batch_size, device=device, input_shapes=input_shapes,
        seed=seed, structured=structured, calibration=calibration, metric=metric,
        batch_axes=batch_axes,
    ) as bench:  # fmt: skip
        criterion = None if calibration is None else calibration.criterion
        name = "structured" if bench.timed else "global"
        label = f"{criterion}+calibration" if criterion else name
        keep = None if min_keep in (None, "", 0, "0") else min_keep
        if keep is not None:
            label = f"{label}+min-keep {keep}"
        rows: list[SweepRow] = []
        best: SweepRow | None = None

        def attempt(sparsity: float) -> bool:
            nonlocal best
            row = bench.row(label, sparsity, "global", keep, criterion)
            row.within = within(row, bench.reference.result, budget)
            rows.append(row)
            if row.within:
                best = row
            return row.within

        low, high = 0.0, None
        for sparsity in grid:
            if not attempt(sparsity):
                high = sparsity
                break
            low = sparsity
        for _ in range(steps if high is not None else 0):
            middle = round((low + high) / 2, 4)
            if not low < middle < high:
                break
            if attempt(middle):
                low = middle
            else:
                high = middle
        return Pick(bench.result(rows, keep), budget, best)
