"""Placing and cutting along an axis: Concat, Split, Slice and Gather.

What the family shares: they move channel ids about rather than link them. Concat places its
inputs' ids at offsets, Split and Slice cut them, Gather picks them; working per index rather
than per whole axis is what lets these compose. Each records a fix: after removal, the split
sizes, slice bounds or gathered indices are rewritten to count the channels kept. Split sizes
and Slice bounds computed from Shape ops are folded to constants before the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import const_tensor
from onnxprune.ops.base import (
    AxisMap,
    ChannelWalk,
    Constants,
    Fix,
    Kept,
    OpInfo,
    RunDims,
    Unsupported,
    attr,
    carrier,
    const_ints,
    node_opset,
    positive_axis,
    stored_ints,
)
from onnxprune.ops.dead import keeps_zero


@dataclass(eq=False)
class SplitFix(Fix):
    """Split's sizes (attribute or input): each output's channels kept."""

    axis: int
    outputs: tuple[np.ndarray, ...]  # the channels of each output
    kind = "split"

    def apply(self, kept: Kept, consts: Constants) -> None:
        node = self.node
        sizes = np.array([kept.kept_of(ids) for ids in self.outputs], dtype=np.int64)
        node.attributes.pop("num_outputs", None)
        version = node_opset(node)
        if "split" in node.attributes or (version is not None and version < 13):
            # below opset 13 the sizes are an attribute (an equal split has none): never an input
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])
        else:
            consts.replace(node, 1, sizes)


@dataclass(eq=False)
class SliceFix(Fix):
    """Slice's starts and ends on a channel axis: the channels kept before each bound."""

    ids: np.ndarray  # the channels of the sliced axis
    position: int  # its entry in starts and ends
    start: int
    end: int
    kind = "slice"

    def apply(self, kept: Kept, consts: Constants) -> None:
        for index, bound in ((1, self.start), (2, self.end)):
            array = stored_ints(self.node, index)
            array[self.position] = kept.kept_of(self.ids[:bound])
            consts.replace(self.node, index, array)


@dataclass(eq=False)
class GatherFix(Fix):
    """Gather's indices into a channel axis: renumbered to the channels kept, and those of
    removed channels dropped along the index axis that carries them (`carrier`)."""

    ids: np.ndarray  # the channels of the gathered axis
    carrier: int | None  # None: one channel picked (a scalar index)
    kind = "gather"

    def apply(self, kept: Kept, consts: Constants) -> None:
        node = self.node
        keep = ~kept.removed[self.ids]
        tensor = const_tensor(node.inputs[1])
        assert tensor is not None
        indices = np.asarray(tensor.numpy()) % len(keep)
        position = np.cumsum(keep) - 1
        j = self.carrier
        new = position[indices].astype(indices.dtype)
        if j is not None:  # drop the removed channels along the axis that carries them
            line = keep[indices[tuple(slice(None) if i == j else 0 for i in range(indices.ndim))]]
            new = np.compress(line, new, axis=j)
        consts.replace(node, 1, np.ascontiguousarray(new))


