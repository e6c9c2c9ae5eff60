"""Where samples come from, in front of the matching: one .npz file, a folder of .npz shards, a
mapping of arrays, or any iterable of input dicts (an onnxruntime.quantization
`CalibrationDataReader` too, through its `get_next()`), so that readers written for quantization
serve calibration and validation as they are.

A folder of shards is read one shard at a time, every time the batches are walked (calibration
walks them once per pass), so memory holds one shard and one batch, never the whole data; the
shards' headers are checked against the model first, and their samples count together. An
iterable is read once, into memory, since a reader can seldom be rewound.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.errors import DataError
from onnxprune.inputs.match import (
    Matched,
    Signature,
    check_data_file,
    check_labels,
    from_arrays,
    match,
)
from onnxprune.inputs.npz import ArrayHeader, load_npz, read_npz_headers
from onnxprune.inputs.sequence import decoder_inputs, fill_missing
from onnxprune.inputs.spec import LABELS, Inputs, InputSpec, check_batch_size, take_rows

Samples = str | os.PathLike | Mapping[str, Any] | Iterable[Any]


def shards(folder: str | os.PathLike, option: str = "--data") -> list[Path]:
    """The .npz files of a folder, in name order (shard-000.npz, shard-001.npz, ...)."""
    found = sorted(p for p in Path(folder).iterdir() if p.suffix == ".npz" and p.is_file())
    if not found:
        raise DataError(f"{option} {folder}: the folder holds no .npz files (one per shard)")
    return found


def sample_files(data: object, option: str = "--data") -> list[Path]:
    """The files a path of samples stands for: itself, or a folder's shards (none otherwise)."""
    if not isinstance(data, str | os.PathLike):
        return []
    path = Path(data)
    return shards(path, option) if path.is_dir() else [path]


def _is_reader(data: object) -> bool:
    return callable(getattr(data, "get_next", None))


def _items(data: Any) -> Iterator[Mapping[str, Any]]:
    """The input dicts of an iterable or of a reader's get_next() (None ends it)."""
    if _is_reader(data):
        while (item := data.get_next()) is not None:
            yield item
        return
    yield from data


def collect_items(data: Iterable[Any] | Any, source: str) -> dict[str, np.ndarray]:
    """An iterable of input dicts as one array per input, the dicts joined along the sample axis
    (each dict one batch, often of one sample); a 0-d input (a scalar) is the same throughout."""
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    for count, item in enumerate(_items(data), start=1):
        if not isinstance(item, Mapping):
            raise DataError(
                f"{source}: item {count} is a {type(item).__name__}, not a dict of input name -> "
                "array (what a CalibrationDataReader's get_next() returns)"
            )
        if parts and set(item) != set(parts):
            raise DataError(
                f"{source}: item {count} has inputs {sorted(item)}, the first had {sorted(parts)}"
            )
        for key, value in item.items():
            parts.setdefault(key, []).append(np.asarray(value))
    if not count:
        raise DataError(f"{source}: the reader gave no samples")
    arrays = {}
    for key, values in parts.items():
        if values[0].ndim == 0:
            arrays[key] = values[0]
            continue
        try:
            arrays[key] = np.concatenate(values, axis=0)
        except ValueError as exc:
            raise DataError(
                f"{source}: input {key!r} cannot be joined across items ({exc})"
            ) from None
    return arrays


