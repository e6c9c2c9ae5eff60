"""One writer for every file onnxprune writes: models, data files, reports, tables, plots.

The promises, each kept here and nowhere else:
- an input of the run (the model, its data files, the sample files) is never a destination, compared
  by resolved path and by device/inode, with or without --force;
- an existing file is replaced only with --force, checked again at the final step: the file is put
  in place with a no-clobber link, so one created meanwhile (another run) is never overwritten;
- a file appears whole or not at all: it is written under a temporary name in its folder, flushed
  to disk, then linked or renamed into place;
- temporary names are recognisable (`.onnxprune-<host>-<pid>-<token>.<kind>.tmp`); they are removed
  on any error, on SIGINT and SIGTERM (the CLI turns both into exceptions), and a later run removes
  the ones a killed run (a pid no longer alive on this host) left in its output folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from onnxprune.errors import OutputError

log = logging.getLogger("onnxprune")

TEMP_PREFIX = ".onnxprune-"
TEMP_SUFFIX = ".tmp"
_HOST = hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:8]
_TEMP_NAME = re.compile(
    re.escape(TEMP_PREFIX) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+\.[a-z]+" + TEMP_SUFFIX
)
# errno of a filesystem that cannot hard-link (FAT, some network and FUSE filesystems)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV}
# Files this process has put in place, for the CLI to say what an interrupted run left behind.
_written: list[Path] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def written() -> list[Path]:
    """The files put in place since the last `forget_written` (for the CLI's interrupt line)."""
    return list(_written)


def forget_written() -> None:
    _written.clear()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """The same file: one resolved path, or one device and inode (hard links, bind mounts)."""
    a, b = Path(a), Path(b)
    if _resolved(a) == _resolved(b):
        return True
    ia = _identity(a)
    return ia is not None and ia == _identity(b)


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_destination(
    path: str | os.PathLike,
    *,
    inputs: Mapping[str | os.PathLike, str] | None = None,
    others: Mapping[str | os.PathLike, str] | None = None,
    force: bool = False,
) -> Path:
    """Refuse, before any work, a destination that cannot or must not be written.

    `inputs` maps each input file of the run to what it is ("the input model"); `others` the
    run's other destinations (two outputs of one run must differ).
    """
    text = os.fspath(path)
    if not text or text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise OutputError(f"{text!r}: not a file name")
    out = Path(text)
    folder = out.parent
    for other, what in (inputs or {}).items():
        if same_file(out, other):
            raise OutputError(f"{out}: is {what}; onnxprune never overwrites its inputs")
    for other, what in (others or {}).items():
        if same_file(out, other):
            raise OutputError(f"{out}: is also {what}; give each output its own name")
    if len(os.fsencode(out.name)) > name_max(folder if folder.is_dir() else Path(".")):
        raise OutputError(f"{out}: file name too long ({len(os.fsencode(out.name))} bytes)")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{out}: already exists; pass --force to overwrite it")
        if out.exists() and not out.is_file():
            raise OutputError(f"{out}: exists and is not a regular file")
    if not folder.is_dir():
        raise OutputError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {folder} is not writable")
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, somebody else's; no pid at all: not ours
        return True
    return True


def remove_stale(folder: Path, in_use: Callable[[Path, Path], bool] | None = None) -> list[Path]:
    """Remove the temporary files of killed runs (this host, pid gone) from `folder`; say so.

    A claim (see `claim`) left by a run killed between placing a data file and committing its
    model names that data file; it is removed too unless `in_use(model, data)` says the model
    now in place reads it. Without `in_use`, claims are left for a caller that can tell.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        if entry.name.endswith(f".claim{TEMP_SUFFIX}"):
            if in_use is None:
                continue
            removed.extend(_release_claim(path, in_use))
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        log.warning(
            f"removed {len(removed)} temporary file(s) an interrupted run left in "
            f"{folder if str(folder) else '.'}: {names}"
        )
    return removed


def temp_file(folder: Path, kind: str) -> Path:
    """Create an empty, recognisable temporary file in `folder` (the destination's folder, so
    that the final rename stays on one filesystem)."""
    for _ in range(100):
        name = f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}{TEMP_SUFFIX}"
        path = folder / name
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {folder or '.'} ({exc.strerror})") from None
        os.close(fd)
        return path
    raise OutputError(f"cannot create a temporary file in {folder}")


def claim(folder: Path, record: dict) -> Path:
    """Record, before the first step of a commit, what it is about to do (see `write_claim`): if
    the run dies half-way, the next run in this folder finishes or undoes it."""
    path = temp_file(folder, "claim")
    write_claim(path, record)
    return path


def write_claim(path: Path, record: dict) -> None:
    """`record`: the model's name, the (device, inode) of its temporary file (the model is in
    place once the destination has it), the data file it is given, the files it replaces."""
    path.write_text(json.dumps(record))


def _release_claim(path: Path, in_use: Callable[[Path, Path], bool]) -> list[Path]:
    """A killed commit: before the model was in place, its new data file is an orphan; after,
    the files it replaced are. Either way they go, unless the model in place reads them."""
    try:
        record = json.loads(path.read_text())
        model = path.parent / _plain(record["model"])
        committed = _identity(model) == tuple(record["inode"])
        names = record["replaced"] if committed else [record["data"]]
        orphans = [path.parent / _plain(name) for name in names if name]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    removed = []
    for orphan in orphans:
        if orphan.parent == model.parent and orphan.is_file() and not in_use(model, orphan):
            try:
                orphan.unlink()
                removed.append(orphan)
            except OSError:
                continue
    return removed


@contextmanager
def utf8_alias(path: str | os.PathLike) -> Iterator[Path]:
    """ONNX Runtime takes UTF-8 paths only: a file whose name is not gets a temporary hard link
    beside it (the same folder, so its data files still resolve) for as long as it is read."""
    path = Path(path)
    try:
        os.fsencode(path.name).decode("utf-8")
        yield path
        return
    except UnicodeDecodeError:
        pass
    for _ in range(100):
        alias = (
            path.parent
            / f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.view{TEMP_SUFFIX}"
        )
        try:
            os.link(path, alias)
            break
        except FileExistsError:
            continue
        except OSError:
            yield path  # no hard links here: the reader gives its own error
            return
    try:
        yield alias
    finally:
        discard([alias])


def _plain(name: object) -> str:
    """A file name of the claim's own folder, nothing else (a claim is a file anyone there
    could have written: it never names a path elsewhere)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def sync(path: Path) -> None:
    """Flush a written file to the device, so that a crash after the rename never shows a hole."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def link_new(source: Path, dest: Path) -> bool:
    """Give `source` the name `dest` only if nothing has it: False if `dest` exists.

    A hard link is atomic and never replaces; where the filesystem has no hard links, the check
    and the rename are two steps (a file created between them would be replaced).
    """
    try:
        os.link(source, dest)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if dest.exists() or dest.is_symlink():
            return False
        os.rename(source, dest)
        return True
    os.unlink(source)
    return True


def commit(tmp: Path, dest: Path, *, force: bool) -> None:
    """Put a finished temporary file in place: replacing only with `force`, never clobbering
    a file that appeared since the start without it."""
    try:
        if force:
            os.replace(tmp, dest)
        elif not link_new(tmp, dest):
            raise OutputError(
                f"{dest}: already exists (created while this run worked); pass --force to "
                "overwrite it"
            )
    except OSError as exc:
        raise OutputError(f"{dest}: cannot be written ({exc.strerror or exc})") from None
    sync_folder(dest.parent)
    _written.append(dest)


def discard(paths: Iterable[Path | None]) -> None:
    for path in paths:
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(f"could not remove the temporary file {path}: {exc.strerror}")


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while a commit's steps run, then raise what came.

    The steps are renames and unlinks (milliseconds); finishing them keeps a model and its data
    file one unit whatever the user presses.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    # a signal the process ignores (nohup's SIGHUP, SIGINT of a background job) stays ignored
    kinds = [s for s in _handled() if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, hold) for s in kinds}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(received[0])


def write_file(
    dest: str | os.PathLike, produce: Callable[[Path], None], *, force: bool = False
) -> Path:
    """Write a file through `produce(temporary_path)`, then put it in place whole."""
    dest = Path(dest)
    folder = dest.parent
    remove_stale(folder)
    tmp = temp_file(folder, "part")
    try:
        try:
            produce(tmp)
            sync(tmp)
        except OSError as exc:
            raise OutputError(f"{dest}: write failed ({exc.strerror or exc})") from None
        with signals_deferred():
            commit(tmp, dest, force=force)
    finally:
        discard([tmp] if tmp.exists() else [])
    return dest


def write_text(dest: str | os.PathLike, text: str, *, force: bool = False) -> Path:
    return write_file(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


def _handled() -> list[int]:
    """The signals onnxprune turns into exceptions (SIGHUP where the platform has it)."""
    return [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s]


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise `Terminated` (SIGINT already raises KeyboardInterrupt), so that
    `finally` blocks remove temporary files instead of the process vanishing mid-write.

    One ignored when the process started stays ignored: `nohup onnxprune ...` must outlive the
    hang-up it was started to outlive (and CPython leaves an inherited ignored SIGINT alone too).
    """

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    for s in _handled():
        if s != signal.SIGINT and signal.getsignal(s) != signal.SIG_IGN:
            signal.signal(s, terminate)