def concat(node: ir.Node, ctx: ChannelWalk) -> None:
    out = node.outputs[0]
    inputs = [v for v in node.inputs if v is not None]
    rank = ctx.rank(out) or ctx.rank(inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    axis = positive_axis(int(attr(node, "axis", 0)), rank)
    for k in range(rank):
        found = [ctx.ids(v, k) for v in inputs]
        if all(ids is None for ids in found):
            continue
        # a stored part joined along another axis (a class token) feeds these very channels
        role = "param" if k == axis else "shift"
        parts = [
            ctx.space(v, k, role, node) if ids is None else ids
            for v, ids in zip(inputs, found, strict=True)
        ]
        if k == axis:
            ctx.set(out, k, np.concatenate(parts))
        else:
            for ids in parts[1:]:
                ctx.union(parts[0], ids)
            ctx.set(out, k, parts[0])


def concat_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    """Every part's same axis: placed at offsets along the joined axis, the same entries along
    the others."""
    return [(i, axis) for i, v in enumerate(node.inputs) if v is not None]


def one_hot(node: ir.Node, ctx: ChannelWalk) -> None:
    """OneHot makes a new axis of classes from indices: no channel flows through it (the
    indices carry none; the classes are the rows of the table a MatMul then reads)."""
    if ctx.spaces_of(node.inputs[0]):
        raise Unsupported("indices carry channels")


def split(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    axis = positive_axis(int(attr(node, "axis", 0)), rank)
    outs = list(node.outputs)
    ids = ctx.ids(x, axis)
    if ids is not None:
        sizes = const_ints(ctx, node, 1, "split")
        if sizes is None:
            n = len(ids)
            count = len(outs)
            step = -(-n // count)
            sizes = [min(step, n - i * step) for i in range(count)]
        if sum(sizes) != len(ids):
            raise Unsupported("split sizes do not add up")
        parts = []
        for out, start, size in zip(outs, np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
            parts.append(ids[start : start + size])
            ctx.set(out, axis, parts[-1])
        ctx.fix(SplitFix(node, axis, tuple(parts)))
    for out in outs:
        for a, others in ctx.spaces_of(x).items():
            if a != axis:
                ctx.set(out, a, others)


def slice_(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    rank = len(shape)
    axes = const_ints(ctx, node, 3, "axes")
    if len(node.inputs) > 2 and not (ctx.is_const(node.inputs[1]) and ctx.is_const(node.inputs[2])):
        # bounds computed from symbolic dims (Swin crops its window padding, x[:, :H, :W]):
        # fine on axes without channels, which then carry over
        if axes is None or {positive_axis(a, rank) for a in axes} & set(ctx.spaces_of(x)):
            raise Unsupported("computed bounds on a channel axis")
        ctx.carry(x, node.outputs[0])
        return
    starts = const_ints(ctx, node, 1, "starts")
    ends = const_ints(ctx, node, 2, "ends")
    steps = const_ints(ctx, node, 4, "steps")
    if starts is None or ends is None:
        raise Unsupported("no starts/ends")
    axes = [positive_axis(a, rank) for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    spaces = ctx.spaces_of(x)
    out = node.outputs[0]
    for j, axis in enumerate(axes):
        ids = spaces.pop(axis, None)
        if ids is None:
            continue
        if steps[j] != 1:
            raise Unsupported("slices channels with a step")
        start, end, _ = slice(starts[j], ends[j]).indices(len(ids))
        end = max(start, end)
        ctx.set(out, axis, ids[start:end])
        ctx.fix(SliceFix(node, ids, j, start, end))
    for axis, ids in spaces.items():
        ctx.set(out, axis, ids)


def gather(node: ir.Node, ctx: ChannelWalk) -> None:
    x, idx = node.inputs
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    if ctx.spaces_of(idx):
        raise Unsupported("indices carry channels")
    axis = positive_axis(int(attr(node, "axis", 0)), rank)
    indices = ctx.const(idx)
    spaces = ctx.spaces_of(x)
    q = ctx.rank(idx)
    if q is None:
        raise Unsupported("indices of unknown rank")
    out = node.outputs[0]
    if not spaces and rank == 2 and axis == 0 and _stored_floats(ctx, x):
        # an embedding table looked up by token (or position) ids: its columns are the
        # channels of the rows it gives, sliced with them (a dead channel's column is zero, as
        # a shift's entry)
        spaces = {1: ctx.space(x, 1, "shift", node)}
    ids = spaces.pop(axis, None)
    if ids is not None:
        if indices is None:
            raise Unsupported("gathers channels with computed indices")
        picked = ids[np.asarray(indices) % len(ids)]
        if q == 0:
            ctx.freeze(picked.reshape(-1), f"{node.op_type} {node.name!r} picks one channel")
            ctx.fix(GatherFix(node, ids, None))
        else:
            # indices of any rank (exporters write as_strided this way): the channels must vary
            # along one index axis only, which then carries them
            j = carrier(picked)
            if j is None:
                raise Unsupported("gathers channels into several axes")
            line = picked[tuple(slice(None) if i == j else 0 for i in range(q))]
            ctx.set(out, axis + j, line)
            ctx.fix(GatherFix(node, ids, j))
    for a, s in spaces.items():
        ctx.set(out, a if a < axis else a - 1 + q, s)


def _stored_floats(ctx: ChannelWalk, value: ir.Value) -> bool:
    return ctx.is_const(value) and value.dtype is not None and value.dtype.is_floating_point()


# -- output dims for shape folding -----------------------------------------------------------------
def gather_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    indices = run.dims(node.inputs[1])
    if indices is None:
        return None
    axis = positive_axis(int(attr(node, "axis", 0)), len(x))
    return x[:axis] + indices + x[axis + 1 :]


def slice_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    """Slice's output dims from its bounds in this run (a key length cut from a mask)."""
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    if len(node.inputs) < 3:  # opset 9: bounds as attributes
        bounds = [attr(node, name, None) for name in ("starts", "ends", "axes")]
        if bounds[0] is None or bounds[1] is None:
            return None
        starts, ends = (np.asarray(b).reshape(-1) for b in bounds[:2])
        axes = np.asarray(bounds[2] if bounds[2] is not None else range(len(starts))).reshape(-1)
        steps = np.ones(len(starts), dtype=np.int64)
    else:
        values = [run.value(v) if v is not None else None for v in node.inputs[1:5]]
        values += [None] * (4 - len(values))
        if values[0] is None or values[1] is None:
            return None
        starts, ends = (np.asarray(v).reshape(-1) for v in values[:2])
        axes = np.asarray(values[2] if values[2] is not None else range(len(starts))).reshape(-1)
        steps = np.asarray(values[3] if values[3] is not None else [1] * len(starts)).reshape(-1)
    out = list(x)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        a = positive_axis(int(axis), len(x))
        if not 0 <= a < len(x) or int(step) == 0:
            return None
        # a bound past the end is clipped: where it is a stand-in of a symbolic dim (huge), the
        # clipped size would be the axis's whatever the dim is, not a size to trust
        for bound in (int(start), int(end)):
            if abs(bound) > x[a] and abs(bound) < _UNTIL_THE_END:
                return None
        out[a] = len(range(*slice(int(start), int(end), int(step)).indices(x[a])))
    return out


# Slice bounds at or past this are "to the end" (exporters write INT32 or INT64 maxima).
_UNTIL_THE_END = 2**31 - 1


def concat_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    shapes = [run.dims(v) for v in node.inputs if v is not None]
    if any(s is None or len(s) != len(x) for s in shapes):
        return None
    axis = positive_axis(int(attr(node, "axis", 0)), len(x))
    return [*x[:axis], sum(s[axis] for s in shapes), *x[axis + 1 :]]  # type: ignore[index]


# -- views of a stored tensor (finding weights) ----------------------------------------------------
def same_axes_view(node: ir.Node, index: int, axes: AxisMap) -> list[AxisMap] | None:
    """Concat (any input) places the tensor at an offset; Slice and Split (input 0) cut it:
    every output keeps its axes."""
    if node.op_type != "Concat" and index != 0:
        return None
    return [list(axes) for _ in node.outputs]


def gather_view(node: ir.Node, index: int, axes: AxisMap) -> list[AxisMap] | None:
    """Gather of stored indices (a scalar drops the axis, a vector keeps it); a computed index
    is a lookup (an embedding table), not a view."""
    indices = const_tensor(node.inputs[1]) if index == 0 and len(node.inputs) > 1 else None
    if indices is None or len(indices.shape) > 1:
        return None
    axis = positive_axis(int(attr(node, "axis", 0)), len(axes))
    if len(indices.shape) == 0:
        return [[a for k, a in enumerate(axes) if k != axis]]
    return [list(axes)]


OPS = (
    OpInfo(
        "Concat",
        rule=concat,
        output_dims=concat_dims,
        view=same_axes_view,
        dead=keeps_zero,
        sources=concat_sources,
    ),
    OpInfo("OneHot", rule=one_hot),
    OpInfo("Split", rule=split, folded_inputs=(1,), view=same_axes_view, dead=keeps_zero),
    OpInfo(
        "Slice",
        rule=slice_,
        output_dims=slice_dims,
        folded_inputs=(1, 2, 3, 4),
        view=same_axes_view,
        dead=keeps_zero,
    ),
    OpInfo("Gather", rule=gather, output_dims=gather_dims, view=gather_view, dead=keeps_zero),
)
