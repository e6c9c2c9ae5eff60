"""Spatial ops and reductions: pools, Pad, Resize/Upsample and the Reduce ops.

What the family shares: they work along the spatial (or reduced) axes and leave the channel axis
alone, so channels carry through; one that would mix, pad, resize or average over channels is
refused. Pad's pads and Resize's sizes, when computed from Shape ops, are folded to constants
before the walk; Resize's sizes name the channel count, rewritten after removal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.ops.base import (
    ChannelWalk,
    Constants,
    Dead,
    Fix,
    Kept,
    OpInfo,
    Unsupported,
    attr,
    const_ints,
    only_axes,
    positive_axis,
    stored_ints,
)
from onnxprune.ops.dead import emit, fresh_name, keeps_zero

POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_SUMS = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")
REDUCES = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSumExp", *REDUCE_SUMS)


@dataclass(eq=False)
class SizesFix(Fix):
    """Resize's stored sizes: the entries of channel axes get the count kept."""

    positions: tuple[int, ...]  # entries of the sizes input
    ids: tuple[np.ndarray, ...]  # the channels of the input axis each entry sizes
    kind = "sizes"

    def apply(self, kept: Kept, consts: Constants) -> None:
        array = stored_ints(self.node, 3)
        for position, ids in zip(self.positions, self.ids, strict=True):
            array[position] = kept.kept_of(ids)
        consts.replace(self.node, 3, array)


@dataclass(eq=False)
class ReduceFix(Fix):
    """A sum or mean over channel axes: its input is rewritten so that the reduction over the
    channels kept gives what it gave over all of them, the removed ones holding what they held:
    a mean's input is scaled by kept / original (it keeps dividing by the original count), and
    each removed channel's value (where it is not zero) is spread over the kept entries. The
    reduction's own output stays the same value, so what reads it needs no change."""

    ids: tuple[np.ndarray, ...]  # the channels of each reduced channel axis
    held: Dead  # what a removed channel holds in the reduced input
    mean: bool
    kind = "reduce"

    def apply(self, kept: Kept, consts: Constants) -> None:
        node = self.node
        total = int(np.prod([len(ids) for ids in self.ids]))
        left = int(np.prod([kept.kept_of(ids) for ids in self.ids]))
        if left == total or node.graph is None:
            return
        out = node.outputs[0]
        dtype = out.dtype.numpy() if out.dtype is not None else np.float32
        graph = node.graph
        name = node.name or node.op_type
        made: list[ir.Node] = []
        value = node.inputs[0]
        if self.mean:  # sum over the kept / the original count
            made.append(
                ir.Node("", "Mul", [value, None], name=fresh_name(graph, f"{name}_original_count"))
            )
            consts.replace(made[-1], 1, np.array(left / total, dtype=dtype))
            value = made[-1].outputs[0]
        if not self.held.zero:  # each removed channel's value, spread over the kept entries
            removed = emit(self.held, node, consts)
            share = (total - left) / (total if self.mean else left)
            made.append(
                ir.Node("", "Mul", [removed, None], name=fresh_name(graph, f"{name}_removed_share"))
            )
            consts.replace(made[-1], 1, np.array(share, dtype=dtype))
            made.append(
                ir.Node(
                    "", "Add", [value, made[-1].outputs[0]], name=fresh_name(graph, f"{name}_exact")
                )
            )
            value = made[-1].outputs[0]
        graph.insert_before(node, made)
        node.replace_input_with(0, value)


def pool(node: ir.Node, ctx: ChannelWalk) -> None:
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise Unsupported("its indices output counts channels")
    only_axes(ctx, node.inputs[0], {0, 1}, "are pooled over")
    ctx.carry(node.inputs[0], node.outputs[0])


