"""The whole job, in the order it happens:

    load -> find -> capture -> score -> select -> rewrite -> repair -> save -> validate -> report

`prune()` runs all of it, as the command line does (the CLI only maps flags to options);
`PrunePass` is the in-memory part (find to repair) as one onnx-ir pass, for a deployment
pipeline to put between its own passes. Each stage is usable alone too: `weights.find_weights`,
`calibration.capture`, `scoring`, `selection.plan`, `rewrite.ZeroWeightsPass`,
`repair.RepairWeightsPass`, `storage.io.save_model`, `validate.validate`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxprune import channels as channel_graph
from onnxprune import selection, weights
from onnxprune.calibration import CalibrationSummary, capture
from onnxprune.core.graphs import copy_model, dynamic_dims
from onnxprune.core.progress import step
from onnxprune.errors import DataError, InvalidArgumentError, ValidationFailed
from onnxprune.inputs.readers import sample_files
from onnxprune.inputs.spec import check_shape_names
from onnxprune.options import (
    SENSITIVITY_STRUCTURED,
    Calibration,
    Save,
    Selection,
    Structured,
    Validation,
    compile_patterns,
)
from onnxprune.report import Report, json_text
from onnxprune.rewrite import RemoveChannelsPass, ZeroWeightsPass
from onnxprune.scoring import importance as importances
from onnxprune.scoring.magnitude import MagnitudeStats, magnitude_hazard, magnitude_stats
from onnxprune.storage import io, sparse, writer

if TYPE_CHECKING:
    from onnxprune.validate.measure import Validation as ValidationResult


def model_inputs(model: ir.Model) -> list[str]:
    """The inputs a run feeds (initializers listed as inputs are not among them)."""
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]


def default_output(path: str | os.PathLike) -> Path:
    """model.onnx -> model.pruned.onnx, beside the input."""
    path = Path(path)
    return path.with_name(f"{path.stem}.pruned{path.suffix or '.onnx'}")


# -- find -> capture -> score -> select -> rewrite -> repair ---------------------------------------


def prune_weights(
    model: ir.Model, options: Selection, calibration: Calibration | None = None
) -> Report:
    """Zero weights (unstructured, N:M) in `model`, in place: magnitudes ranked, or calibrated
    scores with the pruned layers repaired from the samples."""
    from onnxprune.scoring.weights import outlier_ratios

    with step("finding weights"):
        found = weights.find_weights(model, include=options.include, exclude=options.exclude)
        skipped = found.skipped + weights.account(model, found)
    select = {
        "method": options.method,
        "min_keep": options.min_keep,
        "pattern": options.pattern,
        "layer_keep": options.sensitivity,
    }
    with step(f"ranking {found.total:,} weights"):
        # by magnitude first, also with calibration: every argument error and an infeasible
        # minimum surface before the samples run
        outliers = outlier_ratios(found.weights, None) if options.method == "owl" else None
        plan = selection.plan(found.weights, options.sparsity, **select, outliers=outliers)
    report = Report(plan=plan, skipped=skipped)
    if calibration is None:
        if options.method == "global" and options.pattern is None:
            hazard = magnitude_hazard(found.weights)
            if hazard is not None:
                plan.warnings.append(hazard)
        ZeroWeightsPass(plan)(model)
        return report
    from onnxprune.repair import RepairWeightsPass
    from onnxprune.scoring.weights import weight_scores

    weights.check_finite((w.name, w.tensor()) for w in found.weights)
    importance = importances.get(calibration.criterion)
    stats, samples, runtime, summary = capture.measure(model, found.weights, calibration)
    thin = [n for n, s in stats.layers.items() if s.rows < stats.designs[n][0].in_features]
    if thin:
        summary.notices.append(
            f"{len(thin)} layer(s) saw fewer calibration rows than their input width "
            f"(e.g. {thin[0]}): their statistics are rank-deficient and damping stands in; "
            "more samples help"
        )
    with step("scoring and ranking"):
        scores = weight_scores(
            found.weights, stats, importance, damp=calibration.damp, compare=calibration.compare,
            pattern=options.pattern is not None,
        )  # fmt: skip
        if options.method == "owl":
            outliers = outlier_ratios(found.weights, stats)
        plan = selection.plan(
            found.weights, options.sparsity, **select, scores=scores, outliers=outliers
        )
    dense = copy_model(model) if calibration.mode == "sequential" else None
    ZeroWeightsPass(plan)(model)
    repair = RepairWeightsPass(plan, importance, calibration, stats, samples, runtime, dense)
    repair(model)
    summary.bias_corrected = repair.result.bias_corrected
    summary.passes += repair.result.passes
    if repair.result.bias_left:
        summary.notices.append(
            f"{repair.result.bias_left} layer(s) have no bias to correct (a bias-free MatMul): "
            "their mean output shift is left as it is, no node is added for it"
        )
    return Report(
        plan=plan,
        skipped=skipped,
        calibration=summary,
        errors=dict(repair.result.errors),
        zeros=dict(repair.result.zeros),
    )


def prune_channels(
    model: ir.Model,
    options: Selection,
    settings: Structured,
    calibration: Calibration | None = None,
) -> Report:
    """Remove whole channels from `model`, in place: channel groups traced, classes ranked
    globally (by weight norms, or by their cost on the samples), sliced out; then the layers
    that read them re-solved (calibration) or the constants they carried folded into their
    readers' biases (`settings.compensate`)."""
    from onnxprune.selection import channels as channel_selection

    if options.pattern is not None:
        raise InvalidArgumentError("--pattern and --structured exclude each other")
    if options.method != "global":
        raise InvalidArgumentError("--structured ranks channels globally; leave out --method")
    includes = compile_patterns(options.include, "--include")
    excludes = compile_patterns(options.exclude, "--exclude")
    check_shape_names(settings.input_shapes, model_inputs(model))
    with step("tracing channels"):
        # what the report accounts for is named as the input names it, before preparation
        found = weights.find_weights(model)
        accounted = found.skipped + weights.account(model, found)
        fixed = {value.name: why for value, why in found.fixed.items()}
        channel_graph.prepare(model)
        graph = channel_graph.build(model, heads=settings.heads)
        channel_graph.freeze_tensors(graph, fixed)

    def named(layer: channel_graph.Layer, patterns: list) -> bool:
        return any(p.search(n) for p in patterns for n in (layer.name, layer.member.value.name))

    if includes:
        hit = [i for i, layer in enumerate(graph.layers) if not named(layer, includes)]
        channel_graph.freeze_layers(graph, hit, "not matched by --include")
    if excludes:
        hit = [i for i, layer in enumerate(graph.layers) if named(layer, excludes)]
        channel_graph.freeze_layers(graph, hit, "matched by --exclude")
    channel_graph.check_removable(graph)
    if calibration is not None or settings.compensate:  # the samples run through the weights
        run_through = weights.find_weights(model, include=options.include, exclude=options.exclude)
        weights.check_finite((w.name, w.tensor()) for w in run_through.weights)
    listed = {m.value.name for m in graph.members if m.role in ("out", "in")}
    listed |= {u.weight for u in graph.unreached}
    skipped = [(name, why) for name, why in accounted if name not in listed]
    select = {
        "min_keep": options.min_keep,
        "round_to": settings.round_to,
        "target": settings.target,
        "input_shapes": settings.input_shapes,
    }
    if calibration is not None:
        report = _calibrated_channels(model, graph, options.sparsity, select, calibration)
        report.skipped = skipped
        return report
    with step("ranking channels"):
        plan = channel_selection.plan_channels(model, graph, options.sparsity, **select)
    constants = None
    if settings.compensate and plan.removed.any():
        from onnxprune.repair import compensation

        with step("measuring the constants removed channels carry"):
            constants = compensation.measure(model, graph, plan, input_shapes=settings.input_shapes)
    with step("removing channels"):
        RemoveChannelsPass(plan)(model)
    if constants is not None:
        compensation.CompensateConstantsPass(constants)(model)
    return Report(plan=None, channels=plan, compensation=constants, skipped=skipped)


