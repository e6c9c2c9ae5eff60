"""One writer for every file onnxprune writes: models, data files, reports, tables, plots.

The promises, each kept here and nowhere else:
- an input of the run (the model, its data files, the sample files) is never a destination, compared
  by resolved path and by device/inode, with or without --force;
- an existing file is replaced only with --force, checked again at the final step: the file is put
  in place with a no-clobber link, so one created meanwhile (another run) is never overwritten;
- a file appears whole or not at all: it is written under a temporary name in its folder, flushed
  to disk, then linked or renamed into place;
- temporary names are recognisable (`.onnxprune-<host>-<pid>-<token>.<kind>.tmp`); they are removed
  on any error, on SIGINT, SIGTERM and SIGHUP (the CLI turns them into exceptions), and a later run
  removes the ones a killed run (a pid no longer alive on this host) left in its output folder;
- a later run deletes nothing else: only such names, regular files (never through a symlink),
  the user's own, never an input of the run. What a claim file says never makes it delete a
  file; it only lets the run name the one final file a run killed mid-commit left behind;
- the outputs of one run are prepared as temporaries first and put in place together at the end
  (`stage_file`, `commit_all`): a run that fails leaves what was there before.
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
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from types import FrameType

from onnxprune.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; commits into one folder are not serialised there
    fcntl = None  # type: ignore[assignment]

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
# The inputs of the run (`check_destination` learns them): a sweep never removes one, even one
# named like a temporary file.
_inputs: list[Path] = []
# A claim is a few hundred bytes; a bigger file of that name is not one.
CLAIM_MAX_BYTES = 1 << 16
# How long a commit waits for another run committing into the same folder (they take ms).
LOCK_WAIT_S = 60.0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def written() -> list[Path]:
    """The files put in place since the last `forget_written` (for the CLI's interrupt line)."""
    return list(_written)


def forget_written() -> None:
    """A new command begins (the CLI, also run in-process by tests): nothing written, no inputs."""
    _written.clear()
    _inputs.clear()


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
    _inputs.extend(Path(p) for p in (inputs or {}) if Path(p) not in _inputs)
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


def remove_stale(folder: Path, leftover: Callable[[Path, Path], bool] | None = None) -> list[Path]:
    """Remove from `folder` the temporary files killed runs left (this host, pid gone); say so.

    Only what is provably onnxprune's temporary: a name of its pattern, a regular file (looked
    at with lstat: a symlink is never followed nor removed), owned by this user, not an input of
    this run. A claim (see `claim`) is such a temporary and goes too; what it names is never
    removed. With `leftover(model, file)` (could a commit of that model have left that file:
    named like its data files, and not read by it?) the run names the final file a killed
    commit left, if it is still there as the claim recorded it (device, inode, size). Without
    `leftover`, claims are left for a save to read.
    """
    removed, leftovers = [], []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not _own_file(st) or _is_input(st):
            continue
        if entry.name.endswith(f".claim{TEMP_SUFFIX}"):
            if leftover is None or st.st_nlink != 1:
                continue
            leftovers.extend(_claim_leftovers(path, leftover))
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    where = folder if str(folder) else "."
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        log.warning(
            f"removed {len(removed)} temporary file(s) an interrupted run left in {where}: {names}"
        )
    for path, model in leftovers:
        log.warning(
            f"{path} was left by a run killed while it put {model} in place; no model there "
            "reads it, and onnxprune removes only its temporary files: delete it if it is not "
            "yours"
        )
    return removed


def _is_input(st: os.stat_result) -> bool:
    """The file is one of the run's inputs (by device and inode: under any name)."""
    return any(_identity(p) == (st.st_dev, st.st_ino) for p in _inputs)


def _own_file(st: os.stat_result) -> bool:
    """A regular file (not a symlink, not a folder) of the user running this process."""
    owner = getattr(os, "geteuid", None)
    return stat.S_ISREG(st.st_mode) and (owner is None or st.st_uid == owner())


def _temp_name(folder: Path, kind: str) -> Path:
    """A fresh recognisable temporary name in `folder` (the caller creates it, exclusively)."""
    name = f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}{TEMP_SUFFIX}"
    return folder / name


