"""Generated inputs for models validated without data: shapes from the model and --input-shape,
integer inputs kept within the tables they index, a notice for every guess."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxprune.core.tensors import const_tensor
from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.inputs.sequence import settle_shapes, settle_values, settled
from onnxprune.inputs.spec import (
    Inputs,
    InputSpec,
    batch_rows,
    check_batch_size,
    check_shape_names,
    scalar_type,
    shape_text,
)
from onnxprune.macs import known_dims

if TYPE_CHECKING:
    import onnx_ir as ir

# Generated inputs: this many batches, so that agreement is not decided by a single sample.
GENERATED_BATCHES = 8
# Generated integer inputs (token ids, indices, masks) stay small so that they index any table.
INT_HIGH = 10
# Generated inputs: one batch may take at most this many bytes (a typo in --batch-size must not
# try to allocate terabytes).
GENERATED_MAX_BYTES = 1 << 30


def resolve_shapes(
    specs: Sequence[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for generated inputs: --input-shape, else the model's with batch -> 1.

    A symbolic dim named like one that --input-shape gave a size (the sequence of input_ids)
    takes that size in every input."""
    shapes = dict(shapes or {})
    shapes = settle_shapes(specs, _with_tokens(specs, shapes, batch_size))
    check_shape_names(shapes, [s.name for s in specs])
    notices = []
    out: dict[str, tuple[int, ...]] = {}
    bound: dict[str, int] = {}  # symbolic dim name -> the size --input-shape gave it
    for spec in specs:
        for d, n in zip(spec.shape, shapes.get(spec.name, ()), strict=False):
            if isinstance(d, str) and d:
                bound.setdefault(d, n)
    for spec in specs:
        if spec.name in shapes:
            shape = shapes[spec.name]
            fixed_ok = all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, shape, strict=False)
            )
            if len(shape) != len(spec.shape) or not fixed_ok:
                raise InvalidArgumentError(
                    f"--input-shape {spec.name}={'x'.join(map(str, shape))}: the model's input "
                    f"has shape {shape_text(spec.shape)}"
                )
            out[spec.name] = shape
            continue
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                dims.append(d)
            elif d in bound:
                dims.append(bound[d])  # type: ignore[index]
            elif axis == spec.batch_axis:
                size = batch_size or 1
                dims.append(size)
                if batch_size is None:
                    notices.append(
                        f"input {spec.name!r}: symbolic batch dimension {d or '?'} set to 1"
                    )
            else:
                example = "x".join(
                    str(x) if isinstance(x, int) else "1" if i == spec.batch_axis else (x or "?")
                    for i, x in enumerate(spec.shape)
                )
                raise DataError(
                    f"model input {spec.name!r} has symbolic dimension {d or '?'} at axis {axis} "
                    f"(shape {shape_text(spec.shape)}): give its size with "
                    f"--input-shape {spec.name}={example} (a number for each name), or give --data"
                )
        out[spec.name] = tuple(dims)
    return out, notices


def _with_tokens(
    specs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], batch_size: int | None
) -> dict[str, tuple[int, ...]]:
    """A decoder's token shape where it is known without guessing (given, or static but for the
    batch), so that its mask, positions and pasts can follow it (inputs.sequence)."""
    spec = next((s for s in specs if s.name == "input_ids" and len(s.shape) == 2), None)
    if spec is None or spec.name in shapes or not isinstance(spec.shape[1], int):
        return shapes
    return {**shapes, spec.name: (batch_size or 1, spec.shape[1])}


