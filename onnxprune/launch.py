"""The `onnxprune` command's first moments: signals handled before anything heavy is imported.

Importing ONNX, ONNX Runtime and numpy takes about half a second; a Ctrl-C or SIGTERM then must
give the same one line and exit code as during the work, never a traceback.
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
