"""The commands: each maps its flags to options, calls the API and prints what it returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from onnxprune import pipeline, selection
from onnxprune.cli.app import debug_option, main, setup_logging, user_errors
from onnxprune.cli.flags import (
    calibration_options,
    calibration_settings,
    gate_options,
    run_options,
    selection_options,
    structured_options,
    structured_settings,
    with_options,
)
from onnxprune.errors import ValidationFailed
from onnxprune.options import MinKeep
from onnxprune.report import write_json
from onnxprune.storage import writer


def _run_validation(
    reference: str,
    candidate: str,
    *,
    data: str | None,
    batch_size: int | None,
    device: str,
    input_shape: tuple[str, ...],
    seed: int,
) -> Any:
    from onnxprune import inputs, validate

    return validate.validate(
        reference,
        candidate,
        data=data,
        batch_size=batch_size,
        device=device,
        input_shapes=inputs.parse_input_shapes(input_shape),
        seed=seed,
    )


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
    "-o",
    "--output",
    default=None,
    type=click.Path(path_type=str),
    help="Output model (default: MODEL.pruned.onnx beside the input).",
)
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(path_type=str),
    help="Write the report as JSON to this file.",
)
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
    input_shape: tuple[str, ...],
    seed: int,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    quiet: bool,
) -> None:
    """Prune MODEL and write the pruned copy; the input is never modified."""
    setup_logging(quiet)
    if sparsity is None and pattern is None:
        raise click.UsageError("give --sparsity (e.g. --sparsity 0.9) or --pattern (e.g. 2:4)")
    if sparsity is not None and pattern is not None:
        raise click.UsageError("--sparsity and --pattern exclude each other")
    from onnxprune.inputs import check_batch_size, parse_input_shapes
    from onnxprune.options import Save, Selection, Validation

    check_batch_size(batch_size)
    shapes = parse_input_shapes(input_shape)
    options = Selection(
        sparsity or 0.0,
        method=method,
        min_keep=min_keep,
        pattern=pattern,
        include=include,
        exclude=exclude,
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
    }
    validating = validate_ or data is not None or any(v is not None for v in gates.values())
    validation = Validation(data, batch_size, device, shapes, seed, **gates) if validating else None
    settings = calibration_settings(
        calibration,
        criterion,
        calibration_mode,
        calibration_samples,
        bias_correction or (structured and calibration is None),
        batch_size,
        device,
    )
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
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(path_type=str),
    help="Write the same numbers as JSON to this file.",
)
@click.option("--force", is_flag=True, help="Overwrite the files it writes if they exist.")
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
    from onnxprune.options import Selection

    setup_logging(False)
    options = Selection(
        sparsity or 0.0, method=method, min_keep=min_keep, include=include, exclude=exclude
    )
    channels = structured_settings(structured, target=target, round_to=round_to, heads=heads)
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


@main.command("validate")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=str))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=str))
@with_options(run_options)
@with_options(gate_options)
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(path_type=str),
    help="Write the numbers as JSON to this file.",
)
@click.option("--force", is_flag=True, help="Overwrite the files it writes if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print no table, only errors and the verdict.")
@debug_option
@user_errors
def validate_command(
    reference: str,
    candidate: str,
    data: str | None,
    batch_size: int | None,
    device: str,
    input_shape: tuple[str, ...],
    seed: int,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    report_path: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE in ONNX Runtime: any two models with the same inputs.

    \b
      onnxprune validate model.onnx model.pruned.onnx --data val.npz --max-accuracy-drop 0.01
    """
    from onnxprune import inputs
    from onnxprune.report.validation import format_validation
    from onnxprune.validate import check_gates, preflight

    setup_logging(quiet)
    preflight(
        reference,
        data=data,
        batch_size=batch_size,
        input_shapes=inputs.parse_input_shapes(input_shape),
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
    )
    pipeline.check_outputs(
        pipeline.input_files(reference, candidate, data=data),
        [(report_path, "the report")],
        force=force,
    )
    result = _run_validation(
        reference,
        candidate,
        data=data,
        batch_size=batch_size,
        device=device,
        input_shape=input_shape,
        seed=seed,
    )
    if not quiet:
        click.echo(format_validation(result))
    if report_path:
        write_json(result.to_dict(), report_path, force=force)
    check_gates(
        result,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
    )


