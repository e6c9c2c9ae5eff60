"""The `onnxprune` command's first moments: signals handled before anything heavy is imported.

Importing ONNX, ONNX Runtime and numpy takes about half a second; a Ctrl-C or SIGTERM then must
give the same one line and exit code as during the work, never a traceback.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Entry point of the `onnxprune` console script and of `python -m onnxprune`."""
    try:
        from onnxprune import writer

        writer.install_signal_handlers()
        from onnxprune.cli import main as cli
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)
        what = f"terminated ({exc})" if signum else "interrupted"
        sys.stderr.write(f"onnxprune: {what} while starting; nothing was written\n")
        sys.exit(128 + signum if signum else 130)
    try:
        cli()
    finally:
        # the outcome is decided and said: a signal now would only turn it into a silent death
        for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if s is not None:
                signal.signal(s, signal.SIG_IGN)