def generated_shapes(
    specs: Sequence[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The shapes `generate` makes (resolve_shapes), refused when a batch would be too big."""
    check_batch_size(batch_size)
    concrete, notices = resolve_shapes(specs, shapes, batch_size=batch_size)
    nbytes = sum(math.prod(concrete[s.name]) * s.dtype.itemsize for s in specs)
    if nbytes > GENERATED_MAX_BYTES:
        what = f"--batch-size {batch_size}" if batch_size is not None else "--input-shape"
        raise InvalidArgumentError(
            f"{what}: one batch of generated inputs would take {nbytes / 2**30:,.1f} GiB; "
            "give a smaller one, or real samples with --data"
        )
    return concrete, notices


@dataclass(frozen=True)
class Usable:
    """The values a generated input takes where the graph says what it can use.

    Integers are drawn from [low, high); `fill` is one value everywhere (a mask: 1, all
    attended; a scalar the graph compares with constants: the first of them)."""

    low: int = 0
    high: int | None = None
    fill: float | None = None
    why: str = ""


# Ops an index passes through unchanged on its way to the table it indexes.
_INDEX_PASS = frozenset(
    {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand", "Transpose",
     "Slice", "Tile"}
)  # fmt: skip
# A table's row count and the offset an index carries (ids + 2 indexes rows 2..).
_GATHERS = ("Gather", "GatherElements", "GatherND")
_TRACE_DEPTH = 16


def _scalar(value: ir.Value | None) -> float | None:
    """The number a stored one-element tensor (initializer or Constant) holds."""

    tensor = const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _uses(value: ir.Value, offset: float = 0.0, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """What the graph does with an integer input: ('rows', (low, high, rows, node)) for a table
    of `rows` rows it indexes, the input then usable in [low, high); ('mask', node) where it is
    used as a mask; ('equals', number) where it is compared with a constant; ('other', node)
    anywhere else. Followed through casts, reshapes and added constants (the offset)."""

    if depth > _TRACE_DEPTH:
        yield "other", None
        return
    for node, index in value.uses():
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        others = [v for i, v in enumerate(node.inputs) if i != index and v is not None]
        if op in _GATHERS and index == 1:
            dims = known_dims(node.inputs[0])
            attr = node.attributes.get("axis")
            axis = int(attr.value) if attr is not None else 0
            if dims is None or not -len(dims) <= axis < len(dims):
                yield "other", node
                continue
            rows = min(dims) if op == "GatherND" else dims[axis]
            yield "rows", (max(0, math.ceil(-offset)), math.floor(rows - offset), rows, node)
        elif op in _INDEX_PASS and index == 0:
            for out in node.outputs:
                yield from _uses(out, offset, depth + 1)
        elif op in ("Add", "Sub") and len(others) == 1 and _scalar(others[0]) is not None:
            c = _scalar(others[0])
            if op == "Sub" and index == 1:  # c - x: a mask turned into "masked out"
                yield ("mask", node) if c == 1 else ("other", node)
                continue
            shift = c if op == "Add" else -c  # type: ignore[operator]
            for out in node.outputs:
                yield from _uses(out, offset + shift, depth + 1)
        elif op == "Equal" and len(others) == 1 and _scalar(others[0]) is not None:
            yield "equals", _scalar(others[0])
        elif (op == "Where" and index == 0) or op == "Not":
            yield "mask", node
        else:
            yield "other", node


def usable_values(model: ir.Model, specs: Sequence[InputSpec]) -> dict[str, Usable]:
    """For each integer or bool input of an onnx-ir model, the values the graph can use, where
    its uses say: the rows of the tables it indexes (Gather, GatherElements, GatherND; through
    casts, reshapes and an added constant such as a position offset), 1 for a mask (by name,
    float masks too, or used as one: 1 - mask, Where's condition), a constant it is compared
    with for a scalar. Inputs whose use says nothing are left out (they keep the default)."""
    inputs = {v.name: v for v in model.graph.inputs}
    found: dict[str, Usable] = {}
    for spec in specs:
        value = inputs.get(spec.name)
        named_mask = "mask" in spec.name.lower()
        if value is None or (spec.dtype.kind not in "iub" and not named_mask):
            continue
        uses = list(_uses(value))
        rows = [info for kind, info in uses if kind == "rows"]
        compared = [info for kind, info in uses if kind == "equals"]
        # a scalar read as a condition is a switch, not a mask
        masked = named_mask or (bool(spec.shape) and any(kind == "mask" for kind, _ in uses))
        if rows:
            low = max(r[0] for r in rows)
            high = min(r[1] for r in rows)
            _, _, count, node = min(rows, key=lambda r: r[1])
            if high > low:
                table = node.inputs[0].name if node.inputs[0] is not None else "?"
                found[spec.name] = Usable(low, high, why=f"it indexes {table!r}, {count} rows")
            continue
        if masked:
            found[spec.name] = Usable(fill=1, why="a mask: everything attended")
        elif compared and not spec.shape:
            found[spec.name] = Usable(
                fill=compared[0], why=f"the graph compares it with {compared[0]:g}"
            )
    return found


def _random(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, usable: Usable | None
) -> np.ndarray:
    if usable is not None and usable.fill is not None:
        return np.full(shape, usable.fill, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if usable is not None and usable.high is not None:
        return rng.integers(usable.low, usable.high, size=shape, dtype=dtype)
    high = 256 if dtype == np.uint8 else INT_HIGH
    return rng.integers(0, high, size=shape, dtype=dtype)


def _usable_notice(spec: InputSpec, usable: Usable | None) -> str | None:
    """What a generated input was set to when that is a choice the user may want to change."""
    if usable is not None and usable.fill is not None:
        return f"input {spec.name!r}: all {usable.fill:g} ({usable.why})"
    if usable is not None and usable.high is not None:
        return (
            f"input {spec.name!r}: integers drawn from [{usable.low}, {usable.high}) ({usable.why})"
        )
    if spec.dtype.kind in "iu" and spec.dtype != np.uint8:
        return (
            f"input {spec.name!r}: integers drawn from [0, {INT_HIGH}): the graph does not say "
            "what range it can use; give real values with --data"
        )
    return None


def generate(
    specs: Sequence[InputSpec],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int | None = None,
    batches: int = GENERATED_BATCHES,
    seed: int = 0,
    usable: Mapping[str, Usable] | None = None,
) -> Inputs:
    """Random inputs from the model's own types and shapes, the same for the same seed.

    Floats are standard normal, bools fair coins, integers uniform in the range `usable` gives
    (usable_values: the rows of the table they index, 1 for a mask), else in [0, 10) (uint8 in
    [0, 256)). A scalar (0-d) input gets one value, the same in every batch.
    """
    usable = dict(usable or {})
    concrete, notices = generated_shapes(specs, shapes, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    fixed: dict[str, np.ndarray] = {}
    prompt = settled(specs)
    if prompt:
        notices.append(
            f"decoder inputs as the prompt step: {', '.join(prompt[:3])}"
            + (f" and {len(prompt) - 3} more" if len(prompt) > 3 else "")
            + " follow input_ids (every token attended, positions from 0, no past)"
        )
    for spec in specs:
        notice = None if spec.name in prompt else _usable_notice(spec, usable.get(spec.name))
        if not spec.shape:
            value = _random(rng, (), spec.dtype, usable.get(spec.name))
            fixed[spec.name] = value
            example = f"{scalar_type(spec.dtype)}({value.item()!r})"
            notice = (
                f"input {spec.name!r} is a scalar: set to {value.item()!r} for every batch"
                + (f" ({usable[spec.name].why})" if spec.name in usable else "")
                + f"; give another with --data, e.g. np.savez(..., {spec.name}={example})"
            )
        if notice:
            notices.append(notice)
    feeds = [
        {
            s.name: fixed[s.name]
            if s.name in fixed
            else _random(rng, concrete[s.name], s.dtype, usable.get(s.name))
            for s in specs
        }
        for _ in range(batches)
    ]
    axes = {s.name: s.batch_axis for s in specs}
    for batch in feeds:  # a decoder's prompt step: mask of ones, positions 0.., empty pasts
        settle_values(specs, batch)
    return Inputs(
        batches=feeds,
        labels=None,
        source=f"generated (seed {seed})",
        batch_size=batch_rows(feeds[0], axes) if feeds else 1,
        notices=notices,
        generated=True,
        batch_axes=axes,
    )
