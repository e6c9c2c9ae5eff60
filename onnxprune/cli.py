"""Command line: parses, calls the API, prints. No logic of its own."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from onnxprune import __version__, pipeline, selection
from onnxprune.errors import OnnxPruneError
from onnxprune.report import format_inspect, format_report, write_json


class DefaultCommandGroup(click.Group):
    """`onnxprune MODEL ...` means `onnxprune prune MODEL ...`; named subcommands work as usual."""

    default_command = "prune"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Errors a user can cause: one line on stderr, exit code 2 (1 for a failed gate)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OnnxPruneError as exc:
            click.echo(f"onnxprune: error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))

    return wrapper


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("onnxprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("onnxprune: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
def main() -> None:
    """Prune ONNX models: global magnitude pruning with a per-layer minimum retention.

    \b
      onnxprune model.onnx --sparsity 0.9            writes model.pruned.onnx, prints a table
      onnxprune inspect model.onnx --sparsity 0.9    what would be pruned; writes nothing
    """


selection_options = [
    click.option(
        "--method",
        type=click.Choice(selection.METHODS),
        default="global",
        show_default=True,
        help="global: one magnitude ranking over all layers; uniform: the same sparsity "
        "in every layer.",
    ),
    click.option(
        "--min-keep",
        "min_keep",
        default=None,
        metavar="FRACTION|COUNT",
        help="Every layer keeps at least this many of its largest weights: a fraction "
        "of the layer (0.02 or 2%) or a count (100).",
    ),
    click.option(
        "--include",
        multiple=True,
        metavar="REGEX",
        help="Prune only weights whose name or node name matches (repeatable).",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Never prune weights whose name or node name matches (repeatable).",
    ),
]


def with_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


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
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run onnx.checker with full shape inference on the output before it is moved into place.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print no table, only errors and warnings.")
@user_errors
def prune_command(
    model: str,
    sparsity: float | None,
    method: str,
    min_keep: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    pattern: str | None,
    output: str | None,
    force: bool,
    report_path: str | None,
    external_data: bool | None,
    check: bool,
    quiet: bool,
) -> None:
    """Prune MODEL and write the pruned copy; the input is never modified."""
    _setup_logging(quiet)
    if sparsity is None and pattern is None:
        raise click.UsageError("give --sparsity (e.g. --sparsity 0.9) or --pattern (e.g. 2:4)")
    if sparsity is not None and pattern is not None:
        raise click.UsageError("--sparsity and --pattern exclude each other")
    _, report = pipeline.prune(
        model,
        sparsity or 0.0,
        method=method,
        min_keep=min_keep,
        pattern=pattern,
        include=include,
        exclude=exclude,
        output=output or pipeline.default_output(model),
        force=force,
        external_data=external_data,
        check=check,
    )
    if not quiet:
        click.echo(format_report(report))
    else:
        for warning in report.warnings:
            click.echo(f"onnxprune: warning: {warning}", err=True)
    if report_path:
        write_json(report.to_dict(), report_path)


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
@user_errors
def inspect_command(
    model: str,
    sparsity: float | None,
    method: str,
    min_keep: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    report_path: str | None,
) -> None:
    """List MODEL's prunable layers, magnitudes and what pruning would keep; writes nothing."""
    _setup_logging(False)
    found, stats = pipeline.inspect(model, include=include, exclude=exclude)
    plan = None
    if sparsity is not None:
        plan = selection.plan(found.weights, sparsity, method=method, min_keep=min_keep)
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
        write_json(data, report_path)
