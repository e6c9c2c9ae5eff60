"""The command group and how every command ends: one line on stderr and a documented exit code
for every way out (0 done, 1 a gate failed, 2 a user error, 3 a bug, 130 Ctrl-C, 143 SIGTERM)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError
from onnxprune.storage import writer

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


def setup_logging(quiet: bool) -> None:
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
