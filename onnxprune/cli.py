"""Command line: parses, calls the API, prints. No logic of its own."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from onnxprune import __version__, io, pipeline, selection, writer
from onnxprune.errors import InvalidArgumentError, OnnxPruneError
from onnxprune.report import format_inspect, format_report, json_text, write_json

DEBUG_ENV = "ONNXPRUNE_DEBUG"


def _debugging(args: list[str] | tuple[str, ...] | None = None) -> bool:
    """--debug anywhere on the command line, or ONNXPRUNE_DEBUG=1: tracebacks are shown."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("debug"):
        return True
    return "--debug" in (sys.argv[1:] if args is None else args)


def _interrupted(exc: KeyboardInterrupt) -> int:
    """One line saying what an interrupted run left in place; the exit code (128 + signal)."""
    done = writer.written()
    what = f"{', '.join(map(str, done))} was written whole" if done else "nothing was written"
    signum = getattr(exc, "signum", signal.SIGINT)
    name = (
        "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    )
    click.echo(f"onnxprune: {name}; {what}", err=True)
    return 128 + int(signum)


def _internal_error(exc: BaseException, debug: bool) -> int:
    """A bug, not the user's doing: one line asking for a report; the traceback with --debug."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    first = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(
        f"onnxprune: internal error: {type(exc).__name__}{': ' + first if first else ''}. "
        "This is a bug in onnxprune: please report it with the output of the same command run "
        "with --debug",
        err=True,
    )
    return 3


class DefaultCommandGroup(click.Group):
    """`onnxprune MODEL ...` means `onnxprune prune MODEL ...`; named subcommands work as usual.

    Every way out is one line on stderr and a documented exit code: 0 done, 1 a validation gate
    failed, 2 a user error (argument, path, model, data), 3 a bug, 130 Ctrl-C, 143 SIGTERM.
    """

    default_command = "prune"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        argv = list(sys.argv[1:] if args is None else args)
        writer.forget_written()
        try:
            with warnings.catch_warnings():
                if not _debugging(argv):
                    # numpy's "invalid value" notes on a damaged model's NaN weights are not
                    # lines for a user: the outcome is said in the one line of the result
                    warnings.simplefilter("ignore", RuntimeWarning)
                code = super().main(argv, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Abort as exc:  # an interrupt while click parsed the arguments
            cause = exc.__cause__
            sys.exit(
                _interrupted(cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt())
            )
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "onnxprune"
            message = exc.format_message().rstrip(".")
            click.echo(f"onnxprune: error: {message} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"onnxprune: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except (Exception, KeyboardInterrupt) as exc:  # outside a command: in click's parsing
            sys.exit(_failed(exc, _debugging(argv)))
        sys.exit(code if isinstance(code, int) else 0)


def _failed(exc: Exception | KeyboardInterrupt, debug: bool) -> int:
    """One line on stderr for a command that did not finish; its exit code."""
    if isinstance(exc, OnnxPruneError):
        click.echo(f"onnxprune: error: {exc}", err=True)
        return getattr(exc, "exit_code", 2)
    if isinstance(exc, KeyboardInterrupt):
        return _interrupted(exc)
    return _internal_error(exc, debug)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Inside a command: errors a user can cause are one line and exit 2 (1 for a failed gate),
    an interrupt one line and 130 (143 for SIGTERM), anything else a bug: exit 3."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own: the group says them
        except (Exception, KeyboardInterrupt) as exc:
            sys.exit(_failed(exc, _debugging()))

    return wrapper


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["debug"] = True


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="On an internal error, print the traceback (also ONNXPRUNE_DEBUG=1).",
)


def check_outputs(
    inputs: dict[Path, str], outputs: list[tuple[str | None, str]], *, force: bool
) -> None:
    """Every file the command will write, checked before any work: none is an input or another
    output of the run, none exists without --force, every folder is there and writable."""
    taken: dict[str | Path, str] = {}
    for path, what in outputs:
        if path is None:
            continue
        writer.check_destination(path, inputs=inputs, others=taken, force=force)
        taken[path] = what
        if what == "the output model":
            taken[Path(path).parent / next(io.data_file_names(Path(path)))] = "its data file"


def run_inputs(
    *models: str, data: str | None = None, calibration: str | None = None
) -> dict[Path, str]:
    """The files a command reads: models (with their data files) and sample files."""
    inputs: dict[Path, str] = {}
    for model in models:
        for path, what in io.input_files(model).items():
            inputs.setdefault(path, what if len(models) == 1 else f"{what} {model}")
    for path, what in ((data, "the --data file"), (calibration, "the --calibration file")):
        if path is not None:
            inputs[Path(path)] = what
    return inputs


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("onnxprune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("onnxprune: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
@debug_option
def main() -> None:
    """Prune ONNX models: global magnitude pruning with a per-layer minimum retention, or from
    calibration samples (SparseGPT, Wanda; whole channels re-solved by least squares).

    \b
      onnxprune model.onnx --sparsity 0.9            writes model.pruned.onnx, prints a table
      onnxprune model.onnx -s 0.9 --calibration c.npz          ranked and repaired from samples
      onnxprune model.onnx --structured -s 0.5 --calibration c.npz --round-to 8   whole channels
      onnxprune inspect model.onnx --sparsity 0.9    what would be pruned; writes nothing
      onnxprune model.onnx -s 0.9 --data val.npz     prune, then compare both in ONNX Runtime
      onnxprune validate a.onnx b.onnx               compare any two models (--data optional)
      onnxprune sweep model.onnx --data val.npz      accuracy of each method at each sparsity
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
        help="Every layer keeps at least this many of its largest weights: a fraction of the "
        "layer when written with a decimal point or % (0.02, 2%; 1.0 = the whole layer), a "
        "count of weights when a whole number (100; 1 = one weight).",
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


run_options = [
    click.option(
        "--data",
        default=None,
        type=click.Path(dir_okay=False, path_type=str),
        help="Validation data: .npz with one array per model input (by input name) and an "
        "optional 'labels' array. Without it, inputs are generated from the model.",
    ),
    click.option(
        "--batch-size",
        type=int,
        default=None,
        help="Samples per run, at least 1 (default 32 with --data, 1 for generated inputs, 16 "
        "for --calibration); more than the samples there are runs them as one batch.",
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cuda", "cpu"]),
        default="auto",
        show_default=True,
        help="ONNX Runtime device: auto uses CUDA when it can run, else the CPU (and says why).",
    ),
    click.option(
        "--input-shape",
        "input_shape",
        multiple=True,
        metavar="NAME=DIMS",
        help="Shape of a generated input, e.g. input=1x3x224x224; several at once as "
        "input_ids=1x128,attention_mask=1x128 or repeated. Needed for symbolic dimensions other "
        "than the batch (a dim named alike in another input takes the same size); MACs are "
        "counted at these shapes.",
    ),
    click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed of the generated inputs.",
    ),
]

