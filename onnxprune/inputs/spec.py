"""What the stages feed models: each input as the model declares it, and batches of samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.options import (  # noqa: F401  (parsed with the options, exported here too)
    check_batch_size,
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

    batches: Sequence[dict[str, np.ndarray]]  # a list, or shards read as they are walked
    labels: np.ndarray | None
    source: str
    batch_size: int
    notices: list[str] = field(default_factory=list)
    generated: bool = False  # made up by `generate`, not the user's samples

    @property
    def samples(self) -> int:
        rows = getattr(self.batches, "rows", None)  # lazily read batches know it from headers
        return rows if rows is not None else sum(batch_rows(batch) for batch in self.batches)

    def sample_values(self) -> dict[str, np.ndarray]:
        """The scalar (0-d) inputs: fed the same in every batch, so a count may use them."""
        return {name: a for name, a in self.batches[0].items() if a.ndim == 0}

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Input shapes of one inference, batch 1 where the batch axis is free: what MACs count."""
        shapes = {name: tuple(int(d) for d in a.shape) for name, a in self.batches[0].items()}
        for spec in specs:
            if spec.shape and not isinstance(spec.shape[0], int):
                shapes[spec.name] = (1, *shapes[spec.name][1:])
        return shapes


def batch_rows(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the first axis of its arrays (a scalar input is the same for all)."""
    return next((int(a.shape[0]) for a in batch.values() if a.ndim), 1)


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
