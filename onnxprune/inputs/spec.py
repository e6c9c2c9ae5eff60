"""What the stages feed models: each input as the model declares it, and batches of samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.options import (  # noqa: F401  (parsed with the options, exported here too)
    check_batch_size,
    parse_batch_axes,
    parse_input_shapes,
)

LABELS = "labels"
DEFAULT_BATCH = 32

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
    """One model input as ONNX Runtime sees it; a dim is an int, a symbolic name, or None.
    `batch_axis`: the axis samples are stacked on (None for a scalar, the same for every sample;
    `with_batch_axes` sets it from the model's symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    batch_axis: int | None = 0

    def __post_init__(self) -> None:
        if not self.shape:
            object.__setattr__(self, "batch_axis", None)


def batch_axes_of(
    shapes: Mapping[str, Sequence[Dim]], overrides: Mapping[str, int] | None = None
) -> dict[str, int | None]:
    """Each input's batch axis: where it holds the symbolic dim that is its batch in other
    inputs too. That dim is a name shared by two or more inputs that is the first axis of at
    least one (a stateful model's [2, N, 128] state goes with its [N, 512] audio: axis 1); of
    several, the one first in most inputs, then the earliest. Inputs without it, and models
    with no shared name, batch on axis 0; scalars have none. `overrides` (--batch-axis NAME=K)
    win; a name that is no input, or an axis out of range, is refused."""
    overrides = dict(overrides or {})
    for name, axis in overrides.items():
        if name not in shapes:
            raise InvalidArgumentError(
                f"--batch-axis {name}={axis}: the model has no such input (inputs: "
                + ", ".join(sorted(shapes))
                + ")"
            )
        rank = len(shapes[name])
        if not 0 <= axis < rank:
            raise InvalidArgumentError(
                f"--batch-axis {name}={axis}: input {name!r} has {rank} axes (0 to {rank - 1})"
            )
    holders: dict[str, list[int]] = {}  # symbolic name -> its first axis in each input holding it
    order: list[str] = []
    for shape in shapes.values():
        seen: dict[str, int] = {}
        for axis, dim in enumerate(shape):
            if isinstance(dim, str) and dim and dim not in seen:
                seen[dim] = axis
        for dim, axis in seen.items():
            if dim not in holders:
                order.append(dim)
            holders.setdefault(dim, []).append(axis)
    shared = [d for d in order if len(holders[d]) > 1 and 0 in holders[d]]
    batch = max(shared, key=lambda d: holders[d].count(0), default=None)  # first of the best
    axes: dict[str, int | None] = {}
    for name, shape in shapes.items():
        if name in overrides:
            axes[name] = overrides[name]
        elif not shape:
            axes[name] = None
        elif batch is not None and batch in shape:
            axes[name] = list(shape).index(batch)
        else:
            axes[name] = 0
    return axes


def with_batch_axes(
    specs: Sequence[InputSpec], overrides: Mapping[str, int] | None = None
) -> list[InputSpec]:
    """The specs with their batch axes set (`batch_axes_of`)."""
    axes = batch_axes_of({s.name: s.shape for s in specs}, overrides)
    return [dataclasses.replace(s, batch_axis=axes[s.name]) for s in specs]


def take_rows(array: np.ndarray, axis: int | None, start: int, stop: int) -> np.ndarray:
    """Samples start:stop of an array batched on `axis` (a scalar, axis None, as it is)."""
    if axis is None or array.ndim == 0:
        return array
    index: list[slice] = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def input_specs(session: object, batch_axes: Mapping[str, int] | None = None) -> list[InputSpec]:
    """The inputs an ONNX Runtime session needs (initializers with defaults are not among them),
    with their batch axes (`batch_axes_of`, `batch_axes` the user's overrides)."""
    specs = []
    for arg in session.get_inputs():  # type: ignore[attr-defined]
        if arg.type not in ORT_TYPES:
            raise DataError(
                f"model input {arg.name!r} has type {arg.type}, which onnxprune cannot feed "
                "(numeric and bool tensors only)"
            )
        shape = tuple(
            None
            if d is None or (isinstance(d, int) and d < 0)
            else d
            if isinstance(d, int)
            else str(d)
            for d in arg.shape
        )
        specs.append(InputSpec(arg.name, np.dtype(ORT_TYPES[arg.type]), shape))
    return with_batch_axes(specs, batch_axes)


@dataclass
class Inputs:
    """Batches of feeds for every model input, and the labels that go with their rows."""

    batches: Sequence[dict[str, np.ndarray]]  # a list, or shards read as they are walked
    labels: np.ndarray | None
    source: str
    batch_size: int
    notices: list[str] = field(default_factory=list)
    generated: bool = False  # made up by `generate`, not the user's samples
    # input -> the axis its samples are stacked on (None: a scalar); absent: axis 0
    batch_axes: dict[str, int | None] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        rows = getattr(self.batches, "rows", None)  # lazily read batches know it from headers
        if rows is not None:
            return rows
        return sum(batch_rows(batch, self.batch_axes) for batch in self.batches)

    def sample_values(self) -> dict[str, np.ndarray]:
        """The scalar (0-d) inputs: fed the same in every batch, so a count may use them."""
        return {name: a for name, a in self.batches[0].items() if a.ndim == 0}

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Input shapes of one inference, batch 1 where the batch axis is free: what MACs count."""
        shapes = {name: tuple(int(d) for d in a.shape) for name, a in self.batches[0].items()}
        for spec in specs:
            axis = spec.batch_axis
            if axis is not None and spec.shape and not isinstance(spec.shape[axis], int):
                shape = list(shapes[spec.name])
                shape[axis] = 1
                shapes[spec.name] = tuple(shape)
        return shapes


def batch_rows(
    batch: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None
) -> int:
    """Samples in a batch: its arrays' batch axis (`axes`, else the first; a scalar input is
    the same for all)."""
    axes = axes or {}
    for name, array in batch.items():
        axis = axes.get(name, 0)
        if array.ndim and axis is not None:
            return int(array.shape[axis])
    return 1


def fit_empty(
    batch: Mapping[str, np.ndarray], dims: Mapping[str, Sequence[Dim]]
) -> dict[str, np.ndarray]:
    """Empty arrays (a KV cache's past of length 0) in the shape a model declares, its fixed
    dims taken: a model pruned of key/value heads or head_dim takes narrower pasts than the
    dense model the samples were made for, and an empty past holds nothing to narrow."""
    out = dict(batch)
    for name, array in batch.items():
        declared = dims.get(name)
        if array.size or declared is None or len(declared) != array.ndim:
            continue
        shape = tuple(
            d if isinstance(d, int) else n for d, n in zip(declared, array.shape, strict=True)
        )
        if shape != array.shape and 0 in shape:
            out[name] = np.zeros(shape, dtype=array.dtype)
    return out


def check_shape_names(shapes: Mapping[str, object] | None, names: Sequence[str]) -> None:
    """--input-shape (or `input_shapes`) may only name the model's inputs: a typo would otherwise
    leave a shape unused, and what needed it (MACs, constant compensation) quietly guessed."""
    unknown = sorted(set(shapes or {}) - set(names))
    if unknown:
        raise InvalidArgumentError(
            f"--input-shape {unknown[0]}: the model has no such input (inputs: "
            + ", ".join(sorted(names))
            + ")"
        )


def shape_text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def scalar_type(dtype: np.dtype) -> str:
    """How numpy code makes a scalar of `dtype` (np.bool_ in every numpy version)."""
    return "np.bool_" if dtype.kind == "b" else f"np.{dtype.name}"
