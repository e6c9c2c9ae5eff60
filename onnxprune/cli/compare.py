"""The commands that compare models: validate (any two), sweep (methods at several sparsities, or
the highest sparsity within a budget), sensitivity (each layer pruned alone). Each maps its flags
to options, calls the API, prints."""

from __future__ import annotations

from typing import Any

import click

from onnxprune.cli.app import debug_option, load_heavy, main, setup_logging, user_errors
from onnxprune.cli.flags import (
    calibration_mode_option,
    calibration_option,
    calibration_settings,
    check_providers,
    device_settings,
    force_option,
    gate_options,
    metric_option,
    report_option,
    run_options,
    structured_options,
    structured_settings,
    with_options,
)
from onnxprune.errors import InvalidArgumentError
from onnxprune.options import (
    Budget,
    MinKeep,
    Validation,
    check_batch_size,
    parse_batch_axes,
    parse_input_shapes,
    parse_sparsities,
)


@main.command("validate")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=str))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=str))
@with_options(run_options)
@with_options(gate_options)
@metric_option
@report_option("the numbers")
@force_option
@click.option("-q", "--quiet", is_flag=True, help="Print no table, only errors and the verdict.")
@debug_option
@user_errors
def validate_command(
    reference: str,
    candidate: str,
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
    report_path: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Compare CANDIDATE with REFERENCE in ONNX Runtime: any two models with the same inputs.

    \b
      onnxprune validate model.onnx model.pruned.onnx --data val.npz --max-accuracy-drop 0.01
      onnxprune validate lm.onnx lm.pruned.onnx --data tokens.npz --metric perplexity
    """
    setup_logging(quiet)
    options = Validation(
        data,
        batch_size,
        device_settings(device, providers, provider_options),
        parse_input_shapes(input_shape),
        seed,
        max_accuracy_drop,
        min_agreement,
        min_cosine,
        metric=metric,
        max_perplexity_ratio=max_perplexity_ratio,
        batch_axes=parse_batch_axes(batch_axis) or None,
    )
    load_heavy()
    check_providers(options.device)
    from onnxprune import pipeline
    from onnxprune.report import write_json
    from onnxprune.report.validation import format_validation
    from onnxprune.validate import check_gates, preflight, validate

    preflight(
        reference,
        data=data,
        batch_size=batch_size,
        input_shapes=options.input_shapes,
        batch_axes=dict(options.batch_axes or {}),
        metric=metric,
        **options.gates,
    )
    pipeline.check_outputs(
        pipeline.input_files(reference, candidate, data=data),
        [(report_path, "the report")],
        force=force,
    )
    result = validate(
        reference,
        candidate,
        data=data,
        batch_size=batch_size,
        device=options.device,
        input_shapes=options.input_shapes,
        seed=seed,
        metric=metric,
        batch_axes=dict(options.batch_axes or {}),
    )
    if not quiet:
        click.echo(format_validation(result))
    if report_path:
        write_json(result.to_dict(), report_path, force=force)
    check_gates(result, **options.gates)


@main.command("sweep")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--sparsities",
    default="0.5,0.8,0.9,0.95,0.98",
    show_default=True,
    help="Comma-separated sparsities to prune at (with a budget: the coarse grid, walked "
    "upwards, before bisection).",
)
@click.option(
    "--min-keep",
    "min_keep",
    default="0.01",
    show_default=True,
    metavar="FRACTION|COUNT",
    help="Minimum retention per layer for the global+min-keep line, a fraction (0.01, 1%) or "
    "a count (100), as in prune --help (0 leaves that line out; with a budget, 0 prunes "
    "without it).",
)
@with_options(structured_options)
@with_options(run_options)
@calibration_option
@click.option(
    "--criteria",
    default=None,
    help="With --calibration: the criteria to compare, comma-separated (default: magnitude,"
    "wanda,sparsegpt; with a budget, one criterion, sparsegpt by default).",
)
@calibration_mode_option
@with_options(gate_options)
@metric_option
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(path_type=str),
    help="With a budget (a gate option): where the picked model goes (default: MODEL.pruned.onnx).",
)
@click.option(
    "--bisections",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="With a budget: bisection steps between the last sparsity within it and the first "
    "outside.",
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
@report_option("every row (with a budget: the picked model's report and the search)")
@force_option
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
    providers: tuple[str, ...],
    provider_options: tuple[str, ...],
    input_shape: tuple[str, ...],
    batch_axis: tuple[str, ...],
    seed: int,
    calibration: str | None,
    criteria: str | None,
    calibration_mode: str,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    max_perplexity_ratio: float | None,
    metric: str,
    output: str | None,
    bisections: int,
    plot: str | None,
    markdown: str | None,
    report_path: str | None,
    force: bool,
) -> None:
    """Prune MODEL at each sparsity with global, global+min-keep and uniform; validate each.

    With --structured: channel removal with and without the minimum retention, timed too.
    With --calibration: plain global magnitude against each calibrated criterion. With a budget
    (--max-accuracy-drop, --min-agreement, --min-cosine, --max-perplexity-ratio): the highest
    sparsity within it, found by bisection after the grid, written with its report.

    \b
      onnxprune sweep model.onnx --data val.npz --sparsities 0.5,0.9,0.98 --plot sweep.png
      onnxprune sweep model.onnx --data val.npz --structured --round-to 8 --sparsities 0.1,0.3
      onnxprune sweep model.onnx --data val.npz --calibration calib.npz --min-keep 0
      onnxprune sweep model.onnx --data val.npz --calibration calib.npz --max-accuracy-drop 0.01
    """
    setup_logging(False)
    gates = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
        "min_cosine": min_cosine,
        "max_perplexity_ratio": max_perplexity_ratio,
    }
    budget = Budget(**gates) if any(v is not None for v in gates.values()) else None
    if budget is None and output is not None:
        raise InvalidArgumentError(
            "-o/--output writes the model a budget picks: add --max-accuracy-drop, "
            "--min-agreement, --min-cosine or --max-perplexity-ratio"
        )
    names = [c.strip() for c in (criteria or "").split(",") if c.strip()]
    if budget is not None and len(names) > 1:
        raise InvalidArgumentError(
            f"--criteria {criteria}: a sweep with a budget prunes with one criterion; name one"
        )
    # every argument before any file: a bad value is the first complaint
    shapes = parse_input_shapes(input_shape)
    axes = parse_batch_axes(batch_axis)
    check_batch_size(batch_size)
    MinKeep.parse(min_keep)
    channels = structured_settings(
        structured, target=target, round_to=round_to, heads=heads, input_shapes=shapes
    )
    where = device_settings(device, providers, provider_options)
    if budget is not None:
        budget.check(metric)
    load_heavy()
    check_providers(where)
    settings = calibration_settings(
        calibration, None, calibration_mode, None, True, batch_size, where, axes
    )
    from onnxprune import pipeline, sweep
    from onnxprune.report import sweep as report_sweep
    from onnxprune.validate import preflight

    sweep.parse_sparsities(sparsities)
    if budget is None:
        sweep.methods_for(min_keep, channels is not None, names if calibration else None)
    preflight(
        model,
        data=data,
        calibration=calibration,
        batch_size=batch_size,
        input_shapes=shapes,
        batch_axes=axes,
        metric=metric,
        **gates,
    )
    out = None if budget is None else output or str(pipeline.default_output(model))
    pipeline.check_outputs(
        pipeline.input_files(model, data=data, calibration=calibration),
        [
            (out, "the output model"),
            (markdown, "the Markdown table"),
            (plot, "the plot"),
            (report_path, "the report"),
        ],
        force=force,
    )
    if plot:
        report_sweep.check_plotting()
    run = {
        "data": data,
        "batch_size": batch_size,
        "device": where,
        "input_shapes": shapes,
        "seed": seed,
        "structured": channels,
        "metric": metric,
        "batch_axes": axes,
    }
    picked = None
    if budget is None:
        result = _compare(model, sparsities, min_keep, settings, names, run)
        click.echo(report_sweep.format_sweep(result))
        summary: dict[str, Any] = result.to_dict()
    else:
        if settings is not None and names:
            settings = pipeline.calibration_options(settings, names[0])
        picked = sweep.pick(
            model, budget, sweep.parse_sparsities(sparsities), min_keep=min_keep,
            calibration=settings, steps=bisections, **run,
        )  # fmt: skip
        click.echo(report_sweep.format_pick(picked))
        result = picked.sweep
        summary = {"search": picked.to_dict()}
        if picked.best is not None:
            summary = _write_pick(model, picked, settings, run, budget, out, force) | summary
    _extras(result, markdown, plot, report_path, summary, force)
    if picked is not None and picked.best is None:
        from onnxprune.errors import ValidationFailed

        raise ValidationFailed("no sparsity tried stays within the budget; nothing was written")


def _compare(
    model: str,
    sparsities: str,
    min_keep: str,
    settings: Any,
    criteria: list[str],
    run: dict[str, Any],
) -> Any:
    """The comparison sweep: every method at every sparsity."""
    from onnxprune import sweep

    return sweep.sweep(
        model,
        sweep.parse_sparsities(sparsities),
        min_keep=min_keep,
        calibration=settings,
        criteria=criteria or None,
        **run,
    )


def _write_pick(
    model: str,
    picked: Any,
    settings: Any,
    run: dict[str, Any],
    budget: Budget,
    output: str | None,
    force: bool,
) -> dict[str, Any]:
    """The picked sparsity pruned again (the same model, deterministically), written, validated
    with the budget as gates; its report's numbers."""
    from onnxprune import pipeline
    from onnxprune.options import Selection
    from onnxprune.report.validation import format_validation

    best = picked.best
    keep = None if picked.sweep.min_keep in (None, "0") else picked.sweep.min_keep
    validation = Validation(
        run["data"],
        run["batch_size"],
        run["device"],
        run["input_shapes"],
        run["seed"],
        metric=run["metric"],
        batch_axes=run["batch_axes"] or None,
        **budget.limits,
    )
    _, report = pipeline.prune(
        model,
        Selection(best.sparsity, min_keep=keep),
        structured=run["structured"] or False,
        calibration=settings,
        validation=validation,
        output=output,
        force=force,
    )
    if report.validation is not None:
        click.echo(format_validation(report.validation))
    click.echo(f"written to {report.output_path}")
    return report.to_dict()


def _extras(
    result: Any,
    markdown: str | None,
    plot: str | None,
    report_path: str | None,
    summary: dict[str, Any],
    force: bool,
) -> None:
    """The Markdown table, the plot and the JSON report, where asked for: all of them or none."""
    from onnxprune.report import json_text
    from onnxprune.report import sweep as report_sweep
    from onnxprune.storage import writer

    outputs: list[writer.StagedFile] = []
    try:
        if markdown:
            text = report_sweep.format_markdown(result) + "\n"
            outputs.append(writer.stage_text(markdown, text, force=force))
        if plot:
            outputs.append(writer.stage_file(plot, report_sweep.drawing(result), force=force))
        if report_path:
            outputs.append(writer.stage_text(report_path, json_text(summary), force=force))
        writer.commit_all(outputs)
    finally:
        for item in outputs:
            item.discard()
    if plot:
        click.echo(f"plot written to {plot}")


@main.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--sparsities",
    default="0.5,0.8,0.95",
    show_default=True,
    help="Comma-separated sparsities to prune each layer to, alone.",
)
@with_options(run_options)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(path_type=str),
    help="Run these samples instead of --data (a calibration .npz or folder of shards): only "
    "how far the outputs move is measured, so any representative inputs do.",
)
@report_option("every layer's numbers (what prune --sensitivity reads)")
@force_option
@debug_option
@user_errors
def sensitivity_command(
    model: str,
    sparsities: str,
    data: str | None,
    batch_size: int | None,
    device: str,
    providers: tuple[str, ...],
    provider_options: tuple[str, ...],
    input_shape: tuple[str, ...],
    batch_axis: tuple[str, ...],
    seed: int,
    calibration: str | None,
    report_path: str | None,
    force: bool,
) -> None:
    """Prune each layer of MODEL alone, by magnitude, at each sparsity; say how far the outputs
    move from the dense model's (smallest cosine, relative error, top-1 agreement).

    The dense model runs once; each layer's pruned model runs on the same inputs. Fragile
    layers are marked; `prune --sensitivity FILE.json` keeps more of them.

    \b
      onnxprune sensitivity model.onnx --data val.npz --report sensitivity.json
      onnxprune prune model.onnx -s 0.9 --sensitivity sensitivity.json
    """
    setup_logging(False)
    if data is not None and calibration is not None:
        raise InvalidArgumentError(
            "--data and --calibration are both inputs to run: give one of them"
        )
    levels = parse_sparsities(sparsities)
    shapes = parse_input_shapes(input_shape)
    axes = parse_batch_axes(batch_axis)
    check_batch_size(batch_size)
    where = device_settings(device, providers, provider_options)
    load_heavy()
    check_providers(where)
    from onnxprune import pipeline
    from onnxprune.report import write_json
    from onnxprune.report.sensitivity import format_sensitivity
    from onnxprune.validate import preflight
    from onnxprune.validate.sensitivity import sensitivity

    preflight(
        model,
        data=data,
        calibration=calibration,
        validating=calibration is None,
        batch_size=batch_size,
        input_shapes=shapes,
        batch_axes=axes,
    )
    pipeline.check_outputs(
        pipeline.input_files(model, data=data, calibration=calibration),
        [(report_path, "the report")],
        force=force,
    )
    result = sensitivity(
        model,
        levels,
        data=data if calibration is None else calibration,
        batch_size=batch_size,
        device=where,
        input_shapes=shapes,
        seed=seed,
        batch_axes=axes,
    )
    click.echo(format_sensitivity(result))
    if report_path:
        write_json(result.to_dict(), report_path, force=force)
