"""Reading .npz sample files safely: no pickles, headers checked against the bytes stored, members
whose sizes a damaged or forged archive misstates refused before anything is allocated."""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
# Deflate expands data by at most about 1032:1; a zip member claiming more is damaged or forged.
MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class ArrayHeader:
    """One array of an .npz file as its header describes it (checked against the bytes stored)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _npz_example(option: str) -> str:
    if option == "--calibration":
        return "np.savez('calib.npz', input=x)"
    return "np.savez('val.npz', input=x, labels=y)"


@contextlib.contextmanager
def _open_npz(path: Path, option: str) -> Iterator[zipfile.ZipFile]:
    """The .npz as a zip archive; a .npy, a missing file or anything not a zip is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic == NPY_MAGIC:
        raise DataError(
            f"{path} is a .npy array; {option} needs an .npz with one array per model input, "
            f"e.g. {_npz_example(option)}"
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npz file ({exc}); {option} needs one array per model input, "
            f"e.g. {_npz_example(option)}"
        ) from None
    with archive:
        try:
            yield archive
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            # a damaged member (CRC, truncated data, bad deflate stream) found while reading it
            raise DataError(f"{path}: damaged .npz file ({exc})") from None


def _members(archive: zipfile.ZipFile, path: Path) -> list[tuple[str, zipfile.ZipInfo]]:
    members = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
        members.append((key, info))
    if not members:
        raise DataError(f"{path}: the .npz file holds no arrays")
    return members


def _read_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path
) -> ArrayHeader:
    """An array's header, refused unless the bytes the archive holds can be that array.

    A header is a claim: before anything is allocated, the size it claims must fit the size of
    the member, and that size must fit what the archive can hold (stored bytes, or at most
    deflate's largest expansion of the compressed bytes, within the file's length).
    """
    where = f"{path}: array {key!r}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(
            f"{where} is compressed with zip method {info.compress_type}; save the file with "
            "np.savez or np.savez_compressed"
        )
    if info.compress_size > path.stat().st_size or info.file_size > (
        info.compress_size
        if info.compress_type == zipfile.ZIP_STORED
        else info.compress_size * MAX_DEFLATE_RATIO + 1024
    ):
        raise DataError(f"{where}: the zip directory gives impossible sizes (a damaged file)")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        except ValueError as exc:
            raise DataError(f"{where} is not a .npy array ({exc})") from None
        start = member.tell()
    header = ArrayHeader(key, tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran))
    if header.dtype.hasobject:
        raise DataError(
            f"{where} holds Python objects (dtype {header.dtype}); onnxprune loads no pickles: "
            "save numeric arrays"
        )
    if header.nbytes > info.file_size - start:
        raise DataError(
            f"{where}: its header claims shape {list(header.shape)} of {header.dtype} "
            f"({header.nbytes:,} bytes) but the file holds {max(0, info.file_size - start):,} "
            "bytes of data (a damaged or forged file)"
        )
    return header


def read_npz_headers(path: str | os.PathLike, option: str = "--data") -> dict[str, ArrayHeader]:
    """The arrays of an .npz file as their headers describe them, checked, no data read."""
    path = Path(path)
    with _open_npz(path, option) as archive:
        return {
            key: _read_header(archive, info, key, path) for key, info in _members(archive, path)
        }


def scalar_arrays(data: object, option: str = "--data") -> dict[str, np.ndarray]:
    """The 0-d arrays (inputs fed one value for every sample: a sample rate) of an .npz path, a
    folder of .npz shards (its first) or a mapping of arrays; nothing for any other kind of
    data. Only those arrays are read."""
    if isinstance(data, Mapping):
        return {k: np.asarray(v) for k, v in data.items() if np.ndim(v) == 0}
    if not isinstance(data, str | os.PathLike):
        return {}
    if Path(data).is_dir():  # shards: one value for every sample is in each of them
        data = next((p for p in sorted(Path(data).iterdir()) if p.suffix == ".npz"), None)
        if data is None:
            return {}
    keys = [k for k, header in read_npz_headers(data, option).items() if not header.shape]
    return load_npz(data, option, keys=keys) if keys else {}


def load_npz(
    path: str | os.PathLike, option: str = "--data", keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (or those of `keys` it has), each checked before it is read.

    No pickles (a data file must not run code), no header that claims more than the file holds.
    """
    path = Path(path)
    arrays = {}
    with _open_npz(path, option) as archive:
        for key, info in _members(archive, path):
            if keys is not None and key not in keys:
                continue
            _read_header(archive, info, key, path)
            with archive.open(info) as member:
                arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                member.read()  # to the end: the CRC is checked there
    return arrays
