"""The `onnxprune` command's first moments: signals handled before anything heavy is imported.

Importing ONNX, ONNX Runtime and numpy takes about half a second; a Ctrl-C or SIGTERM then must
give the same one line and exit code as during the work, never a traceback. (A signal that lands
inside CPython's own start-up, before this module runs, ends the process as it ends any Python
program: nothing has been read or written then.)

ONNXPRUNE_READY_FD=N (an inherited file descriptor above 2): once the handlers are in place the
launcher writes `ready` and a newline to it and closes it, so that a test or a supervisor sends
its signal only once onnxprune can answer it, instead of guessing how long start-up takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def main() -> None:
    """Entry point of the `onnxprune` console script and of `python -m onnxprune`."""
    try:
        from onnxprune.storage import writer

        writer.install_signal_handlers()
        _say_ready()
        from onnxprune.cli import main as cli
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)
        what = f"terminated ({exc})" if signum else "interrupted"
        sys.stderr.write(f"onnxprune: {what} while starting; nothing was written\n")
        _exit(128 + signum if signum else 130)
    code: object = 0
    try:
        cli()
    except SystemExit as exc:
        code = exc.code
    _exit(code)


READY_ENV = "ONNXPRUNE_READY_FD"


def _say_ready() -> None:
    """Tell whoever set ONNXPRUNE_READY_FD that signals are handled from now on."""
    fd = os.environ.pop(READY_ENV, "")
    if fd.isdigit() and int(fd) > 2:  # never the standard streams
        with contextlib.suppress(OSError):
            os.write(int(fd), b"ready\n")
            os.close(int(fd))


def _exit(code: object) -> None:
    """Leave with exactly `code`. The outcome is decided and said: a signal from here on is
    ignored, and the interpreter's teardown is skipped (CPython turns an interrupt it saw
    anywhere during the run into death by SIGINT at exit, whatever code was asked for)."""
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            signal.signal(s, signal.SIG_IGN)
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(code or 0)