def pad(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    pads = const_ints(ctx, node, 1, "pads")
    if rank is None or pads is None:
        raise Unsupported("unknown pads")
    axes = const_ints(ctx, node, 3, "axes") or list(range(rank))
    axes = [positive_axis(a, rank) for a in axes]
    for j, axis in enumerate(axes):
        if axis in ctx.spaces_of(x) and (pads[j] or pads[j + len(axes)]):
            raise Unsupported("pads the channel axis")
    ctx.carry(x, node.outputs[0])


def resize(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    spaces = ctx.spaces_of(x)
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    opset = ctx.model.opset_imports.get("", 17)
    scale_index = 1 if node.op_type == "Upsample" or opset < 11 else 2
    scales = const_floats(ctx, node, scale_index, "scales")
    sizes = const_ints(ctx, node, 3, "sizes") if node.op_type == "Resize" and opset >= 11 else None
    axes = attr(node, "axes", None)
    axes = [positive_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    for axis in spaces:
        if axis not in axes:
            continue
        j = axes.index(axis)
        if scales and scales[j] != 1.0:
            raise Unsupported("resizes the channel axis")
        if sizes and sizes[j] != ctx.dim(x, axis):
            raise Unsupported("resizes the channel axis")
    if sizes and spaces:
        resized = [a for a in spaces if a in axes]
        ctx.fix(
            SizesFix(node, tuple(axes.index(a) for a in resized), tuple(spaces[a] for a in resized))
        )
    ctx.carry(x, node.outputs[0])


def const_floats(ctx: ChannelWalk, node: ir.Node, index: int, name: str) -> list[float] | None:
    """Floats given as an input constant (newer opsets) or an attribute (older ones)."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = ctx.const(node.inputs[index])
        if array is None:
            raise Unsupported(f"input {index} is computed, not a constant")
        return [float(v) for v in np.asarray(array).reshape(-1)]
    value = attr(node, name, None)
    return None if value is None else [float(v) for v in value]


def reduce(node: ir.Node, ctx: ChannelWalk) -> None:
    """Reducing other axes keeps channels. A sum or a mean over channels stays exact when the
    removed ones still count as what they held (`ReduceFix`): a zero adds nothing to a sum, a
    mean keeps dividing by the original count, and a removed channel that held something else
    (x - mean in a variance) has that added back. A max or a product over channels freezes."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    axes = const_ints(ctx, node, 1, "axes")
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            ctx.carry(x, node.outputs[0])
            return
        axes = list(range(rank))
    reduced = {positive_axis(a, rank) for a in axes}
    keep = attr(node, "keepdims", 1)
    mapping = {}
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            out_axis += 1 if keep else 0
            continue
        mapping[axis] = out_axis
        out_axis += 1
    spaces = ctx.spaces_of(x)
    over = sorted(reduced & set(spaces))
    if over:
        _over_channels(node, ctx, x, over, len(reduced) == 1 and bool(keep))
    for axis, ids in spaces.items():
        if axis in mapping:
            ctx.set(node.outputs[0], mapping[axis], ids)


def _over_channels(
    node: ir.Node, ctx: ChannelWalk, x: ir.Value, axes: list[int], one: bool
) -> None:
    """Check a reduction over channel axes and record its fix (see `reduce`)."""
    op = node.op_type
    if op not in (*REDUCE_SUMS, "ReduceMean"):
        raise Unsupported("reduces over channels")
    held = ctx.dead(x)
    if held is None:
        raise Unsupported("reduces over channels whose removed value it cannot tell")
    if not held.zero and (op not in ("ReduceSum", "ReduceMean") or not one):
        raise Unsupported("reduces over channels that hold something other than zero")
    out = node.outputs[0]
    if out.dtype is None or not out.dtype.is_floating_point():
        raise Unsupported("reduces integers over channels")
    if op == "ReduceMean" or not held.zero:
        ctx.fix(ReduceFix(node, tuple(ctx.spaces_of(x)[a] for a in axes), held, op == "ReduceMean"))


def pad_dead(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """Zero padding keeps a removed channel zero; another value or mode does not."""
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    value = node.inputs[2] if len(node.inputs) > 2 else None
    padded = 0.0 if value is None else ctx.const(value)
    fill = float(attr(node, "value", 0.0)) if len(node.inputs) < 2 else padded
    if mode != "constant" or fill is None or np.any(np.asarray(fill) != 0):
        return None
    return keeps_zero(node, ctx)


OPS = (
    *(OpInfo(op, rule=pool, dead=keeps_zero) for op in POOLS),
    OpInfo("Pad", rule=pad, folded_inputs=(1,), dead=pad_dead),
    OpInfo("Resize", rule=resize, folded_inputs=(3,), dead=keeps_zero),
    OpInfo("Upsample", rule=resize, dead=keeps_zero),
    *(
        OpInfo(op, rule=reduce, dead=None if op == "ReduceLogSumExp" else keeps_zero)
        for op in REDUCES
    ),
)