gate_options = [
    click.option(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="FRACTION",
        help="Fail (exit 1) if top-1 accuracy drops by more than this (0.01 = one point).",
    ),
    click.option(
        "--min-agreement",
        type=float,
        default=None,
        metavar="FRACTION",
        help="Fail (exit 1) if top-1 agreement with the original is below this.",
    ),
    click.option(
        "--min-cosine",
        type=float,
        default=None,
        metavar="VALUE",
        help="Fail (exit 1) if any output's cosine similarity to the original is below this.",
    ),
]


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


structured_options = [
    click.option(
        "--structured",
        is_flag=True,
        help="Remove whole channels (smaller, faster dense model) instead of zeroing weights.",
    ),
    click.option(
        "--round-to",
        "round_to",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="With --structured: keep channel counts multiples of N where a layer allows.",
    ),
    click.option(
        "--target",
        type=click.Choice(["params", "macs"]),
        default="params",
        show_default=True,
        help="With --structured: --sparsity counts removed parameters or multiply-accumulates.",
    ),
    click.option(
        "--heads",
        is_flag=True,
        help="With --structured: remove whole attention heads (Q, K, V rows and the output "
        "projection's columns of a head; the head count in shapes rewritten) instead of "
        "shrinking head_dim in every head alike.",
    ),
]