def _calibrated_channels(
    model: ir.Model,
    graph: channel_graph.ChannelGraph,
    sparsity: float,
    select: dict,
    options: Calibration,
) -> Report:
    """Channels chosen by what their removal costs on the samples, removed, and every layer
    that read them re-solved by least squares."""
    from onnxprune.channels.consumers import consumers
    from onnxprune.repair import RefitChannelsPass
    from onnxprune.scoring.channels import channel_importance, selection_steps
    from onnxprune.selection.channels import plan_channels, plan_channels_in_steps

    # argument errors and infeasible targets surface before any sample runs
    plan_channels(model, graph, sparsity, **select)
    importance = importances.get(options.criterion)
    found, unsolved = consumers(graph, weights.find_weights(model).weights)
    # channel removal reads columns as channels: a layer too wide is left without statistics
    stats, samples, runtime, summary = capture.measure(
        model, [c.weight for c in found], options, blocks=False
    )
    with step("scoring channels", total=len(found)) as meter:
        scores, unmeasured = channel_importance(
            graph, found, stats, importance, options.damp, advance=meter.advance
        )
    if unmeasured:
        summary.notices.append(
            f"{unmeasured} channel(s) are read by no measured layer (attention's Q and K, say): "
            "ranked by their share of their producers' output"
        )
    steps = selection_steps(importance, options.mode, options.steps, found, stats)

    with step(f"ranking channels in {steps} step(s)", total=steps) as meter:

        def rescore(removed):  # what removing one more class costs once these are gone
            meter.advance()
            return channel_importance(graph, found, stats, importance, options.damp, removed)[0]

        plan = plan_channels_in_steps(model, graph, sparsity, scores, rescore, steps, **select)
    left = [(w.name, why) for w, ids, why in unsolved if plan.removed[ids].any()]
    if left:
        summary.notices.append(
            f"{len(left)} layer(s) read removed channels but are not re-solved, their kept "
            f"weights left as they are: e.g. {left[0][0]}: {left[0][1]}"
        )
    sequential = options.mode == "sequential" and plan.removed.any()
    dense = copy_model(model) if sequential else None
    with step("removing channels"):
        RemoveChannelsPass(plan)(model)
    repair = RefitChannelsPass(plan, found, options, stats, samples, runtime, dense)
    repair(model)
    summary.bias_corrected += repair.result.bias_corrected
    summary.passes += repair.result.passes
    summary.notices += repair.result.notices
    thin = sum(not result.refit for result in repair.result.solved.values())
    if thin:
        summary.notices.append(
            f"{thin} layer(s) saw fewer calibration rows than their kept inputs: only their "
            "biases were corrected; more samples help"
        )
    return Report(plan=None, channels=plan, calibration=summary, errors=repair.result.errors)


