"""How a channel axis flows through each op: one small rule per op, all in the table `RULES`.

A rule reads its node's inputs' channel spaces from the walk (`channels.Walk`) and says:
- which output axes carry which channels (`carry`, `set`),
- which channels must go together (`union`: residual Adds, grouped Conv, a shared weight),
- which stored tensors are sliced along which axis (`space` on a constant makes a member),
- which attributes or shape constants the rewrite must recompute (`fix`).
A rule that meets a case it does not understand raises `Unsupported`; the walk then freezes every
channel the node touches and reports the reason. Never guess.

Known approximations, by design: LayerNormalization over a pruned axis renormalises over the
channels left (as Torch-Pruning does), so removing an all-zero channel changes its statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxprune.channels.shapemath import entries

if TYPE_CHECKING:
    from onnxprune.channels import Walk


class Unsupported(Exception):
    """The rule cannot follow channels through this node; the message says why."""


Rule = Callable[[ir.Node, "Walk"], None]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _ints(ctx: Walk, node: ir.Node, index: int, attr: str) -> list[int] | None:
    """Integers given as an input constant (newer opsets) or an attribute (older ones)."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = ctx.const(node.inputs[index])
        if array is None:
            raise Unsupported(f"input {index} is computed, not a constant")
        return [int(x) for x in np.asarray(array).reshape(-1)]
    value = _attr(node, attr, None)
    return None if value is None else [int(x) for x in value]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _only_axes(ctx: Walk, value: ir.Value, allowed: set[int], why: str) -> None:
    for axis in ctx.spaces_of(value):
        if axis not in allowed:
            raise Unsupported(f"channels on axis {axis} {why}")


# -- ops that leave the channel axis alone ------------------------------------------------------
def unary(node: ir.Node, ctx: Walk) -> None:
    """Element-wise on one tensor: every output has the input's channels on the same axes."""
    for out in node.outputs:
        if out is not None:
            ctx.carry(node.inputs[0], out)


def constant(node: ir.Node, ctx: Walk) -> None:
    """A Constant's output is a stored tensor: rules that read it slice it."""


def elementwise(node: ir.Node, ctx: Walk) -> None:
    """Broadcasting ops: inputs' channels on aligned axes are the same channels.

    A constant operand with that many entries is sliced with them; one with a single entry
    broadcasts. A computed operand without channels there (a model input) freezes them.
    """
    role = {"Add": "shift", "Sub": "shift", "Mul": "scale", "Div": "scale", "PRelu": "scale"}
    inputs = [v for v in node.inputs if v is not None]
    ranks = [ctx.rank(v) for v in inputs]
    if any(r is None for r in ranks):
        if any(ctx.spaces_of(v) for v in inputs):
            raise Unsupported("an operand has unknown rank")
        return
    rank = max(ranks)  # type: ignore[type-var]
    out = node.outputs[0]
    for k in range(rank):
        aligned = [(v, k - (rank - r)) for v, r in zip(inputs, ranks, strict=True) if k >= rank - r]
        found = [ctx.ids(v, a) for v, a in aligned]
        base = next((ids for ids in found if ids is not None and len(ids) > 1), None)
        if base is None:
            # only one-channel spaces here: they carry on unless another operand broadcasts
            # them out to more entries (that axis of the output is then no channel space)
            base = next((ids for ids in found if ids is not None), None)
            if base is not None and all(ctx.dim(v, a) in (1, None) for v, a in aligned):
                ctx.set(out, k, base)
            continue
        for (v, a), ids in zip(aligned, found, strict=True):
            if ids is None:
                if ctx.dim(v, a) == 1:
                    continue
                ids = ctx.space(v, a, role.get(node.op_type, "param"), node)
            if len(ids) == 1 and len(base) > 1:
                continue  # a one-channel space broadcasts; it is never emptied (min keep 1)
            ctx.union(base, ids)
        ctx.set(out, k, base)


def transpose(node: ir.Node, ctx: Walk) -> None:
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    perm = list(_attr(node, "perm", list(range(rank))[::-1]))
    ctx.carry(node.inputs[0], node.outputs[0], {p: j for j, p in enumerate(perm)})