calibration_options = [
    click.option(
        "--calibration",
        default=None,
        type=click.Path(dir_okay=False, path_type=str),
        help="Calibration samples: .npz with one array per model input, like --data (labels "
        "ignored). Weights are then ranked by what they do on these samples, and the kept ones "
        "repaired (SparseGPT updates, bias correction). With --structured: channels ranked by "
        "the output error their removal causes, and every layer that read a removed channel "
        "re-solved by least squares.",
    ),
    click.option(
        "--criterion",
        type=click.Choice(["magnitude", "wanda", "sparsegpt"]),
        default=None,
        help="How weights are ranked: magnitude (default without --calibration); with "
        "--calibration: sparsegpt (default; OBS scores and weight updates), wanda "
        "(|w| x input norm, no update) or magnitude. With --structured, how channels are "
        "ranked: sparsegpt (the output error of removing a channel, the layer re-solved), wanda "
        "(its output fluctuation) or magnitude (weight norms); every layer that read a removed "
        "channel is re-solved in each case.",
    ),
    click.option(
        "--calibration-mode",
        "calibration_mode",
        type=click.Choice(["one-pass", "sequential"]),
        default="sequential",
        show_default=True,
        help="sequential: each wave of layers measured on the model pruned so far and "
        "re-solved against the dense model's outputs (more passes, much more accurate); "
        "one-pass: every layer measured once on the dense model (fastest).",
    ),
    click.option(
        "--calibration-rounds",
        "calibration_rounds",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Sequential: measure in at most N rounds, merging consecutive waves (each round "
        "runs the samples through the dense and the pruned model; default: one per wave of "
        "equal depth). Fewer rounds are faster on deep models and less accurate.",
    ),
    click.option(
        "--calibration-samples",
        "calibration_samples",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Use the first N calibration samples (default: all).",
    ),
    click.option(
        "--bias-correction/--no-bias-correction",
        "bias_correction",
        default=True,
        show_default=True,
        help="With --calibration: fold each pruned layer's mean output shift into its bias. "
        "With --structured alone: fold what the removed channels still carried (a BatchNorm "
        "shift, an added constant, f(0) != 0) into the biases of the layers that read them.",
    ),
]


def _calibration(
    path: str | None,
    criterion: str | None,
    mode: str,
    samples: int | None,
    bias_correction: bool,
    batch_size: int | None,
    device: str,
    rounds: int | None = None,
) -> Any:
    """The Calibration settings the options ask for (None without --calibration)."""
    if path is None:
        given = [
            flag
            for flag, used in (
                ("--calibration-mode", mode != "sequential"),
                ("--calibration-samples", samples is not None),
                ("--calibration-rounds", rounds is not None),
                ("--no-bias-correction", not bias_correction),
            )
            if used
        ]
        if given:
            raise InvalidArgumentError(f"{given[0]} needs --calibration FILE.npz")
        return pipeline.calibration_options(None, criterion)
    from onnxprune.calibration import Calibration

    return Calibration(
        data=path,
        criterion=criterion or "sparsegpt",
        mode=mode,
        samples=samples,
        batch_size=batch_size,
        device=device,
        bias_correction=bias_correction,
        rounds=rounds,
    )


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
    calibration_rounds: int | None,
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
    _setup_logging(quiet)
    if sparsity is None and pattern is None:
        raise click.UsageError("give --sparsity (e.g. --sparsity 0.9) or --pattern (e.g. 2:4)")
    if sparsity is not None and pattern is not None:
        raise click.UsageError("--sparsity and --pattern exclude each other")
    from onnxprune.inputs import check_batch_size, parse_input_shapes
    from onnxprune.validate import check_gate_values

    gates = {
        "max_accuracy_drop": max_accuracy_drop,
        "min_agreement": min_agreement,
        "min_cosine": min_cosine,
    }
    # every argument before any file: a bad value is the first complaint
    pipeline.check_arguments(
        sparsity,
        method=method,
        min_keep=min_keep,
        pattern=pattern,
        include=include,
        exclude=exclude,
    )
    check_batch_size(batch_size)
    check_gate_values(**gates)
    channels = pipeline.structured_options(
        structured,
        target=target,
        round_to=round_to,
        heads=heads,
        compensate=bias_correction,
        input_shapes=parse_input_shapes(input_shape),
    )
    options = _calibration(
        calibration,
        criterion,
        calibration_mode,
        calibration_samples,
        bias_correction or (structured and calibration is None),
        batch_size,
        device,
        calibration_rounds,
    )
    io.check_model_path(model)
    output = output or str(pipeline.default_output(model))
    check_outputs(
        run_inputs(model, data=data, calibration=calibration),
        [(output, "the output model"), (report_path, "the report")],
        force=force,
    )
    validating = validate_ or data is not None or any(v is not None for v in gates.values())
    if validating or calibration is not None or batch_size is not None:
        from onnxprune import inputs
        from onnxprune.validate import preflight

        # bad samples, batch size or gate values stop here, before a model is pruned or written
        preflight(
            model,
            data=data,
            calibration=calibration,
            validating=validating,
            batch_size=batch_size,
            input_shapes=inputs.parse_input_shapes(input_shape),
            **gates,
        )
    _, report = pipeline.prune(
        model,
        sparsity or 0.0,
        method=method,
        min_keep=min_keep,
        pattern=pattern,
        include=include,
        exclude=exclude,
        structured=channels or False,
        calibration=options,
        output=output,
        force=force,
        save=io.Save(external_data=external_data, sparse_storage=sparse_storage, check=check),
        commit=False,
    )
    # every output is prepared under a temporary name, then all are put in place together: a
    # run that fails (data that does not fit, a full disk for the report) leaves what was there
    staged = report.staged
    outputs = [staged]
    result = None
    try:
        if validating:
            from onnxprune.errors import DataError

            try:
                result = _run_validation(
                    model,
                    str(staged.path),
                    data=data,
                    batch_size=batch_size,
                    device=device,
                    input_shape=input_shape,
                    seed=seed,
                )
            except DataError as exc:
                # what only running the models tells (an output width the file leaves open, ONNX
                # Runtime refusing a batch): the data does not fit, so no pruned model is kept
                said = str(exc).replace(str(staged.path), str(report.output_path))
                raise DataError(f"{said} (no pruned model was kept)") from None
            # measured on the prepared files: reported under the name and size they take
            result.candidate.path = str(report.output_path)
            if result.candidate.cost is not None:
                result.candidate.cost.file_bytes = report.size_after
            report.extra["validation"] = result.to_dict()
        if report_path:
            report_text = json_text(report.to_dict())
            outputs.insert(0, writer.stage_text(report_path, report_text, force=force))
        writer.commit_all(outputs)
    finally:
        for item in outputs:
            item.discard()
    if not quiet:
        click.echo(format_report(report))
    else:
        for warning in report.warnings:
            click.echo(f"onnxprune: warning: {warning}", err=True)
    if result is not None:
        from onnxprune.validate import check_gates, format_validation

        if not quiet:
            click.echo(format_validation(result))
        check_gates(result, **gates)


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
    _setup_logging(False)
    pipeline.check_arguments(
        sparsity, method=method, min_keep=min_keep, include=include, exclude=exclude
    )
    channels = pipeline.structured_options(
        structured, target=target, round_to=round_to, heads=heads
    )
    check_outputs(run_inputs(model), [(report_path, "the report")], force=force)
    if channels is not None:
        _, report = pipeline.prune(
            model,
            sparsity or 0.0,
            min_keep=min_keep,
            include=include,
            exclude=exclude,
            # what would go, not a model to keep: the constants need not be measured
            structured=pipeline.Structured(target, round_to, heads, compensate=False),
        )
        click.echo(format_report(report))
        if report_path:
            write_json(report.to_dict(), report_path, force=force)
        return
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
    from onnxprune.validate import check_gates, format_validation, preflight

    _setup_logging(quiet)
    preflight(
        reference,
        data=data,
        batch_size=batch_size,
        input_shapes=inputs.parse_input_shapes(input_shape),
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
    )
    check_outputs(
        run_inputs(reference, candidate, data=data), [(report_path, "the report")], force=force
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
    from onnxprune.validate import preflight

    _setup_logging(False)
    pipeline.structured_options(structured, target=target, round_to=round_to, heads=heads)
    points = sweep.parse_sparsities(sparsities)
    pipeline.check_arguments(min_keep=min_keep)
    chosen = [c.strip() for c in criteria.split(",") if c.strip()]
    sweep.methods_for(min_keep, structured, chosen if calibration is not None else None)
    options = _calibration(calibration, None, calibration_mode, None, True, batch_size, device)
    preflight(
        model,
        data=data,
        calibration=calibration,
        batch_size=batch_size,
        input_shapes=inputs.parse_input_shapes(input_shape),
    )
    check_outputs(
        run_inputs(model, data=data, calibration=calibration),
        [(markdown, "the Markdown table"), (plot, "the plot"), (report_path, "the report")],
        force=force,
    )
    if plot:
        sweep.check_plotting()
    result = sweep.sweep(
        model,
        points,
        data=data,
        min_keep=min_keep,
        batch_size=batch_size,
        device=device,
        input_shapes=inputs.parse_input_shapes(input_shape),
        seed=seed,
        structured=structured,
        target=target,
        round_to=round_to,
        heads=heads,
        calibration=options,
        criteria=chosen,
    )
    click.echo(sweep.format_sweep(result))
    outputs: list[writer.StagedFile] = []
    try:  # all of them or none
        if markdown:
            text = sweep.format_markdown(result) + "\n"
            outputs.append(writer.stage_text(markdown, text, force=force))
        if plot:
            outputs.append(writer.stage_file(plot, sweep.drawing(result), force=force))
        if report_path:
            outputs.append(writer.stage_text(report_path, json_text(result.to_dict()), force=force))
        writer.commit_all(outputs)
    finally:
        for item in outputs:
            item.discard()
    if plot:
        click.echo(f"plot written to {plot}")
