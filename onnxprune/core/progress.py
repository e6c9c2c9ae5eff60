"""Progress on stderr: a slow step says what it is doing and how long it took; a step that knows
how much work it has draws a bar (percentage, ETA) where stderr is a terminal, and writes a plain
line every PLAIN_EVERY_S elsewhere (CI logs); nothing with -q.

Progress follows the "onnxprune" logger: the CLI sets it to INFO (WARNING with -q); a library
caller sees progress once it turns that logger to INFO. A sweep labels its steps (`labelled`),
so each line says which row it belongs to.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("onnxprune")

# A step is announced on stderr only once it has taken this long, so fast runs stay quiet.
PROGRESS_AFTER_S = 1.0
# Without a terminal, a step with known work writes a line at most this often.
PLAIN_EVERY_S = 10.0

Advance = Callable[[int], None]  # how loops that take a meter's advance call it

_label: contextvars.ContextVar[str] = contextvars.ContextVar("onnxprune_step_label", default="")
_said: set[str] = set()


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Prefix every step inside with `label` ("sparsegpt+calibration at 0.8: ...")."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


def titled(message: str) -> str:
    label = _label.get()
    return f"{label}: {message}" if label else message


def notice_once(message: str) -> None:
    """Log a notice once per run, however many stages meet it (the reason CUDA cannot run)."""
    if message not in _said:
        _said.add(message)
        log.info("%s", message)


def forget_notices() -> None:
    """A new run (the CLI's entry, a test) says its notices again."""
    _said.clear()


def stderr_is_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


class _Plain:
    """Periodic lines for logs that are not a terminal: 'message: 40% (2/5), ETA 12 s'."""

    def __init__(self, title: str, total: int) -> None:
        self.title, self.total, self.done = title, total, 0
        self.start = time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        self.report()

    def report(self) -> None:
        now = time.perf_counter()
        if now - self.last < PLAIN_EVERY_S or self.done >= self.total:
            return
        self.last = now
        share = self.done / self.total if self.total else 1.0
        eta = (now - self.start) * (1 - share) / share if share > 0 else 0.0
        log.info(
            "%s: %d%% (%d/%d), ETA %.0f s", self.title, 100 * share, self.done, self.total, eta
        )

    def close(self) -> None:
        pass


def _bar(title: str, total: int) -> Any:
    """A tqdm bar redrawn in place on stderr, shown once the step takes PROGRESS_AFTER_S."""
    from tqdm import tqdm

    try:  # a terminal that reports no size (some ptys) gets 80x24, not an empty or hidden bar
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except (OSError, ValueError, AttributeError):
        sized = False
    return tqdm(
        total=total,
        desc=f"onnxprune: {title}",
        file=sys.stderr,
        leave=False,
        delay=PROGRESS_AFTER_S,
        dynamic_ncols=sized,
        ncols=None if sized else 80,
        nrows=None if sized else 24,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
    )


class Meter:
    """What a step with known work hands its loop: `advance(n)` as units finish, `grow(n)` when
    more work turns up (another pass over the samples). Does nothing where progress is off."""

    def __init__(self, shown: Any = None) -> None:
        self.shown = shown  # a tqdm bar, a _Plain, or None

    def advance(self, n: int = 1) -> None:
        if self.shown is not None:
            self.shown.update(n)

    def grow(self, n: int) -> None:
        if self.shown is not None and n > 0:
            self.shown.total += n
            if hasattr(self.shown, "refresh"):
                self.shown.refresh()


@contextlib.contextmanager
def step(message: str, total: int | None = None) -> Iterator[Meter]:
    """Announce a slow step on the log (stderr in the CLI) and how long it took. With `total`
    (units of work), the `Meter` it yields draws a bar or writes periodic lines."""
    title = titled(message)
    shown: Any = None
    if total and log.isEnabledFor(logging.INFO):
        shown = _bar(title, total) if stderr_is_terminal() else _Plain(title, total)
    start = time.perf_counter()
    timer = None
    if shown is None or isinstance(shown, _Plain):
        timer = threading.Timer(PROGRESS_AFTER_S, lambda: log.info("%s ...", title))
        timer.daemon = True
        timer.start()
    try:
        yield Meter(shown)
    finally:
        if timer is not None:
            timer.cancel()
        if shown is not None:
            shown.close()
    # "done" only when it is: an error or an interrupt says its own line instead
    elapsed = time.perf_counter() - start
    if elapsed >= PROGRESS_AFTER_S:
        log.info("%s: done in %.1f s", title, elapsed)