def squeeze(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    axes = _ints(ctx, node, 1, "axes")
    if axes is None:
        if any(d is None for d in shape):
            raise Unsupported("squeezes unknown dims")
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = {_axis(a, len(shape)) for a in axes}
    kept = [i for i in range(len(shape)) if i not in axes]
    ctx.carry(x, node.outputs[0], {i: j for j, i in enumerate(kept)})


def unsqueeze(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    axes = _ints(ctx, node, 1, "axes")
    if rank is None or axes is None:
        raise Unsupported("unknown rank or axes")
    out_rank = rank + len(axes)
    new = {_axis(a, out_rank) for a in axes}
    old = [j for j in range(out_rank) if j not in new]
    ctx.carry(x, node.outputs[0], dict(enumerate(old)))


# -- producers and consumers --------------------------------------------------------------------
def conv(node: ir.Node, ctx: Walk) -> None:
    """Conv and ConvTranspose. Grouped ones prune whole groups: a group's input and output
    channels become one class, so depthwise Conv ties its input and output channels."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not ctx.is_const(w) or (b is not None and not ctx.is_const(b)):
        raise Unsupported("weight or bias is computed, not stored")
    wshape = ctx.shape(w)
    assert wshape is not None
    groups = int(_attr(node, "group", 1))
    transposed = node.op_type == "ConvTranspose"
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    _only_axes(ctx, x, {1}, "other than 1 would be mixed by a convolution")
    xi = ctx.space(x, 1, "in", node)
    if groups == 1:
        o = ctx.space(w, out_axis, "out", node)
        ctx.union(xi, ctx.space(w, in_axis, "in", node))
    elif transposed:
        # W is [C_in, C_out / groups, ...]: its rows are the input channels, group by group, and
        # its second axis, shared by every group, is never cut. Output channel j belongs to group
        # j // (C_out / groups); a group goes whole: its input rows, outputs and bias entries.
        c = len(xi)
        if c % groups:
            raise Unsupported(f"{c} input channels do not divide into {groups} groups")
        per_group = xi.reshape(groups, c // groups)
        gid = per_group[:, 0]
        ctx.union(per_group.reshape(-1), np.repeat(gid, c // groups))
        ctx.union(xi, ctx.space(w, 0, "in", node))
        o = np.repeat(gid, wshape[1])
        ctx.fix("group", node, ids={"groups": gid})
    else:
        c = len(xi)
        m = wshape[0]
        if c % groups or m % groups:
            raise Unsupported(f"{c} in / {m} out channels do not divide into {groups} groups")
        per_group = xi.reshape(groups, c // groups)
        gid = per_group[:, 0]
        ctx.union(per_group.reshape(-1), np.repeat(gid, c // groups))
        o = ctx.space(w, 0, "out", node)
        ctx.union(o, np.repeat(gid, m // groups))
        ctx.fix("group", node, ids={"groups": gid})
    if b is not None:
        ctx.union(o, ctx.space(b, 0, "bias", node))
    ctx.set(node.outputs[0], 1, o)


def gemm(node: ir.Node, ctx: Walk) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if not ctx.is_const(w) or ctx.is_const(a):
        raise Unsupported("only activation x stored weight is pruned")
    ka = 0 if _attr(node, "transA", 0) else 1
    kw = 1 if _attr(node, "transB", 0) else 0
    o = ctx.space(w, 1 - kw, "out", node)
    ctx.union(ctx.space(a, ka, "in", node), ctx.space(w, kw, "in", node))
    out = node.outputs[0]
    ctx.set(out, 1, o)
    rows = ctx.ids(a, 1 - ka)
    if rows is not None:
        ctx.set(out, 0, rows)
    if c is not None:
        if not ctx.is_const(c):
            raise Unsupported("bias is computed, not stored")
        cshape = ctx.shape(c) or []
        if cshape and cshape[-1] == len(o) and len(o) > 1:
            ctx.union(o, ctx.space(c, len(cshape) - 1, "bias", node))
        if len(cshape) == 2 and cshape[0] != 1:
            raise Unsupported("a full-matrix bias is not pruned")


def matmul(node: ir.Node, ctx: Walk) -> None:
    """x @ W with W stored: W's rows are input channels, its columns output channels. Between two
    computed tensors (attention), the contracted axes are one space and the rest carry over."""
    a, b = node.inputs
    ra, rb = ctx.rank(a), ctx.rank(b)
    out = node.outputs[0]
    ro = ctx.rank(out)
    if ra is None or rb is None or ra < 2 or rb < 2:
        raise Unsupported("unknown or vector rank")
    ro = max(ra, rb) if ro is None else ro
    if ctx.is_const(b) and rb == 2 and not ctx.is_const(a):
        ctx.union(ctx.space(a, ra - 1, "in", node), ctx.space(b, 0, "in", node))
        ctx.set(out, ro - 1, ctx.space(b, 1, "out", node))
        for axis, ids in ctx.spaces_of(a).items():
            if axis < ra - 1:
                ctx.set(out, axis + ro - ra, ids)
        return
    if ctx.is_const(a) or ctx.is_const(b):
        raise Unsupported("a stored left operand or batched stored weight is not pruned")
    ka, kb = ctx.ids(a, ra - 1), ctx.ids(b, rb - 2)
    if ka is not None or kb is not None:
        ctx.union(ctx.space(a, ra - 1, "in", node), ctx.space(b, rb - 2, "in", node))
    rows, cols = ctx.ids(a, ra - 2), ctx.ids(b, rb - 1)
    if rows is not None:
        ctx.set(out, ro - 2, rows)
    if cols is not None:
        ctx.set(out, ro - 1, cols)
    for v, r in ((a, ra), (b, rb)):
        for axis, ids in ctx.spaces_of(v).items():
            if axis < r - 2:
                ctx.set(out, axis + ro - r, ids)


def einsum(node: ir.Node, ctx: Walk) -> None:
    """Each letter is one space: its axes in every operand are linked, and it carries into the
    output when the output names it; a summed letter only links (a zero channel adds nothing)."""
    equation = str(_attr(node, "equation", "")).replace(" ", "")
    if "->" not in equation or "." in equation:
        raise Unsupported(f"equation {equation!r} is implicit or uses an ellipsis")
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(node.inputs) or any(len(set(t)) != len(t) for t in [*terms, rhs]):
        raise Unsupported(f"equation {equation!r} repeats a letter within an operand")
    for letter in dict.fromkeys(lhs.replace(",", "")):
        places = [
            (v, t.index(letter)) for v, t in zip(node.inputs, terms, strict=True) if letter in t
        ]
        if all(ctx.ids(v, a) is None for v, a in places):
            continue
        spaces = [ctx.space(v, a, "in", node) for v, a in places if ctx.dim(v, a) != 1]
        if not spaces:
            continue
        for ids in spaces[1:]:
            ctx.union(spaces[0], ids)
        if letter in rhs:
            ctx.set(node.outputs[0], rhs.index(letter), spaces[0])


# -- carriers with per-channel parameters --------------------------------------------------------
def batchnorm(node: ir.Node, ctx: Walk) -> None:
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Unsupported("training-mode outputs are used")
    x = node.inputs[0]
    c = ctx.space(x, 1, "in", node)
    for value, role in zip(node.inputs[1:5], ("scale", "shift", "shift", "param"), strict=False):
        if value is not None:
            if not ctx.is_const(value):
                raise Unsupported("parameters are computed, not stored")
            ctx.union(c, ctx.space(value, 0, role, node))
    ctx.carry(x, node.outputs[0])


def instancenorm(node: ir.Node, ctx: Walk) -> None:
    x, scale, bias = node.inputs
    _only_axes(ctx, x, {0, 1}, "are normalised over")
    c = ctx.space(x, 1, "in", node)
    ctx.union(c, ctx.space(scale, 0, "scale", node))
    ctx.union(c, ctx.space(bias, 0, "shift", node))
    ctx.carry(x, node.outputs[0])


def layernorm(node: ir.Node, ctx: Walk) -> None:
    """Normalised axes may be pruned (scale and bias sliced); the statistics then cover the
    channels left. See the module docstring."""
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Unsupported("mean / inverse std outputs are used")
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    start = _axis(int(_attr(node, "axis", -1)), rank)
    for axis, ids in ctx.spaces_of(x).items():
        if axis < start:
            continue
        for value, role in zip(node.inputs[1:3], ("scale", "shift"), strict=False):
            if value is None:
                continue
            r = ctx.rank(value) or 0
            k = axis - (rank - r)
            if k >= 0 and ctx.dim(value, k) != 1:
                ctx.union(ids, ctx.space(value, k, role, node))
    ctx.carry(x, node.outputs[0])


def softmax(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    opset = ctx.model.opset_imports.get("", 17)
    axis = _axis(int(_attr(node, "axis", -1 if opset >= 13 else 1)), rank)
    normalised = {axis} if opset >= 13 else set(range(axis, rank))
    if normalised & set(ctx.spaces_of(x)):
        raise Unsupported("normalises over channels")
    ctx.carry(x, node.outputs[0])


def quantize_linear(node: ir.Node, ctx: Walk) -> None:
    """QuantizeLinear and DequantizeLinear between layers (QDQ): element-wise, a zero channel
    stays zero (at the zero point in between). A scale and zero point per index of a channel
    axis are sliced with it; per-tensor ones, or per index of another axis, broadcast. A stored
    weight's DequantizeLinear is left to the layer that reads it (channels.Walk.space)."""
    x = node.inputs[0]
    spaces = ctx.spaces_of(x)
    if not spaces:
        return
    rank = ctx.rank(x)
    shape = ctx.shape(node.inputs[1])
    if rank is None or shape is None:
        raise Unsupported("unknown rank or scale shape")
    if any(d != 1 for d in shape):
        axis = _axis(int(_attr(node, "axis", 1)), rank)
        if len(shape) != 1 or _attr(node, "block_size", 0):
            raise Unsupported("blocked quantization of a tensor with channels")
        if axis in spaces:
            for parameter in node.inputs[1:3]:
                if parameter is not None:
                    ctx.union(spaces[axis], ctx.space(parameter, 0, "param", node))
    ctx.carry(x, node.outputs[0])


# -- placing and cutting channels ----------------------------------------------------------------
def concat(node: ir.Node, ctx: Walk) -> None:
    out = node.outputs[0]
    inputs = [v for v in node.inputs if v is not None]
    rank = ctx.rank(out) or ctx.rank(inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    axis = _axis(int(_attr(node, "axis", 0)), rank)
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


def split(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    axis = _axis(int(_attr(node, "axis", 0)), rank)
    outs = list(node.outputs)
    ids = ctx.ids(x, axis)
    if ids is not None:
        sizes = _ints(ctx, node, 1, "split")
        if sizes is None:
            n = len(ids)
            count = len(outs)
            step = -(-n // count)
            sizes = [min(step, n - i * step) for i in range(count)]
        if sum(sizes) != len(ids):
            raise Unsupported("split sizes do not add up")
        for out, start, size in zip(outs, np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
            ctx.set(out, axis, ids[start : start + size])
        ctx.fix("split", node, axis=axis)
    for out in outs:
        for a, others in ctx.spaces_of(x).items():
            if a != axis:
                ctx.set(out, a, others)


def slice_(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    rank = len(shape)
    axes = _ints(ctx, node, 3, "axes")
    if len(node.inputs) > 2 and not (ctx.is_const(node.inputs[1]) and ctx.is_const(node.inputs[2])):
        # bounds computed from symbolic dims (Swin crops its window padding, x[:, :H, :W]):
        # fine on axes without channels, which then carry over
        if axes is None or {_axis(a, rank) for a in axes} & set(ctx.spaces_of(x)):
            raise Unsupported("computed bounds on a channel axis")
        ctx.carry(x, node.outputs[0])
        return
    starts = _ints(ctx, node, 1, "starts")
    ends = _ints(ctx, node, 2, "ends")
    steps = _ints(ctx, node, 4, "steps")
    if starts is None or ends is None:
        raise Unsupported("no starts/ends")
    axes = [_axis(a, rank) for a in (axes or range(len(starts)))]
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
        ctx.fix("slice", node, ids={"in": ids}, position=j, start=start, end=end)
    for axis, ids in spaces.items():
        ctx.set(out, axis, ids)


def gather(node: ir.Node, ctx: Walk) -> None:
    x, idx = node.inputs
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    if ctx.spaces_of(idx):
        raise Unsupported("indices carry channels")
    axis = _axis(int(_attr(node, "axis", 0)), rank)
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
            ctx.fix("gather", node, ids={"in": ids}, carrier=None)
        else:
            # indices of any rank (exporters write as_strided this way): the channels must vary
            # along one index axis only, which then carries them
            j = _carrier(picked)
            if j is None:
                raise Unsupported("gathers channels into several axes")
            line = picked[tuple(slice(None) if i == j else 0 for i in range(q))]
            ctx.set(out, axis + j, line)
            ctx.fix("gather", node, ids={"in": ids}, carrier=j)
    for a, s in spaces.items():
        ctx.set(out, a if a < axis else a - 1 + q, s)


def _stored_floats(ctx: Walk, value: ir.Value) -> bool:
    return ctx.is_const(value) and value.dtype is not None and value.dtype.is_floating_point()


def _carrier(grid: np.ndarray) -> int | None:
    """The one axis of `grid` along which its values vary (they are constant along the rest)."""
    for j in range(grid.ndim):
        line = grid[tuple(slice(None) if i == j else 0 for i in range(grid.ndim))]
        shaped = [1] * grid.ndim
        shaped[j] = -1
        if np.array_equal(np.broadcast_to(line.reshape(shaped), grid.shape), grid):
            return j
    return None


def flatten(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    axis = _axis(int(_attr(node, "axis", 1)), len(shape))
    out_shape = [_prod(shape[:axis]), _prod(shape[axis:])]
    _reshape_spaces(ctx, x, shape, node.outputs[0], out_shape, [None, None])


def reshape(node: ir.Node, ctx: Walk) -> None:
    """One channel becomes a block of rows when merged with the axes after it; a split channel
    axis keeps its channels on the one output axis that still tells them apart."""
    x = node.inputs[0]
    shape = ctx.named_shape(x)
    if not ctx.spaces_of(x):
        return
    stored = ctx.const(node.inputs[1])
    # a computed target (batch and sequence from Shape ops, as [S*B, E] -> [S, B, E]) is
    # followed entry by entry: None where it depends on the model's symbolic dims
    target = (
        [int(t) for t in np.asarray(stored).reshape(-1)]
        if stored is not None
        else entries(ctx, node.inputs[1])
    )
    if target is None:
        raise Unsupported("computed target shape")
    if shape is None:
        raise Unsupported("unknown input shape")
    out_shape: list[Dim] = []
    for i, t in enumerate(target):
        if t == 0 and not _attr(node, "allowzero", 0):
            out_shape.append(shape[i] if i < len(shape) else None)
        else:
            out_shape.append(None if t is None or t == -1 else t)
    if -1 in target:
        known = [d for k, d in enumerate(out_shape) if k != target.index(-1)]
        if all(isinstance(d, int) for d in shape + known):
            out_shape[target.index(-1)] = _prod(shape) // max(1, _prod(known) or 1)  # type: ignore[operator]
    inferred = ctx.named_shape(node.outputs[0])
    if inferred is not None and len(inferred) == len(out_shape):
        out_shape = [o if o is not None else d for d, o in zip(inferred, out_shape, strict=True)]
    moved = _reshape_spaces(ctx, x, shape, node.outputs[0], out_shape, target, node)
    if stored is None and any(ctx.concat_piece(node.inputs[1], a) is None for a in moved):
        raise Unsupported("computed target shape names the channel count")
    if moved:
        ctx.fix("reshape", node, axes=moved)


# A dim: its size, the name of a symbolic dim (equal names are equal sizes), or None (unknown).
Dim = int | str | None


def _prod(dims: list[Dim]) -> int | None:
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def _reshape_spaces(
    ctx: Walk,
    x: ir.Value,
    shape: list[Dim],
    out: ir.Value,
    out_shape: list[Dim],
    target: list[int | None],
    node: ir.Node | None = None,
) -> list[int]:
    """Map x's spaces through a reshape; returns the output axes whose literal size must change."""
    groups = _align(shape, out_shape)
    if groups is None:
        raise Unsupported(f"cannot align shapes {shape} and {out_shape}")
    spaces = ctx.spaces_of(x)
    moved = []
    for ins, outs in groups:
        here = [a for a in ins if a in spaces]
        if not here:
            continue
        if len(here) > 1:
            raise Unsupported("merges two channel axes")
        if ins == outs == [here[0]] or (len(ins) == 1 and len(outs) == 1):
            ctx.set(out, outs[0], spaces[here[0]])
            if isinstance(shape[ins[0]], int) and target[outs[0]] not in (0, -1, None):
                moved.append(outs[0])
            continue
        dims = [shape[a] for a in ins]
        odims = [out_shape[a] for a in outs]
        if not all(isinstance(d, int) for d in dims + odims):
            raise Unsupported("channel axis reshaped with unknown sizes")
        view = [1] * len(ins)
        view[ins.index(here[0])] = -1
        grid = np.broadcast_to(spaces[here[0]].reshape(view), dims).reshape(odims)
        found = _carrier(grid)
        j = found if found is not None else len(odims) - 1 - int(np.argmax(odims[::-1]))
        if found is None and ctx.heads:
            # attention heads as classes: the axis that becomes a batch axis of the attention's
            # MatMuls is the heads axis ((heads, head_dim), or (3, heads, head_dim) for a packed
            # projection); coupling along the others makes each head one class
            batched = [
                k for k in range(len(outs)) if odims[k] > 1 and _batched(ctx, out, outs[k], 0)
            ]
            if batched:
                j = batched[0]
                if node is not None:
                    line = grid[tuple(slice(None) if i == j else 0 for i in range(len(outs)))]
                    ctx.head_split(node, line, _prod(odims[j + 1 :]) or 1)
        line = grid[tuple(slice(None) if i == j else 0 for i in range(len(outs)))]
        if found is None:
            # A channel axis split over several axes (channel shuffle's (groups, C/groups),
            # attention's (heads, head_dim)): keep the largest (with heads=True, the heads) as
            # the channel axis and couple the channels along the others, so pruning index d
            # removes it in every group or head alike (or a head whole). Only coupling is
            # added, so this is conservative, never a guess.
            shaped = [1] * len(outs)
            shaped[j] = -1
            spread = np.broadcast_to(line.reshape(shaped), grid.shape)
            ctx.union(grid.reshape(-1), spread.reshape(-1))
        ctx.set(out, outs[j], line)
        if target[outs[j]] not in (0, -1, None):
            moved.append(outs[j])
    return moved


def _align(a: list[Dim], b: list[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of axes with equal products. A symbolic dim pairs with the same one; unknown
    dims pair one-to-one where the known dims after them multiply to the same on both sides;
    trailing 1s join the last run. Failing that, the static dims at the end pair up and the
    leading rest, unknown sizes and all, is one run ([S, B, 12, 64] -> [S*B, 768])."""
    groups = _align_from_left(a, b)
    if groups is not None:
        return groups
    for p in range(len(a), 0, -1):
        tail = a[len(a) - p :]
        size = _prod(tail)
        if size is None:
            continue
        for q in range(1, len(b) + 1):
            if _prod(b[len(b) - q :]) == size:
                break
        else:
            continue
        if (p == len(a)) != (q == len(b)):
            continue
        rest = _align_from_left(tail, b[len(b) - q :])
        if rest is None:
            continue
        head = [(list(range(len(a) - p)), list(range(len(b) - q)))] if p < len(a) else []
        shift = [
            ([i + len(a) - p for i in ins], [j + len(b) - q for j in outs]) for ins, outs in rest
        ]
        return head + shift
    return None


def _align_from_left(a: list[Dim], b: list[Dim]) -> list[tuple[list[int], list[int]]] | None:
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if isinstance(a[i], str) and a[i] == b[j]:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if not isinstance(a[i], int) or not isinstance(b[j], int):
            if isinstance(a[i], int) or isinstance(b[j], int):
                return None
            rest_a, rest_b = _prod(a[i + 1 :]), _prod(b[j + 1 :])
            if rest_a is None or rest_a != rest_b:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:  # type: ignore[operator]
                if i >= len(a) or not isinstance(a[i], int):
                    return None
                pa *= a[i]  # type: ignore[operator]
                ins.append(i)
                i += 1
            else:
                if j >= len(b) or not isinstance(b[j], int):
                    return None
                pb *= b[j]  # type: ignore[operator]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    if any(d != 1 for d in a[i:]) or any(d != 1 for d in b[j:]):
        return None
    if groups:
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    return groups


def _batched(ctx: Walk, value: ir.Value, axis: int, hops: int, seen: set | None = None) -> bool:
    """Whether `value`'s axis, followed forward through the ops that move axes about, becomes a
    batch axis of a MatMul (or Einsum) between two computed tensors: an attention's heads."""
    seen = set() if seen is None else seen
    if hops > 24 or (value, axis) in seen:
        return False
    seen.add((value, axis))
    for use in value.uses():
        user = use.node
        if user.domain not in ("", "ai.onnx") or not user.outputs:
            continue
        op = user.op_type
        if op == "MatMul":
            if any(ctx.is_const(v) for v in user.inputs):
                continue
            rank = ctx.rank(value)
            if rank is not None and axis < rank - 2:
                return True
            continue
        if op == "Einsum":
            equation = str(_attr(user, "equation", "")).replace(" ", "")
            if "->" not in equation or "." in equation:
                continue
            lhs, rhs = equation.split("->")
            terms = lhs.split(",")
            if use.idx < len(terms) and axis < len(terms[use.idx]):
                letter = terms[use.idx][axis]
                if letter in rhs and all(letter in t for t in terms):
                    return True
            continue
        mapped = _forward_axis(ctx, user, use.idx, value, axis)
        if mapped is not None and _batched(ctx, user.outputs[0], mapped, hops + 1, seen):
            return True
    return False


_SAME_AXES = ("Softmax", "LogSoftmax", "Slice", "Split", "Concat", "Pad")


def _forward_axis(ctx: Walk, node: ir.Node, index: int, value: ir.Value, axis: int) -> int | None:
    """The axis of node's (first) output that input `index`'s axis becomes, if it stays one."""
    op = node.op_type
    rank = ctx.rank(value)
    if rank is None:
        return None
    if op in UNARY or op in _SAME_AXES:
        return axis if index == 0 or op == "Concat" else None
    if op in BINARY:
        out_rank = ctx.rank(node.outputs[0])
        return None if out_rank is None else axis + out_rank - rank
    if op == "Transpose":
        perm = list(_attr(node, "perm", list(range(rank))[::-1]))
        return perm.index(axis)
    if op == "Gather" and index == 0:
        gathered = _axis(int(_attr(node, "axis", 0)), rank)
        q = ctx.rank(node.inputs[1])
        if axis == gathered or q is None:
            return None
        return axis if axis < gathered else axis - 1 + q
    if op == "Reshape" and index == 0:  # only where the axis stays whole, 1s added or dropped
        shape, out_shape = ctx.named_shape(value), ctx.named_shape(node.outputs[0])
        groups = None if shape is None or out_shape is None else _align(shape, out_shape)
        for ins, outs in groups or []:
            if axis in ins:
                sized = [k for k in outs if out_shape[k] != 1]  # type: ignore[index]
                whole = [k for k in ins if shape[k] != 1] == [axis]  # type: ignore[index]
                return sized[0] if whole and len(sized) == 1 else None
        return None
    if op in ("Squeeze", "Unsqueeze") and index == 0:
        axes = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else _attr(node, "axes", None)
        if axes is None:
            return None
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
        if op == "Squeeze":
            axes = [_axis(a, rank) for a in axes]
            return None if axis in axes else axis - sum(a < axis for a in axes)
        out_rank = rank + len(axes)
        new = {_axis(a, out_rank) for a in axes}
        return [k for k in range(out_rank) if k not in new][axis]
    return None


def expand(node: ir.Node, ctx: Walk) -> None:
    """Channels of the input stay on their (right-aligned) axes. A stored input (a class token)
    gets its channels here, so that what it meets later slices it. A target entry of 1 keeps
    the input's size; one equal to it is rewritten, which needs the target stored."""
    x, shape_input = node.inputs
    rank = ctx.rank(x)
    stored = ctx.const(shape_input)
    if stored is not None:
        target = [int(t) for t in np.asarray(stored).reshape(-1)]
    else:  # computed: entries that differ with the model's symbolic dims are unknown (None)
        target = entries(ctx, shape_input)
        if target is None:
            if ctx.spaces_of(x):
                raise Unsupported("computed target shape")
            return
    if rank is None:
        raise Unsupported("unknown rank")
    out_rank = max(rank, len(target))
    moved = []
    for axis in range(rank):
        ids = ctx.ids(x, axis)
        if ids is None and ctx.is_const(x) and (ctx.dim(x, axis) or 1) > 1:
            ids = ctx.space(x, axis, "shift", node)
        if ids is None:
            continue
        j = axis + out_rank - rank
        entry = target[j - (out_rank - len(target))] if j >= out_rank - len(target) else 1
        if entry != 1:
            if stored is None or entry is None:
                raise Unsupported("computed target shape names the channel count")
            moved.append(j)
        ctx.set(node.outputs[0], j, ids)
    if moved:
        ctx.fix("expand", node, axes=moved)


# -- spatial ops ---------------------------------------------------------------------------------
def pool(node: ir.Node, ctx: Walk) -> None:
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise Unsupported("its indices output counts channels")
    _only_axes(ctx, node.inputs[0], {0, 1}, "are pooled over")
    ctx.carry(node.inputs[0], node.outputs[0])


def pad(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    pads = _ints(ctx, node, 1, "pads")
    if rank is None or pads is None:
        raise Unsupported("unknown pads")
    axes = _ints(ctx, node, 3, "axes") or list(range(rank))
    axes = [_axis(a, rank) for a in axes]
    for j, axis in enumerate(axes):
        if axis in ctx.spaces_of(x) and (pads[j] or pads[j + len(axes)]):
            raise Unsupported("pads the channel axis")
    ctx.carry(x, node.outputs[0])


def resize(node: ir.Node, ctx: Walk) -> None:
    x = node.inputs[0]
    spaces = ctx.spaces_of(x)
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    opset = ctx.model.opset_imports.get("", 17)
    scale_index = 1 if node.op_type == "Upsample" or opset < 11 else 2
    scales = _ints_float(ctx, node, scale_index, "scales")
    sizes = _ints(ctx, node, 3, "sizes") if node.op_type == "Resize" and opset >= 11 else None
    axes = _attr(node, "axes", None)
    axes = [_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    for axis in spaces:
        if axis not in axes:
            continue
        j = axes.index(axis)
        if scales and scales[j] != 1.0:
            raise Unsupported("resizes the channel axis")
        if sizes and sizes[j] != ctx.dim(x, axis):
            raise Unsupported("resizes the channel axis")
    if sizes and spaces:
        ctx.fix("sizes", node, entries=[(axes.index(a), a) for a in spaces if a in axes])
    ctx.carry(x, node.outputs[0])


def _ints_float(ctx: Walk, node: ir.Node, index: int, attr: str) -> list[float] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = ctx.const(node.inputs[index])
        if array is None:
            raise Unsupported(f"input {index} is computed, not a constant")
        return [float(v) for v in np.asarray(array).reshape(-1)]
    value = _attr(node, attr, None)
    return None if value is None else [float(v) for v in value]


REDUCE_SUMS = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")


def reduce(node: ir.Node, ctx: Walk) -> None:
    """Reducing other axes keeps channels. Summing over channels drops them (a zero adds
    nothing); a mean or max over channels depends on their count and freezes."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    axes = _ints(ctx, node, 1, "axes")
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            ctx.carry(x, node.outputs[0])
            return
        axes = list(range(rank))
    reduced = {_axis(a, rank) for a in axes}
    keep = _attr(node, "keepdims", 1)
    mapping = {}
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            out_axis += 1 if keep else 0
            continue
        mapping[axis] = out_axis
        out_axis += 1
    if reduced & set(ctx.spaces_of(x)) and node.op_type not in REDUCE_SUMS:
        raise Unsupported("reduces over channels")
    ctx.carry(x, node.outputs[0], {a: mapping[a] for a in ctx.spaces_of(x) if a in mapping})


def shape_op(node: ir.Node, ctx: Walk) -> None:
    """Shape reads the channel count of the axes it covers: those channels are frozen. (Reshape
    targets computed from Shape ops are folded to constants before the walk: channels.prepare.)"""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    start = _axis(int(_attr(node, "start", 0)), rank)
    end = _axis(int(_attr(node, "end", rank)), rank)
    read: set[int] = set()
    for use in node.outputs[0].uses():
        read |= {start + i for i in _entries_read(ctx, use.node, end - start)}
    if node.outputs[0].is_graph_output():
        read |= set(range(start, end))
    for axis, ids in ctx.spaces_of(x).items():
        if axis in read:
            ctx.freeze(ids, f"Shape {node.name!r} reads the channel count")


def _entries_read(ctx: Walk, user: ir.Node, n: int) -> set[int]:
    """Which entries of an n-long shape vector a node reads: a Gather or Slice with constant
    indices reads only those (the batch size, say); anything else reads them all."""
    everything = set(range(n))
    if user.op_type == "Gather" and int(_attr(user, "axis", 0)) == 0:
        indices = ctx.const(user.inputs[1])
        if indices is not None:
            return {int(i) % n for i in np.asarray(indices).reshape(-1)} if n else set()
    if user.op_type == "Slice" and len(user.inputs) >= 3:
        bounds = [ctx.const(v) for v in user.inputs[1:]]
        if all(b is not None for b in bounds):
            starts, ends = (int(np.asarray(b).reshape(-1)[0]) for b in bounds[:2])
            steps = int(np.asarray(bounds[3]).reshape(-1)[0]) if len(bounds) > 3 else 1
            return set(range(n)[slice(starts, ends, steps)])
    return everything


UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip", "Exp", "Log", "Sqrt",
    "Reciprocal", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Identity", "Cast",
    "CastLike", "Dropout", "Not", "IsNaN", "IsInf", "Swish",
)  # fmt: skip
BINARY = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
)  # fmt: skip

RULES: dict[str, Rule] = {
    **dict.fromkeys(UNARY, unary),
    **dict.fromkeys(BINARY, elementwise),
    "Constant": constant,
    "Conv": conv,
    "ConvTranspose": conv,
    "Gemm": gemm,
    "MatMul": matmul,
    "Einsum": einsum,
    "BatchNormalization": batchnorm,
    "InstanceNormalization": instancenorm,
    "LayerNormalization": layernorm,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": quantize_linear,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "Flatten": flatten,
    "Reshape": reshape,
    "Expand": expand,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    **dict.fromkeys(
        ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"),
        pool,
    ),
    "Pad": pad,
    "Resize": resize,
    "Upsample": resize,
    **dict.fromkeys(
        ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSumExp", *REDUCE_SUMS),
        reduce,
    ),
    "Shape": shape_op,
}