def temp_file(folder: Path, kind: str) -> Path:
    """Create an empty, recognisable temporary file in `folder` (the destination's folder, so
    that the final rename stays on one filesystem)."""
    for _ in range(100):
        path = _temp_name(folder, kind)
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
    the run dies half-way, the next run in this folder can name what it left."""
    path = temp_file(folder, "claim")
    write_claim(path, record)
    return path


def write_claim(path: Path, record: dict) -> None:
    """`record`: `model`, the output's name, and `model_id`, the (device, inode) of its
    temporary file (the model is in place once the output has it); `data`, the final name its
    data file gets, and `data_id`, that file's (device, inode, size); `replaced`, the
    [name, device, inode, size] of each data file the model in place had, to go once it is
    replaced. Read only to tell the user what a killed commit left (`_claim_leftovers`)."""
    path.write_text(json.dumps(record))


def _claim_leftovers(path: Path, leftover: Callable[[Path, Path], bool]) -> list[tuple[Path, Path]]:
    """(file, model) for each final file a killed commit left behind: before the model was in
    place, its new data file; after, the data files it replaced. Each only if it is still the
    very file recorded (lstat: a regular file of that device, inode and size), no input, and
    `leftover(model, file)`. A claim that cannot be read or names anything but a plain file of
    its own folder tells nothing."""
    folder = path.parent
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read(CLAIM_MAX_BYTES + 1)[:CLAIM_MAX_BYTES])
        model = folder / _plain(record["model"])
        committed = _lidentity(model) == tuple(record["model_id"])
        if committed:
            recorded = [
                (_plain(name), (dev, ino, size)) for name, dev, ino, size in record["replaced"]
            ]
        elif record["data"]:
            recorded = [(_plain(record["data"]), tuple(record["data_id"]))]
        else:
            recorded = []
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # forged, truncated
        return []
    left = []
    for name, identity in recorded:
        file = folder / name
        try:
            st = os.lstat(file)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_size) != identity:
            continue
        if _is_input(st) or not leftover(model, file):
            continue
        left.append((file, model))
    return left


def _lidentity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the name itself (a symlink is not followed)."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _link_temp(source: Path, folder: Path, kind: str, *, follow: bool = True) -> Path | None:
    """A temporary name in `folder` for the file `source` (a hard link; `follow=False` links a
    symlink itself); None where the filesystem has no hard links."""
    for _ in range(100):
        name = _temp_name(folder, kind)
        try:
            os.link(source, name, follow_symlinks=follow)
            return name
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


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
    alias = _link_temp(path, path.parent, "view")
    if alias is None:
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


def commit(tmp: Path, dest: Path, *, force: bool, sync: bool = True) -> None:
    """Put a finished temporary file in place: replacing only with `force`, never clobbering
    a file that appeared since the start without it. `sync=False`: the caller syncs the folder
    (after a step that must follow the rename at once)."""
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
    if sync:
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


class StagedFile:
    """A finished file under a temporary name beside its destination, not yet in place.

    Part of a run's outputs (`commit_all`): `commit` puts it in place, keeping what it replaces
    (a hard link under a temporary name) while the run's later outputs are still to come, so
    that `undo` can put that back if one of them fails; `discard` removes what is left.
    """

    def __init__(self, tmp: Path, dest: Path, force: bool) -> None:
        self.tmp, self.dest, self.force = tmp, dest, force
        self.kept: Path | None = None  # the file it replaced, until the run's end
        self.placed: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self.tmp

    def lock(self) -> nullcontext[None]:
        return nullcontext()

    def commit(self, keep: bool = False) -> Path:
        if keep and self.force and _lidentity(self.dest) is not None:
            self.kept = _link_temp(self.dest, self.dest.parent, "kept", follow=False)
        commit(self.tmp, self.dest, force=self.force)
        self.placed = _lidentity(self.dest)
        return self.dest

    def undo(self) -> None:
        """Take the file back out (a later output of the run failed): what it replaced goes
        back, or the name is free again as before. Not if the name no longer holds it."""
        if self.placed is None or _lidentity(self.dest) != self.placed:
            return
        try:
            if self.kept is not None:
                os.replace(self.kept, self.dest)
                self.kept = None
            else:
                os.unlink(self.dest)
        except OSError as exc:
            log.warning(f"could not take back {self.dest}: {exc.strerror}")
            return
        self.placed = None
        if self.dest in _written:
            _written.remove(self.dest)

    def discard(self) -> None:
        discard(p for p in (self.tmp, self.kept) if p is not None and p.exists())


def stage_file(
    dest: str | os.PathLike, produce: Callable[[Path], None], *, force: bool = False
) -> StagedFile:
    """Write a file through `produce(temporary_path)` beside `dest`, flushed, not yet in place
    (a failure here, a full disk, leaves nothing)."""
    dest = Path(dest)
    folder = dest.parent
    remove_stale(folder)
    tmp = temp_file(folder, "part")
    try:
        produce(tmp)
        sync(tmp)
    except OSError as exc:
        discard([tmp])
        raise OutputError(f"{dest}: write failed ({exc.strerror or exc})") from None
    except BaseException:
        discard([tmp])
        raise
    return StagedFile(tmp, dest, force)


def stage_text(dest: str | os.PathLike, text: str, *, force: bool = False) -> StagedFile:
    return stage_file(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


def commit_all(staged: Sequence[StagedFile]) -> None:
    """Put every output of a run in place, or none of them.

    In the order given (a model last: its commit is the one most likely to be refused, by a
    file that appeared meanwhile), with signals held; if one fails, those placed before it are
    taken back, each restoring what it replaced. Locks (`lock()`) are taken first, outside the
    held signals, so that a Ctrl-C while waiting for one still stops the run at once.
    """
    with ExitStack() as locks:
        for item in staged:
            locks.enter_context(item.lock())
        with signals_deferred():
            done: list[StagedFile] = []
            try:
                for i, item in enumerate(staged):
                    item.commit(keep=i < len(staged) - 1)
                    done.append(item)
            except BaseException:
                for item in reversed(done):
                    item.undo()
                raise


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on `folder` itself (no lock file to leave behind) while a model
    is put in place there: two runs replacing one output take turns, so the later one sees the
    model the earlier one put there and removes that model's data file with it (at once, both
    read the output before either replaced it, and the earlier run's data file stayed behind).

    Best effort: where the folder cannot be locked (no flock, some network filesystems), or
    another process holds it longer than LOCK_WAIT_S, the commit goes on without it.
    """
    try:
        fd = os.open(
            folder if str(folder) else ".",
            os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0),
        )
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning(f"{folder}: another process holds its lock; committing anyway")
                    break
                time.sleep(0.01)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def write_file(
    dest: str | os.PathLike, produce: Callable[[Path], None], *, force: bool = False
) -> Path:
    """Write a file through `produce(temporary_path)`, then put it in place whole."""
    staged = stage_file(dest, produce, force=force)
    try:
        commit_all([staged])
    finally:
        staged.discard()
    return staged.dest


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
