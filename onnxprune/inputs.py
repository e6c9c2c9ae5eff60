"""Validation inputs: the user's .npz matched to the model's inputs, or generated ones, in batches.

Checks happen here, before any model runs, so a wrong array name, shape or dtype is one clear
`DataError` instead of an ONNX Runtime message from deep inside a session.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.errors import DataError, InvalidArgumentError

LABELS = "labels"
DEFAULT_BATCH = 32
# Generated inputs: this many batches, so that agreement is not decided by a single sample.
GENERATED_BATCHES = 8
# Generated integer inputs (token ids, indices, masks) stay small so that they index any table.
INT_HIGH = 10

# ONNX Runtime's type strings for tensor inputs -> numpy dtypes it accepts.
ORT_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One model input as ONNX Runtime sees it; a dim is an int, a symbolic name, or None."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


def input_specs(session: object) -> list[InputSpec]:
    """The inputs an ONNX Runtime session needs (initializers with defaults are not among them)."""
    specs = []
    for arg in session.get_inputs():  # type: ignore[attr-defined]
        if arg.type not in ORT_TYPES:
            raise DataError(
                f"model input {arg.name!r} has type {arg.type}, which onnxprune cannot feed "
                "(numeric and bool tensors only)"
            )
        shape = tuple(d if isinstance(d, int) or d is None else str(d) for d in arg.shape)
        specs.append(InputSpec(arg.name, np.dtype(ORT_TYPES[arg.type]), shape))
    return specs


@dataclass
class Inputs:
    """Batches of feeds for every model input, and the labels that go with their rows."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str
    batch_size: int
    notices: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(_rows(batch) for batch in self.batches)

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Input shapes of one inference, batch 1 where the batch axis is free: what MACs count."""
        shapes = {name: tuple(int(d) for d in a.shape) for name, a in self.batches[0].items()}
        for spec in specs:
            if spec.shape and not isinstance(spec.shape[0], int):
                shapes[spec.name] = (1, *shapes[spec.name][1:])
        return shapes


def _rows(batch: dict[str, np.ndarray]) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0]) if first.ndim else 1


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """['x=1x3x224x224'] -> {'x': (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            if any(d < 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InvalidArgumentError(
                f"--input-shape {spec!r}: write NAME=DIMS, e.g. input=1x3x224x224"
            ) from None
        shapes[name] = shape
    return shapes


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (no pickles: a data file must not run code)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: a single .npy array, expected an .npz file (np.savez)")
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def _shape_text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_array(key: str, array: np.ndarray, spec: InputSpec) -> None:
    if array.dtype != spec.dtype:
        raise DataError(
            f"array {key!r} is {array.dtype}, model input {spec.name!r} expects {spec.dtype}: "
            f"convert it, e.g. np.savez(..., {spec.name}=a.astype(np.{spec.dtype.name}))"
        )
    if not spec.shape:
        raise DataError(
            f"model input {spec.name!r} is a scalar; --data needs inputs with a sample axis "
            "(run without --data to use generated inputs)"
        )
    wrong = array.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], array.shape[1:], strict=False)
    )
    if wrong:
        raise DataError(
            f"array {key!r} has shape {list(array.shape)}, model input {spec.name!r} has shape "
            f"{_shape_text(spec.shape)} (the first axis of the array is the sample axis)"
        )


