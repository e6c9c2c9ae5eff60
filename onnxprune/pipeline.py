"""The whole job as one call: load, find, select, rewrite, save. Each stage is usable alone too."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from onnxprune import io, rewrite, selection, sparse, weights, writer
from onnxprune.calibration import Calibration
from onnxprune.errors import InvalidArgumentError
from onnxprune.report import Report, step
from onnxprune.scoring import MagnitudeStats, magnitude_hazard, magnitude_stats


def default_output(path: str | os.PathLike) -> Path:
    """model.onnx -> model.pruned.onnx, beside the input."""
    path = Path(path)
    return path.with_name(f"{path.stem}.pruned{path.suffix or '.onnx'}")


TARGETS = ("params", "macs")


@dataclass(frozen=True)
class Structured:
    """Channel removal's settings (`prune(structured=Structured(...))`; True means the defaults).

    `target`: `sparsity` counts removed parameters ("params") or multiply-accumulates ("macs");
    `round_to`: channel counts kept multiples of N where a layer allows; `heads`: each attention
    head is one channel, removed whole; `compensate`: without calibration, what removed channels
    still carried (a BatchNorm shift, a Sigmoid's 0.5...) is folded into their readers' biases,
    measured on generated inputs; `input_shapes`: the sizes open dims take there and in MAC
    counts.
    """

    target: str = "params"
    round_to: int | None = None
    heads: bool = False
    compensate: bool = True
    input_shapes: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InvalidArgumentError(
                f"--target {self.target!r}: choose one of {', '.join(TARGETS)}"
            )
        if self.round_to is not None and (int(self.round_to) != self.round_to or self.round_to < 1):
            raise InvalidArgumentError(
                f"--round-to {self.round_to!r}: must be a positive whole number"
            )


def structured_options(
    structured: bool,
    *,
    target: str = "params",
    round_to: int | None = None,
    heads: bool = False,
    compensate: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Structured | None:
    """The Structured settings the command line's flags ask for (None without --structured);
    flags that only mean something for channel removal are refused without it, never ignored."""
    if structured:
        return Structured(target, round_to, heads, compensate, input_shapes)
    if target not in TARGETS:
        raise InvalidArgumentError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if heads:
        raise InvalidArgumentError("--heads removes whole attention heads: it needs --structured")
    if target != "params":
        raise InvalidArgumentError(
            f"--target {target} counts what removing whole channels saves: it needs --structured "
            "(zeroed weights count as parameters)"
        )
    if round_to is not None:
        raise InvalidArgumentError(
            f"--round-to {round_to} rounds channel counts: it needs --structured"
        )
    return None


def check_arguments(
    sparsity: float | None = None,
    *,
    method: str = "global",
    min_keep: str | float | int | None = None,
    pattern: str | tuple[int, int] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Judge the options that need no file first: a bad value is then the first thing a command
    says, not "the output already exists" (which --force would only trade for the same error)."""
    if sparsity is not None:
        selection.check_sparsity(sparsity)
    if method not in selection.METHODS:
        raise InvalidArgumentError(
            f"--method {method!r}: choose one of {', '.join(selection.METHODS)}"
        )
    selection.MinKeep.parse(min_keep)
    selection.parse_pattern(pattern)
    weights._compile(include, "--include")
    weights._compile(exclude, "--exclude")


def prune(
    model: str | os.PathLike | ir.Model,
    sparsity: float = 0.0,
    *,
    method: str = "global",
    min_keep: str | float | int | None = None,
    pattern: str | tuple[int, int] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    structured: bool | Structured = False,
    calibration: Calibration | str | os.PathLike | None = None,
    criterion: str | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    save: io.Save | None = None,
    commit: bool = True,
) -> tuple[ir.Model, Report]:
    """Prune a model (a path or an `ir.Model`, changed in place) and, if `output` is given, save it.

    `structured` (True, or a `Structured` for its settings) removes whole channels instead of
    zeroing weights: `sparsity` is then the share of the weights' parameters or MACs removed.
    `calibration` (an .npz of input samples, or a `Calibration`) ranks weights by what they do on
    those samples and repairs what is left: `criterion` sparsegpt (the default with data), wanda
    or magnitude; with `structured`, channels are chosen by the output error their removal causes
    and the layers that read them are re-solved by least squares. `save` sets how the output is
    written (`io.Save`: external data, sparse storage, the checker), `force` lets it replace a
    file. `commit=False` leaves the output written and checked under temporary names beside it:
    `report.staged` (an `io.StagedModel`) holds it for the caller to put in place together with
    its other outputs (`writer.commit_all`, as the CLI does with the report) or to discard.
    Returns the pruned model and the report. Errors a user can cause raise `OnnxPruneError`.
    """
    start = time.perf_counter()
    input_path = None if isinstance(model, ir.Model) else Path(model)
    sparsity = selection.check_sparsity(sparsity)
    options = calibration_options(calibration, criterion)
    channels = Structured() if structured is True else structured or None
    save = save or io.Save()
    if output is not None:
        io.check_output_path(output, input_path=input_path, force=force)
    if input_path is not None:
        with step(f"loading {input_path}"):
            model = io.load_model(input_path)
    assert isinstance(model, ir.Model)
    if save.sparse_storage and output is not None:
        sparse.check_possible(model)  # before any work
    if channels is not None:
        report = _prune_channels(
            model, sparsity, method, min_keep, pattern, include, exclude, channels, options
        )
    else:
        report = _prune_weights(
            model, sparsity, method, min_keep, pattern, include, exclude, options
        )
    if input_path is not None:
        report.input_path = str(input_path)
        report.size_before = io.file_size(input_path)
    if output is not None:
        with step(f"writing {output}"):
            layout = io.sparse_layout(model, save.sparse_storage)
            staged = io.stage_model(
                model,
                output,
                input_path=input_path,
                force=force,
                external_data=save.external_data,
                check=save.check,
                sparse=layout or False,
            )
        if layout is not None:
            report.extra["sparse_storage"] = layout.summary()
        report.output_path = str(staged.out)
        if commit:
            try:
                writer.commit_all([staged])
            finally:
                staged.discard()
            report.size_after = io.file_size(staged.out)
        else:
            report.size_after = staged.size()
            report.staged = staged
    report.seconds = round(time.perf_counter() - start, 3)
    return model, report


def _prune_weights(
    model: ir.Model,
    sparsity: float,
    method: str,
    min_keep: str | float | int | None,
    pattern: str | tuple[int, int] | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    options: Calibration | None = None,
) -> Report:
    with step("finding weights"):
        found = weights.find_weights(model, include=include, exclude=exclude)
    with step(f"ranking {found.total:,} weights"):
        # by magnitude first, also with calibration: every argument error and an infeasible
        # minimum surface before the samples run
        plan = selection.plan(
            found.weights, sparsity, method=method, min_keep=min_keep, pattern=pattern
        )
    if options is not None:
        from onnxprune.calibration.prune import calibrated_plan

        weights.check_finite((w.name, w.tensor()) for w in found.weights)

        plan = calibrated_plan(
            model,
            found.weights,
            sparsity,
            options,
            method=method,
            min_keep=min_keep,
            pattern=pattern,
        )
    elif method == "global" and pattern is None:
        hazard = magnitude_hazard(found.weights)
        if hazard is not None:
            plan.warnings.append(hazard)
    rewrite.apply_plan(model, plan)
    report = Report(plan=plan, skipped=found.skipped)
    return report


def calibration_options(
    calibration: Calibration | str | os.PathLike | None, criterion: str | None
) -> Calibration | None:
    """The calibration settings from the API's shorthand: a path, or a `Calibration`."""
    if calibration is None:
        if criterion not in (None, "magnitude"):
            raise InvalidArgumentError(
                f"--criterion {criterion} needs calibration samples: give --calibration FILE.npz"
            )
        return None
    if isinstance(calibration, Calibration):
        if criterion is not None and criterion != calibration.criterion:
            return dataclasses.replace(calibration, criterion=criterion)
        return calibration
    return Calibration(data=calibration, criterion=criterion or "sparsegpt")


def _prune_channels(
    model: ir.Model,
    sparsity: float,
    method: str,
    min_keep: str | float | int | None,
    pattern: str | tuple[int, int] | None,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    settings: Structured,
    options: Calibration | None = None,
) -> Report:
    """Structured: trace channel groups, rank channels globally, slice them out (with
    calibration: ranked by their cost on the samples, and the readers re-solved; without,
    the constants the removed channels carried folded into their readers' biases)."""
    from onnxprune import channels
    from onnxprune.rewrite.structured import apply_channel_plan
    from onnxprune.selection import channels as channel_selection

    if pattern is not None:
        raise InvalidArgumentError("--pattern and --structured exclude each other")
    if method != "global":
        raise InvalidArgumentError("--structured ranks channels globally; leave out --method")
    includes = weights._compile(include, "--include")
    excludes = weights._compile(exclude, "--exclude")
    with step("tracing channels"):
        channels.prepare(model)
        graph = channels.build(model, heads=True) if settings.heads else channels.build(model)

    def named(layer: channels.Layer, patterns: list) -> bool:
        return any(p.search(n) for p in patterns for n in (layer.name, layer.member.value.name))

    if includes:
        hit = [i for i, layer in enumerate(graph.layers) if not named(layer, includes)]
        channels.freeze_layers(graph, hit, "not matched by --include")
    if excludes:
        hit = [i for i, layer in enumerate(graph.layers) if named(layer, excludes)]
        channels.freeze_layers(graph, hit, "matched by --exclude")
    channels.check_removable(graph)
    if options is not None or settings.compensate:  # the samples run through the weights
        found = weights.find_weights(model, include=include, exclude=exclude)
        weights.check_finite((w.name, w.tensor()) for w in found.weights)
    if options is not None:
        from onnxprune.calibration.channels import calibrated_channels

        plan = calibrated_channels(
            model,
            graph,
            sparsity,
            options,
            min_keep=min_keep,
            round_to=settings.round_to,
            target=settings.target,
            input_shapes=settings.input_shapes,
        )
        return Report(plan=None, channels=plan)
    with step("ranking channels"):
        plan = channel_selection.plan_channels(
            model,
            graph,
            sparsity,
            min_keep=min_keep,
            round_to=settings.round_to,
            target=settings.target,
            input_shapes=settings.input_shapes,
        )
    constants = None
    if settings.compensate and plan.removed.any():
        from onnxprune.calibration import compensation

        with step("measuring the constants removed channels carry"):
            constants = compensation.measure(model, graph, plan, input_shapes=settings.input_shapes)
    with step("removing channels"):
        apply_channel_plan(model, plan)
    if constants is not None:
        compensation.apply(model, constants)
        plan.compensation = constants
    return Report(plan=None, channels=plan)


def inspect(
    model: str | os.PathLike | ir.Model,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> tuple[weights.Found, list[tuple[weights.Weight, MagnitudeStats]]]:
    """The prunable weights with their magnitude statistics; reads, never writes."""
    if not isinstance(model, ir.Model):
        model = io.load_model(model)
    found = weights.find_weights(model, include=include, exclude=exclude)
    if not found.weights:
        # the same error as pruning would give, so inspect answers "can this be pruned?"
        selection.plan(found.weights)
    return found, [(w, magnitude_stats(w.tensor())) for w in found.weights]
