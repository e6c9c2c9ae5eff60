"""Progress on stderr: a slow step says what it is doing and how long it took."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("onnxprune")

# A step is announced on stderr only once it has taken this long, so fast runs stay quiet.
PROGRESS_AFTER_S = 1.0


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a slow step on the log (stderr in the CLI) and how long it took."""
    start = time.perf_counter()
    timer = threading.Timer(PROGRESS_AFTER_S, lambda: log.info("%s ...", message))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    # "done" only when it is: an error or an interrupt says its own line instead
    elapsed = time.perf_counter() - start
    if elapsed >= PROGRESS_AFTER_S:
        log.info("%s: done in %.1f s", message, elapsed)