@main.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--sparsities",
    default="0.5,0.8,0.9,0.95,0.98",
    show_default=True,
    help="Comma-separated sparsities to prune at.",
)
@click.option(
    "--min-keep",
    "min_keep",
    default="0.01",
    show_default=True,
    metavar="FRACTION|COUNT",
    help="Minimum retention per layer for the global+min-keep line, a fraction (0.01, 1%) or "
    "a count (100), as in prune --help (0 leaves that line out).",
)
@with_options(structured_options)
@with_options(run_options)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Calibration samples (.npz): compare calibrated criteria with plain magnitude.",
)
@click.option(
    "--criteria",
    default="magnitude,wanda,sparsegpt",
    show_default=True,
    help="With --calibration: the criteria to compare, comma-separated.",
)
@click.option(
    "--calibration-mode",
    "calibration_mode",
    type=click.Choice(["one-pass", "sequential"]),
    default="sequential",
    show_default=True,
    help="With --calibration: how layers are measured (see prune --help).",
)
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Draw accuracy (agreement without labels) against sparsity to this PNG "
    "(needs matplotlib: pip install 'onnxprune[plot]').",
)
@click.option(
    "--markdown",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Write the accuracy table as Markdown to this file.",
)
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(path_type=str),
    help="Write every row as JSON to this file.",
)
@click.option("--force", is_flag=True, help="Overwrite the files it writes if they exist.")
@debug_option
@user_errors
def sweep_command(
    model: str,
    sparsities: str,
    min_keep: str,
    structured: bool,
    round_to: int | None,
    target: str,
    heads: bool,
    data: str | None,
    batch_size: int | None,
    device: str,
    input_shape: tuple[str, ...],
    seed: int,
    calibration: str | None,
    criteria: str,
    calibration_mode: str,
    plot: str | None,
    markdown: str | None,
    report_path: str | None,
    force: bool,
) -> None:
    """Prune MODEL at each sparsity with global, global+min-keep and uniform; validate each.

    With --structured: channel removal with and without the minimum retention, timed too.
    With --calibration: plain global magnitude against each calibrated criterion.

    \b
      onnxprune sweep model.onnx --data val.npz --sparsities 0.5,0.9,0.98 --plot sweep.png
      onnxprune sweep model.onnx --data val.npz --structured --round-to 8 --sparsities 0.1,0.3
      onnxprune sweep model.onnx --data val.npz --calibration calib.npz --min-keep 0
      onnxprune sweep model.onnx --data val.npz --structured --calibration calib.npz
    """
    from onnxprune import inputs, sweep
    from onnxprune.report import json_text
    from onnxprune.report import sweep as report_sweep
    from onnxprune.validate import preflight

    setup_logging(False)
    # every argument before any file: a bad value is the first complaint
    shapes = inputs.parse_input_shapes(input_shape)
    channels = structured_settings(
        structured, target=target, round_to=round_to, heads=heads, input_shapes=shapes
    )
    points = sweep.parse_sparsities(sparsities)
    MinKeep.parse(min_keep)
    chosen = [c.strip() for c in criteria.split(",") if c.strip()]
    sweep.methods_for(min_keep, channels is not None, chosen if calibration is not None else None)
    settings = calibration_settings(
        calibration, None, calibration_mode, None, True, batch_size, device
    )
    inputs.check_batch_size(batch_size)
    preflight(model, data=data, calibration=calibration, batch_size=batch_size, input_shapes=shapes)
    pipeline.check_outputs(
        pipeline.input_files(model, data=data, calibration=calibration),
        [(markdown, "the Markdown table"), (plot, "the plot"), (report_path, "the report")],
        force=force,
    )
    if plot:
        report_sweep.check_plotting()
    result = sweep.sweep(
        model,
        points,
        data=data,
        min_keep=min_keep,
        batch_size=batch_size,
        device=device,
        input_shapes=shapes,
        seed=seed,
        structured=channels,
        calibration=settings,
        criteria=chosen,
    )
    click.echo(report_sweep.format_sweep(result))
    outputs: list[writer.StagedFile] = []
    try:  # all of them or none
        if markdown:
            text = report_sweep.format_markdown(result) + "\n"
            outputs.append(writer.stage_text(markdown, text, force=force))
        if plot:
            outputs.append(writer.stage_file(plot, report_sweep.drawing(result), force=force))
        if report_path:
            outputs.append(writer.stage_text(report_path, json_text(result.to_dict()), force=force))
        writer.commit_all(outputs)
    finally:
        for item in outputs:
            item.discard()
    if plot:
        click.echo(f"plot written to {plot}")