def from_arrays(
    arrays: dict[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None = None,
    source: str = "data",
) -> Inputs:
    """Match arrays to inputs by name (one unnamed array is fine for one input), check, batch."""
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    labels = arrays.pop(LABELS, None)
    notices: list[str] = []
    by_input: dict[str, tuple[str, np.ndarray]] = {}
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        key = next(iter(arrays))
        by_input[specs[0].name] = (key, arrays[key])
    else:
        for spec in specs:
            if spec.name not in arrays:
                have = ", ".join(repr(k) for k in arrays) or "none besides labels"
                need = ", ".join(repr(s.name) for s in specs)
                raise DataError(
                    f"{source}: no array for model input {spec.name!r} (arrays in the file: "
                    f"{have}; the model needs {need}, plus optional 'labels')"
                )
            by_input[spec.name] = (spec.name, arrays[spec.name])
    extra = sorted(set(arrays) - {key for key, _ in by_input.values()})
    if extra:
        notices.append(f"arrays not used by the model: {', '.join(extra)}")

    for spec in specs:
        _check_array(*by_input[spec.name], spec)
    counts = {key: int(a.shape[0]) for key, a in by_input.values()}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{source}: input arrays have different numbers of samples: "
            + ", ".join(f"{k} {n}" for k, n in counts.items())
        )
    total = next(iter(counts.values()))
    if total == 0:
        raise DataError(f"{source}: the arrays hold no samples")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"{source}: 'labels' must be a 1-D integer array of class indices, got "
                f"{labels.dtype}{list(labels.shape)}"
            )
        if len(labels) != total:
            raise DataError(
                f"{source}: 'labels' has {len(labels)} entries but the inputs have {total} samples"
            )

    fixed = {s.shape[0] for s in specs if isinstance(s.shape[0], int)}
    if len(fixed) > 1:
        raise DataError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    if fixed:
        size = fixed.pop()
        if batch_size is not None and batch_size != size:
            notices.append(f"the model's batch dimension is fixed at {size}; batch size {size}")
        usable = total - total % size
        if usable == 0:
            raise DataError(f"{source}: {total} samples, fewer than the model's fixed batch {size}")
        if usable < total:
            notices.append(f"last {total - usable} samples dropped: not a full batch of {size}")
    else:
        size = batch_size or DEFAULT_BATCH
        usable = total
    if size < 1:
        raise InvalidArgumentError(f"--batch-size {size}: must be at least 1")
    batches = [
        {name: a[start : start + size] for name, (_, a) in by_input.items()}
        for start in range(0, usable, size)
    ]
    return Inputs(
        batches=batches,
        labels=None if labels is None else labels[:usable],
        source=source,
        batch_size=size,
        notices=notices,
    )


def resolve_shapes(
    specs: Sequence[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for generated inputs: --input-shape, else the model's with batch -> 1."""
    shapes = dict(shapes or {})
    names = {s.name for s in specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise InvalidArgumentError(
            f"--input-shape {unknown[0]}: the model has no such input (inputs: "
            + ", ".join(sorted(names))
            + ")"
        )
    notices = []
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            fixed_ok = all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, shape, strict=False)
            )
            if len(shape) != len(spec.shape) or not fixed_ok:
                raise InvalidArgumentError(
                    f"--input-shape {spec.name}={'x'.join(map(str, shape))}: the model's input "
                    f"has shape {_shape_text(spec.shape)}"
                )
            out[spec.name] = shape
            continue
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                size = batch_size or 1
                dims.append(size)
                if batch_size is None:
                    notices.append(
                        f"input {spec.name!r}: symbolic batch dimension {d or '?'} set to 1"
                    )
            else:
                example = "x".join(
                    str(x) if isinstance(x, int) else "1" if i == 0 else (x or "?")
                    for i, x in enumerate(spec.shape)
                )
                raise DataError(
                    f"model input {spec.name!r} has symbolic dimension {d or '?'} at axis {axis} "
                    f"(shape {_shape_text(spec.shape)}): give its size with "
                    f"--input-shape {spec.name}={example} (a number for each name), or give --data"
                )
        out[spec.name] = tuple(dims)
    return out, notices


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    high = 256 if dtype == np.uint8 else INT_HIGH
    return rng.integers(0, high, size=shape, dtype=dtype)


def generate(
    specs: Sequence[InputSpec],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int | None = None,
    batches: int = GENERATED_BATCHES,
    seed: int = 0,
) -> Inputs:
    """Random inputs from the model's own types and shapes, the same for the same seed.

    Floats are standard normal, integers uniform in [0, 10) (uint8 in [0, 256)), bools fair coins.
    """
    concrete, notices = resolve_shapes(specs, shapes, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    feeds = [
        {s.name: _random(rng, concrete[s.name], s.dtype) for s in specs} for _ in range(batches)
    ]
    first = concrete[specs[0].name] if specs else ()
    return Inputs(
        batches=feeds,
        labels=None,
        source=f"generated (seed {seed})",
        batch_size=int(first[0]) if first else 1,
        notices=notices,
    )