class ShardedBatches(Sequence[dict[str, np.ndarray]]):
    """Batches over a folder of .npz shards, read one shard at a time on each walk; a batch may
    span two shards. Its length and sample count are known from the headers alone."""

    def __init__(self, files: Sequence[Path], matched: Matched, option: str, limit: int) -> None:
        self.files, self.matched, self.option = list(files), matched, option
        self.rows = min(matched.usable, limit)  # samples walked
        self.size = matched.size
        self._first: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return math.ceil(self.rows / self.size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if index == 0 and self._first is not None:
            return self._first
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        for i, batch in enumerate(self):
            if i == index:
                return batch
        raise IndexError(index)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        keys = {name: key for name, (key, _) in self.matched.by_input.items()}
        scalars: dict[str, np.ndarray] = {}
        pending: dict[str, list[np.ndarray]] = {name: [] for name in keys}
        held, left, first = 0, self.rows, True
        for path in self.files:
            if left <= 0:
                break
            arrays = load_npz(path, self.option, keys=list(keys.values()))
            for name, key in keys.items():
                array = arrays[key]
                if array.ndim == 0:
                    scalars[name] = array
            rows = next((int(arrays[k].shape[0]) for k in keys.values() if arrays[k].ndim), 0)
            start = 0
            while start < rows and left > 0:
                take = min(self.size - held, rows - start, left)
                for name, key in keys.items():
                    if arrays[key].ndim:
                        pending[name].append(arrays[key][start : start + take])
                held, start, left = held + take, start + take, left - take
                if held == self.size or left == 0:
                    batch = {
                        name: scalars[name] if name in scalars else np.concatenate(parts, axis=0)
                        for name, parts in pending.items()
                    }
                    if first:
                        self._first, first = batch, False
                    yield batch
                    pending = {name: [] for name in keys}
                    held = 0
            del arrays


def _shard_headers(
    files: Sequence[Path], option: str, labels: bool
) -> tuple[dict[str, ArrayHeader], int]:
    """The shards' arrays as one file's headers would describe them (sample counts summed), and
    the total; shards that disagree on keys, dtypes or per-sample shapes are refused."""
    merged: dict[str, ArrayHeader] = {}
    total = 0
    for path in files:
        headers = read_npz_headers(path, option)
        if not labels:
            headers.pop(LABELS, None)
        if merged and set(headers) != set(merged):
            raise DataError(
                f"{option} {path}: arrays {sorted(headers)}, the first shard has {sorted(merged)}"
            )
        counts = {h.shape[0] for h in headers.values() if h.ndim}
        if len(counts) > 1:
            raise DataError(f"{option} {path}: its arrays have different numbers of samples")
        rows = counts.pop() if counts else 0
        for key, header in headers.items():
            before = merged.get(key)
            if before is not None and (
                before.dtype != header.dtype or before.shape[1:] != header.shape[1:]
            ):
                raise DataError(
                    f"{option} {path}: array {key!r} is {header.dtype}{list(header.shape[1:])} "
                    f"per sample, {before.dtype}{list(before.shape[1:])} in the first shard"
                )
            shape = (total + rows, *header.shape[1:]) if header.ndim else ()
            merged[key] = ArrayHeader(key, shape, header.dtype, header.fortran_order)
        total += rows
    return merged, total


def _from_shards(
    folder: Path,
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None,
    option: str,
    labels: bool,
    limit: int | None,
) -> Inputs:
    files = shards(folder, option)
    headers, total = _shard_headers(files, option, labels)
    source = f"{option} {folder}" if option == "--calibration" else str(folder)
    if limit is not None and limit < total:
        headers = {
            k: ArrayHeader(k, (limit, *h.shape[1:]) if h.ndim else (), h.dtype)
            for k, h in headers.items()
        }
    matched = match(headers, specs, batch_size=batch_size, source=source)
    label_array = None
    if labels and LABELS in headers:
        label_array = np.concatenate([load_npz(p, option, keys=[LABELS])[LABELS] for p in files])
        label_array = label_array[: matched.usable]
    batches = ShardedBatches(files, matched, option, matched.usable)
    notices = [*matched.notices, f"{len(files)} shards, read one at a time"]
    return Inputs(batches, label_array, source, matched.size, notices)  # type: ignore[arg-type]


def read_samples(
    data: Samples,
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None = None,
    option: str = "--data",
    labels: bool = True,
    limit: int | None = None,
) -> Inputs:
    """Samples from any source the API takes, matched to `specs` and batched; `labels`: keep a
    'labels' array (validation) or drop it (calibration); `limit`: the first N samples only."""
    check_batch_size(batch_size)
    if isinstance(data, str | os.PathLike) and Path(data).is_dir():
        return _from_shards(
            Path(data), specs, batch_size=batch_size, option=option, labels=labels, limit=limit
        )
    if isinstance(data, str | os.PathLike):
        arrays = load_npz(data, option)
        source = f"{option} {data}" if option == "--calibration" else str(data)
    elif isinstance(data, Mapping):
        arrays = dict(data)
        source = "calibration data" if option == "--calibration" else "data"
    elif (isinstance(data, Iterable) and not isinstance(data, str | bytes)) or _is_reader(data):
        source = f"{type(data).__name__} ({'calibration' if option == '--calibration' else 'data'})"
        arrays = collect_items(data, source)
    else:
        raise DataError(
            f"{option}: {type(data).__name__} is not samples: give an .npz path, a folder of .npz "
            "shards, a dict of arrays, or an iterable of input dicts (a CalibrationDataReader)"
        )
    if not labels:
        arrays.pop(LABELS, None)
    if limit is not None:  # the first samples along each input's batch axis
        axes = {s.name: s.batch_axis for s in specs}
        arrays = {k: take_rows(np.asarray(v), axes.get(k, 0), 0, limit) for k, v in arrays.items()}
    return from_arrays(arrays, specs, batch_size=batch_size, source=source)


def check_samples(
    data: str | os.PathLike,
    signature: Signature | None,
    *,
    option: str = "--data",
    batch_size: int | None = None,
) -> bool:
    """Check an .npz file or a folder of shards against a model before any work (headers and
    labels only, `check_data_file` for each shard, then their sum); whether there are labels."""
    path = Path(data)
    if not path.is_dir():
        return check_data_file(path, signature, option=option, batch_size=batch_size)
    files = shards(path, option)
    labelled = all([check_data_file(p, None, option=option) for p in files])
    headers, _ = _shard_headers(files, option, option != "--calibration")
    source = f"{option} {path}" if option == "--calibration" else str(path)
    if signature is not None:
        match(headers, signature.specs, batch_size=batch_size, source=source)
    if option == "--calibration" or not labelled:
        return False
    if signature is not None and signature.classes is not None:
        for p in files:
            check_labels(load_npz(p, option, keys=[LABELS])[LABELS], signature.classes, source)
    return True


def sample_keys(data: Samples) -> set[str] | None:
    """The array names a source holds, read from headers where it is a file (None: an iterable,
    unknown until read)."""
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        first = shards(path)[0] if path.is_dir() else path
        return set(read_npz_headers(first))
    if isinstance(data, Mapping):
        return set(data)
    return None


def first_step_inputs(specs: Sequence[InputSpec], available: set[str] | None) -> list[InputSpec]:
    """The inputs of a decoder that the data leaves out and its first step (the prompt, as
    perplexity scores it) fixes: its positions and its empty pasts, as `sequence.decoder_inputs`
    names them."""
    parts = decoder_inputs(specs) if available is not None else None
    if parts is None:
        return []
    fixed = [parts.positions] if parts.positions is not None else []
    fixed += [spec for spec, _ in parts.pasts]
    return [s for s in fixed if s.name not in available]  # type: ignore[operator]


class FirstStepBatches(Sequence[dict[str, np.ndarray]]):
    """Batches read without some of a decoder's inputs (shards are read as they are), completed
    as its first step when read: `sequence.fill_missing`, with the model's `specs`."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]], specs: Sequence[InputSpec]):
        self.batches, self.specs = batches, list(specs)
        self.rows = getattr(batches, "rows", None)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return fill_missing(self.batches[index], self.specs)[0]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (fill_missing(batch, self.specs)[0] for batch in self.batches)