class PrunePass(ir.passes.InPlacePass):
    """Everything `prune` does to a model in memory (find, capture, score, select, rewrite,
    repair), as one onnx-ir pass: put it in an `onnx_ir.passes.PassManager` next to your own.
    The report of the last run is in `self.report`.

        ir.passes.PassManager([MyCleanupPass(), PrunePass(Selection(0.5)), MyQuantizePass()])
    """

    def __init__(
        self,
        options: Selection,
        structured: Structured | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        super().__init__()
        if structured is not None and options.sensitivity is not None:
            raise InvalidArgumentError(SENSITIVITY_STRUCTURED)
        self.options, self.structured, self.calibration = options, structured, calibration
        self.report: Report | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dynamic_dims(model)  # -1 dims of a model built in memory (a file's are read so)
        if self.structured is not None:
            self.report = prune_channels(model, self.options, self.structured, self.calibration)
        else:
            self.report = prune_weights(model, self.options, self.calibration)
        return ir.passes.PassResult(model, modified=True)


# -- the workflow: load, prune, save, validate, report, gate ---------------------------------------


def calibration_options(
    calibration: Calibration | str | os.PathLike | None, criterion: str | None = None
) -> Calibration | None:
    """The calibration settings from the API's shorthand: a path (or samples), or a
    `Calibration`; `criterion` overrides its criterion."""
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


def input_files(
    *models: str | os.PathLike | None,
    data: object = None,
    calibration: object = None,
) -> dict[Path, str]:
    """The files a run reads: models (with their data files) and sample files (`data` and
    `calibration` count where they are paths)."""
    files: dict[Path, str] = {}
    given = [m for m in models if m is not None]
    for model in given:
        for path, what in io.input_files(model).items():
            files.setdefault(path, what if len(given) == 1 else f"{what} {model}")
    for path, what in ((data, "the --data file"), (calibration, "the --calibration file")):
        if isinstance(path, str | os.PathLike) and Path(path).is_dir():
            for shard in sample_files(path):
                files[shard] = f"a shard of {what.removesuffix(' file')}"
        elif isinstance(path, str | os.PathLike):
            files[Path(path)] = what
    return files


def check_outputs(
    inputs: dict[Path, str], outputs: Sequence[tuple[str | os.PathLike | None, str]], *, force: bool
) -> None:
    """Every file a run will write, checked before any work: none is an input or another output
    of the run, none exists without `force`, every folder is there and writable."""
    taken: dict[str | Path, str] = {}
    for path, what in outputs:
        if path is None:
            continue
        writer.check_destination(path, inputs=inputs, others=taken, force=force)
        taken[path] = what
        if what == "the output model":
            taken[Path(path).parent / next(io.data_file_names(Path(path)))] = "its data file"


def prune(
    model: str | os.PathLike | ir.Model,
    sparsity: float | Selection = 0.0,
    *,
    structured: bool | Structured = False,
    calibration: Calibration | str | os.PathLike | None = None,
    validation: Validation | None = None,
    save: Save | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    report: str | os.PathLike | None = None,
) -> tuple[ir.Model, Report]:
    """Prune a model (a path, or an `ir.Model` changed in place), save it to `output`, compare it
    with the original (`validation`) and write the report as JSON to `report`.

    `sparsity` is the share of prunable weights to zero, or a `Selection` (pattern, method,
    minimum retention, include/exclude). `structured` (True, or a `Structured`) removes whole
    channels instead: `sparsity` then counts parameters or MACs removed. `calibration` (an .npz
    of input samples, or a `Calibration`) ranks by what weights do on those samples and repairs
    what is left. `save` sets how the output is written; `force` lets it replace files. A gate
    of `validation` that fails raises `ValidationFailed` (its `.report` holds the numbers)
    after everything was written. Errors a user can cause raise `OnnxPruneError`.
    """
    start = time.perf_counter()
    options = sparsity if isinstance(sparsity, Selection) else Selection(sparsity)
    settings = Structured() if structured is True else structured or None
    calibration = calibration_options(calibration)
    save = save or Save()
    input_path = None if isinstance(model, ir.Model) else io.check_model_path(model)
    if output is not None or report is not None:
        check_outputs(
            input_files(
                input_path,
                data=None if validation is None else validation.data,
                calibration=None if calibration is None else calibration.data,
            ),
            [(output, "the output model"), (report, "the report")],
            force=force,
        )
    if validation is not None and input_path is None:
        raise InvalidArgumentError(
            "validation compares the pruned model with the original: give the model as a path"
        )
    if input_path is not None and (validation is not None or calibration is not None):
        _preflight(input_path, calibration, validation)
    if input_path is not None:
        with step(f"loading {input_path}"):
            model = io.load_model(input_path)
    assert isinstance(model, ir.Model)
    if validation is not None:
        check_shape_names(validation.input_shapes, model_inputs(model))
    if save.sparse_storage and output is not None:
        sparse.check_possible(model)  # before any work
    pruner = PrunePass(options, settings, calibration)
    pruner(model)
    result = pruner.report
    assert result is not None
    result.untaken = _untaken(model, calibration, validation)
    if input_path is not None:
        result.input_path = str(input_path)
        result.size_before = io.file_size(input_path)
    # every output is prepared under a temporary name, then all are put in place together: a
    # run that fails (data that does not fit, a full disk for the report) leaves what was there
    staged: list[writer.StagedFile] = []
    try:
        if output is not None:
            staged.append(_stage(model, result, output, input_path, save, force))
        result.seconds = round(time.perf_counter() - start, 3)
        if validation is not None:
            _validate(result, validation, staged[0] if staged else model)
        if report is not None:
            staged.insert(0, writer.stage_text(report, json_text(result.to_dict()), force=force))
        writer.commit_all(staged)  # the model last: its commit is the likeliest refused
    finally:
        for item in staged:
            item.discard()
    if output is not None:
        result.size_after = io.file_size(result.output_path)  # type: ignore[arg-type]
    if validation is not None:
        from onnxprune.validate import check_gates

        try:
            check_gates(result.validation, **validation.gates)
        except ValidationFailed as exc:
            exc.report = result  # type: ignore[attr-defined]
            raise
    return model, result


# Channel removal must make a model faster: a candidate within this share of the dense model's
# latency (timed in turns on the same batch) is reported as not faster.
FASTER_BY = 0.02


def not_faster(measured: ValidationResult) -> str | None:
    """The warning for a structured model that runs no faster than the dense one where it was
    timed (odd channel counts knock kernels off their blocked layouts; a Pad or Slice left
    between layers costs a copy), None where it is faster or was not timed."""
    ref, cand = measured.reference.latency, measured.candidate.latency
    if ref is None or cand is None or cand.median_ms < (1 - FASTER_BY) * ref.median_ms:
        return None
    ratio = cand.median_ms / ref.median_ms
    return (
        f"the pruned model is not faster on {measured.device}: {cand.median_ms:.3g} ms against "
        f"{ref.median_ms:.3g} ms per batch of {cand.batch_size} (x{ratio:.2f}, both timed in "
        "turns); round channel counts with --round-to 8 (or 16), or remove more"
    )


def _untaken(
    model: ir.Model, calibration: Calibration | None, validation: Validation | None
) -> list[weights.Untaken]:
    """The If branches that the run's inputs never take: decided by inputs fed one value for
    every sample (a sample rate) in the calibration samples, the validation data, or what
    validation generates (the value the graph compares the input with), under all of them."""
    from onnxprune import inputs as _inputs

    sources = []
    if calibration is not None:
        sources.append(_inputs.scalar_arrays(calibration.data, "--calibration"))
    if validation is not None and validation.data is not None:
        sources.append(_inputs.scalar_arrays(validation.data))
    elif validation is not None:
        from onnxprune.calibration import model_input_specs

        specs = {s.name: s for s in model_input_specs(model) if not s.shape}
        usable = _inputs.usable_values(model, list(specs.values()))
        sources.append(
            {
                name: np.asarray(u.fill, dtype=specs[name].dtype)
                for name, u in usable.items()
                if u.fill is not None
            }
        )
    sources = [s for s in sources if s]
    if not sources:
        return []
    found = weights.find_weights(model).weights
    runs = [weights.untaken(model, found, values) for values in sources]
    never = set.intersection(*({(u.node, u.branch) for u in run} for run in runs))
    return [u for u in runs[0] if (u.node, u.branch) in never]


def _preflight(model: Path, calibration: Calibration | None, validation: Validation | None) -> None:
    """Bad samples, batch size or gate values stop the run here, before a model is written."""
    from onnxprune.validate import preflight

    data = None if validation is None else validation.data
    calib = None if calibration is None else calibration.data
    axes = {
        **dict((calibration and calibration.batch_axes) or {}),
        **dict((validation and validation.batch_axes) or {}),
    }
    preflight(
        model,
        data=data if isinstance(data, str | os.PathLike) else None,
        calibration=calib if isinstance(calib, str | os.PathLike) else None,
        validating=validation is not None,
        batch_size=(validation or calibration).batch_size,  # type: ignore[union-attr]
        input_shapes=None if validation is None else validation.input_shapes,
        batch_axes=axes,
        metric="top1" if validation is None else validation.metric,
        **({} if validation is None else validation.gates),
    )


def _stage(
    model: ir.Model,
    result: Report,
    output: str | os.PathLike,
    input_path: Path | None,
    save: Save,
    force: bool,
) -> writer.StagedFile:
    """The pruned model written and checked under temporary names beside `output`."""
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
        result.extra["sparse_storage"] = layout.summary()
    result.output_path = str(staged.out)
    result.size_after = staged.size()
    return staged


def _validate(result: Report, options: Validation, candidate: object) -> None:
    """Run the original and the pruned model side by side (the pruned one as staged, before it
    is in place); the numbers go into the report. Data that only a run shows does not fit (an
    output width the file leaves open, ONNX Runtime refusing a batch) keeps no pruned model."""
    from onnxprune.validate import validate

    assert result.input_path is not None
    path = getattr(candidate, "path", None)
    try:
        measured = validate(
            result.input_path,
            str(path) if path is not None else candidate,  # type: ignore[arg-type]
            data=options.data,
            batch_size=options.batch_size,
            device=options.device,
            input_shapes=options.input_shapes,
            seed=options.seed,
            latency=options.latency,
            batch_axes=dict(options.batch_axes or {}),
            metric=options.metric,
        )
    except DataError as exc:
        said = str(exc) if path is None else str(exc).replace(str(path), str(result.output_path))
        raise DataError(f"{said} (no pruned model was kept)") from None
    if path is not None:  # measured on the prepared files: reported under their final name
        measured.candidate.path = str(result.output_path)
        if measured.candidate.cost is not None:
            measured.candidate.cost.file_bytes = result.size_after
    result.validation = measured
    slower = not_faster(measured)
    if result.channels is not None and slower is not None:
        result.warnings.append(slower)
    result.extra["validation"] = measured.to_dict()


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
    found.skipped += weights.account(model, found)
    if not found.weights:
        # the same error as pruning would give, so inspect answers "can this be pruned?"
        selection.plan(found.weights)
    return found, [(w, magnitude_stats(w.tensor())) for w in found.weights]


__all__ = [
    "CalibrationSummary",
    "PrunePass",
    "calibration_options",
    "check_outputs",
    "default_output",
    "input_files",
    "inspect",
    "prune",
    "prune_channels",
    "prune_weights",
]
