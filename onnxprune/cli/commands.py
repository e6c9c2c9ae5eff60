"""The commands: each maps its flags to options, calls the API and prints what it returns."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import click

from onnxprune.cli.app import debug_option, load_heavy, main, setup_logging, user_errors
from onnxprune.cli.flags import (
    calibration_options,
    calibration_settings,
    check_providers,
    device_settings,
    force_option,
    gate_options,
    metric_option,
    report_option,
    run_options,
    selection_options,
    structured_options,
    structured_settings,
    with_options,
)
from onnxprune.errors import InvalidArgumentError, ValidationFailed
from onnxprune.options import (
    SENSITIVITY_STRUCTURED,
    Save,
    Selection,
    Validation,
    check_batch_size,
    parse_batch_axes,
    parse_input_shapes,
)

log = logging.getLogger("onnxprune")


@main.command("prune")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--sparsity",
    "-s",
    type=float,
    default=None,
    help="Fraction of prunable weights to set to zero, in [0, 1).",
)
@with_options(selection_options)
@with_options(calibration_options)
@with_options(structured_options)
@click.option(
    "--pattern",
    default=None,
    metavar="N:M",
    help="Semi-structured sparsity instead of --sparsity: keep N of every M weights "
    "along the input-channel axis (2:4 for sparse tensor cores).",
)
@click.option(
    "--sensitivity",
    "sensitivity_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    metavar="FILE.json",
    help="A report of `onnxprune sensitivity`: a layer whose output error, pruned alone at "
    "--sparsity, exceeds --sensitivity-tolerance keeps at least what it kept at the highest "
    "measured sparsity within it (the whole layer if none); the rest is ranked as usual.",
)
@click.option(
    "--sensitivity-tolerance",
    "sensitivity_tolerance",
    type=float,
    default=None,
    metavar="ERROR",
    help="With --sensitivity: the relative output error a layer pruned alone may cause "
    "(default 0.05).",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(path_type=str),
    help="Output model (default: MODEL.pruned.onnx beside the input).",
)
@click.option("--force", is_flag=True, help="Overwrite the output (and report) if it exists.")
@report_option("the report")
@click.option(
    "--external-data/--no-external-data",
    "external_data",
    default=None,
    help="Store weights in a .data file beside the output (default: as the input).",
)
@click.option(
    "--sparse-storage/--dense-storage",
    "sparse_storage",
    default=None,
    help="Store weights as ONNX sparse initializers (COO) where that is smaller: less disk and "
    "download, the same memory once ONNX Runtime has loaded them (default: as the input).",
)
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run onnx.checker with full shape inference on the output before it is moved into place.",
)
@click.option(
    "--validate",
    "validate_",
    is_flag=True,
    help="Run the original and the pruned model in ONNX Runtime and compare them "
    "(implied by --data and the gate options).",
)
@with_options(run_options)
@with_options(gate_options)
@metric_option
@click.option("-q", "--quiet", is_flag=True, help="Print no table, only errors and warnings.")
@debug_option
@user_errors
def prune_command(
    model: str,
    sparsity: float | None,
    method: str,
    min_keep: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    calibration: str | None,
    criterion: str | None,
    calibration_mode: str,
    calibration_samples: int | None,
    bias_correction: bool,
    structured: bool,
    round_to: int | None,
    target: str,
    heads: bool,
    pattern: str | None,
    sensitivity_path: str | None,
    sensitivity_tolerance: float | None,
    output: str | None,
    force: bool,
    report_path: str | None,
    external_data: bool | None,
    sparse_storage: bool | None,
    check: bool,
    validate_: bool,
    data: str | None,
    batch_size: int | None,
    device: str,
    providers: tuple[str, ...],
    provider_options: tuple[str, ...],
    input_shape: tuple[str, ...],
    batch_axis: tuple[str, ...],
    seed: int,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    max_perplexity_ratio: float | None,
    metric: str,
    quiet: bool,
) -> None:
    """Prune MODEL and write the pruned copy; the input is never modified."""
    setup_logging(quiet)
    if sparsity is None and pattern is None:
        raise click.UsageError("give --sparsity (e.g. --sparsity 0.9) or --pattern (e.g. 2:4)")
    if sparsity is not None and pattern is not None:
        raise click.UsageError("--sparsity and --pattern exclude each other")
    if sensitivity_path is None and sensitivity_tolerance is not None:
        raise InvalidArgumentError("--sensitivity-tolerance needs --sensitivity FILE.json")
    if sensitivity_path is not None and structured:
        raise InvalidArgumentError(SENSITIVITY_STRUCTURED)
    check_batch_size(batch_size)
    shapes = parse_input_shapes(input_shape)
    axes = parse_batch_axes(batch_axis)
    options = Selection(
        sparsity or 0.0,
        method=method,
        min_keep=min_keep,
        pattern=pattern,
        include=include,
        exclude=exclude,
        sensitivity={} if sensitivity_path else None,  # filled below: an N:M pattern refused now
    )
    channels = structured_settings(
        structured,
        target=target,
        round_to=round_to,
        heads=heads,
        compensate=bias_correction,
        input_shapes=shapes,
    )
    gates = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
        "min_cosine": min_cosine,
        "max_perplexity_ratio": max_perplexity_ratio,
    }
    validating = (
        validate_
        or data is not None
        or metric != "top1"
        or any(v is not None for v in gates.values())
    )
    where = device_settings(device, providers, provider_options)
    validation = (
        Validation(
            data, batch_size, where, shapes, seed, metric=metric, **gates, batch_axes=axes or None
        )
        if validating
        else None
    )
    load_heavy()
    check_providers(where)
    settings = calibration_settings(
        calibration,
        criterion,
        calibration_mode,
        calibration_samples,
        bias_correction or (structured and calibration is None),
        batch_size,
        where,
        axes,
    )
    from onnxprune import pipeline

    if sensitivity_path is not None:
        from onnxprune.validate.sensitivity import DEFAULT_TOLERANCE, protected_keep

        tolerance = DEFAULT_TOLERANCE if sensitivity_tolerance is None else sensitivity_tolerance
        keep = protected_keep(sensitivity_path, options.sparsity, tolerance)
        options = dataclasses.replace(options, sensitivity=keep)
    try:
        _, report = pipeline.prune(
            model,
            options,
            structured=channels or False,
            calibration=settings,
            validation=validation,
            save=Save(external_data=external_data, sparse_storage=sparse_storage, check=check),
            output=output or str(pipeline.default_output(model)),
            force=force,
            report=report_path,
        )
    except ValidationFailed as exc:
        _print_run(exc.report, quiet)  # type: ignore[attr-defined]
        raise
    _print_run(report, quiet)
    if validation is None:
        from onnxprune.report.weights import unvalidated_note

        log.info("%s", unvalidated_note(model, report))


def _print_run(report: Any, quiet: bool) -> None:
    """The run's tables (prune, then validation), or only its warnings with --quiet."""
    from onnxprune.report.weights import format_report

    if quiet:
        for warning in report.warnings:
            click.echo(f"onnxprune: warning: {warning}", err=True)
        return
    click.echo(format_report(report))
    if report.validation is not None:
        from onnxprune.report.validation import format_validation

        click.echo(format_validation(report.validation))


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--sparsity",
    "-s",
    type=float,
    default=None,
    help="Also show what pruning at this sparsity would keep per layer.",
)
@with_options(selection_options)
@report_option("the same numbers")
@force_option
@with_options(structured_options)
@debug_option
@user_errors
def inspect_command(
    model: str,
    sparsity: float | None,
    method: str,
    min_keep: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    report_path: str | None,
    force: bool,
    structured: bool,
    round_to: int | None,
    target: str,
    heads: bool,
) -> None:
    """List MODEL's prunable layers, magnitudes and what pruning would keep; writes nothing.

    With --structured: the channels per layer, the frozen channel groups and why, and (with
    --sparsity) how many channels each layer would keep.
    """
    setup_logging(False)
    options = Selection(
        sparsity or 0.0, method=method, min_keep=min_keep, include=include, exclude=exclude
    )
    channels = structured_settings(structured, target=target, round_to=round_to, heads=heads)
    load_heavy()
    from onnxprune import pipeline, selection
    from onnxprune.report import write_json

    pipeline.check_outputs(pipeline.input_files(model), [(report_path, "the report")], force=force)
    if channels is not None:
        from onnxprune.report.weights import format_report

        # what would go, not a model to keep: the constants need not be measured
        channels = dataclasses.replace(channels, compensate=False)
        _, report = pipeline.prune(model, options, structured=channels)
        click.echo(format_report(report))
        if report_path:
            write_json(report.to_dict(), report_path, force=force)
        return
    found, stats = pipeline.inspect(model, include=include, exclude=exclude)
    plan = None
    if sparsity is not None:
        plan = selection.plan(found.weights, sparsity, method=method, min_keep=min_keep)
    from onnxprune.report.weights import format_inspect

    click.echo(format_inspect(stats, plan))
    for name, reason in found.skipped:
        click.echo(f"skipped {name}: {reason}")
    if report_path:
        data = {
            "input": model,
            "layers": [
                {
                    "name": w.name,
                    "op": w.op_type,
                    "shape": list(w.shape),
                    "dtype": w.dtype.name,
                    "params": s.size,
                    "zeros": s.zeros,
                    "min_abs": s.min,
                    "mean_abs": s.mean,
                    "max_abs": s.max,
                    "std_abs": s.std,
                }
                for w, s in stats
            ],
            "skipped": [{"name": n, "reason": r} for n, r in found.skipped],
        }
        if plan is not None:
            from onnxprune.report import Report

            data["plan"] = Report(plan=plan).to_dict()
        write_json(data, report_path, force=force)
