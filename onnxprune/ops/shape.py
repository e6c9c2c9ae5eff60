"""Shape ops: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Expand, Tile, Shape, Constant and
Range.

What the family shares: they rearrange axes (or read them) without touching values, so channels
follow the axes they are on. A reshape that splits a channel axis keeps the channels on the one
output axis that still tells them apart (coupling the others); one that merges it with the axes
after it turns each channel into a block of rows. Shape reads channel counts: what it covers is
frozen, unless the counts it gives are only used as a Reshape target folded before the walk.
Reshape and Expand targets that name a channel count are rewritten after removal (fixes), and
their dims, with Range's, are what shape folding propagates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.core.graphs import concat_piece
from onnxprune.core.tensors import const_tensor
from onnxprune.ops.base import (
    AxisMap,
    ChannelWalk,
    Constants,
    Dead,
    Fix,
    Kept,
    OpInfo,
    RunDims,
    Unsupported,
    attr,
    broadcast_dims,
    carrier,
    const_ints,
    positive_axis,
    stored_ints,
)
from onnxprune.ops.dead import fresh_name, keeps_zero, reroute
from onnxprune.ops.elementwise import BINARY, UNARY


# -- fixes -----------------------------------------------------------------------------------------
@dataclass(eq=False)
class TargetFix(Fix):
    """A target shape (Reshape's, Expand's) whose literal dims on channel axes get the count
    kept. A computed target has its channel counts stored in pieces of the Concat that makes it
    (`concat_piece`)."""

    axes: tuple[int, ...]  # output axes whose target entry counts channels
    ids: tuple[np.ndarray, ...]  # the channels on each
    align = False  # Expand aligns its target to the right and leaves 1s (broadcast) alone

    def apply(self, kept: Kept, consts: Constants) -> None:
        node = self.node
        count = {axis: kept.kept_of(ids) for axis, ids in zip(self.axes, self.ids, strict=True)}
        out = node.outputs[0]
        if const_tensor(node.inputs[1]) is None:
            target = _own_target(node)
            length = target.shape[0] if target.shape is not None else None
            rank = len(out.shape) if out.shape is not None else length
            for axis in self.axes:
                position = axis - (rank - length) if self.align and rank and length else axis
                found = concat_piece(target, position)
                assert found is not None, f"{node.name}: target entry {axis} is not stored"
                concat, piece, entry = found
                array = stored_ints(concat, piece)
                array[entry] = count[axis]
                consts.replace(concat, piece, array)
            return
        array = stored_ints(node, 1)
        rank = len(out.shape) if out.shape is not None else len(array)
        for axis in self.axes:
            position = axis - (rank - len(array)) if self.align else axis
            if 0 <= position < len(array) and array[position] > (1 if self.align else 0):
                array[position] = count[axis]
        consts.replace(node, 1, array)


def _own_target(node: ir.Node) -> ir.Value:
    """The node's computed target, made its own: a Concat that other nodes read too (exporters
    share one target between layers whose counts may differ) is copied for this node."""
    target = node.inputs[1]
    concat = target.producer()
    graph = node.graph
    if len(target.uses()) == 1 or concat is None or graph is None:
        return target
    attributes = [ir.Attr(a.name, a.type, a.value) for a in concat.attributes.values()]
    name = fresh_name(graph, f"{concat.name or 'Concat'}_for_{node.name or node.op_type}")
    copy = ir.Node(concat.domain, "Concat", list(concat.inputs), attributes, name=name)
    copy.outputs[0].type = target.type
    copy.outputs[0].shape = target.shape
    graph.insert_before(node, copy)
    node.replace_input_with(1, copy.outputs[0])
    return copy.outputs[0]


@dataclass(eq=False)
class RepeatFix(Fix):
    """GQA's key/value heads repeated for the query heads (Expand or Tile, then a Reshape that
    merges the copies): the repeat stays uniform over the key/value heads kept (the targets
    count them: ReshapeFix, ExpandFix), and a Gather after it keeps the copies of the query
    heads kept, so query heads can go one by one inside a group."""

    axis: int  # the merged (query heads) axis of the Reshape's output
    parents: np.ndarray  # the key/value head each copy repeats
    heads: np.ndarray  # the query head each copy serves
    kind = "repeat"

    def apply(self, kept: Kept, consts: Constants) -> None:
        node, out = self.node, self.node.outputs[0]
        graph = node.graph
        copied = ~kept.removed[self.parents]
        picked = np.flatnonzero(~kept.removed[self.heads][copied])
        if graph is None or len(picked) == int(copied.sum()):
            return
        name = fresh_name(graph, f"{node.name or 'Reshape'}_query_heads")
        gather = ir.Node("", "Gather", [out, None], [ir.AttrInt64("axis", self.axis)], name=name)
        consts.replace(gather, 1, picked.astype(np.int64))
        graph.insert_after(node, gather)
        reroute(graph, out, gather.outputs[0], {gather})
        out.shape = None  # the copies of the kept key/value heads: shape inference tells


@dataclass(eq=False)
class ReshapeFix(TargetFix):
    kind = "reshape"


@dataclass(eq=False)
class ExpandFix(TargetFix):
    kind = "expand"
    align = True


# -- channels --------------------------------------------------------------------------------------
def constant(node: ir.Node, ctx: ChannelWalk) -> None:
    """A Constant's output is a stored tensor: rules that read it slice it."""


def transpose(node: ir.Node, ctx: ChannelWalk) -> None:
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        raise Unsupported("unknown rank")
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    ctx.carry(node.inputs[0], node.outputs[0], {p: j for j, p in enumerate(perm)})


def squeeze(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    axes = const_ints(ctx, node, 1, "axes")
    if axes is None:
        if any(d is None for d in shape):
            raise Unsupported("squeezes unknown dims")
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = {positive_axis(a, len(shape)) for a in axes}
    kept = [i for i in range(len(shape)) if i not in axes]
    ctx.carry(x, node.outputs[0], {i: j for j, i in enumerate(kept)})


def unsqueeze(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    axes = const_ints(ctx, node, 1, "axes")
    if rank is None or axes is None:
        raise Unsupported("unknown rank or axes")
    out_rank = rank + len(axes)
    new = {positive_axis(a, out_rank) for a in axes}
    old = [j for j in range(out_rank) if j not in new]
    ctx.carry(x, node.outputs[0], dict(enumerate(old)))


def flatten(node: ir.Node, ctx: ChannelWalk) -> None:
    x = node.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise Unsupported("unknown rank")
    axis = positive_axis(int(attr(node, "axis", 1)), len(shape))
    out_shape = [_prod(shape[:axis]), _prod(shape[axis:])]
    _reshape_spaces(ctx, x, shape, node.outputs[0], out_shape, [None, None])


def reshape(node: ir.Node, ctx: ChannelWalk) -> None:
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
        else ctx.entries(node.inputs[1])
    )
    if target is None:
        raise Unsupported("computed target shape")
    if shape is None:
        raise Unsupported("unknown input shape")
    out_shape: list[Dim] = []
    for i, t in enumerate(target):
        if t == 0 and not attr(node, "allowzero", 0):
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
    if stored is None and any(concat_piece(node.inputs[1], a) is None for a in moved):
        raise Unsupported("computed target shape names the channel count")
    if moved:
        ctx.fix(ReshapeFix(node, tuple(moved), tuple(moved.values())))


Dim = int | str | None


def _prod(dims: list[Dim]) -> int | None:
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def _reshape_spaces(
    ctx: ChannelWalk,
    x: ir.Value,
    shape: list[Dim],
    out: ir.Value,
    out_shape: list[Dim],
    target: list[int | None],
    node: ir.Node | None = None,
) -> dict[int, np.ndarray]:
    """Map x's spaces through a reshape; returns the output axes whose literal size must change,
    with the channels each carries."""
    groups = _align(shape, out_shape)
    if groups is None:
        raise Unsupported(f"cannot align shapes {shape} and {out_shape}")
    spaces = ctx.spaces_of(x)
    moved: dict[int, np.ndarray] = {}
    for ins, outs in groups:
        here = [a for a in ins if a in spaces]
        if not here:
            continue
        if len(here) > 1:
            raise Unsupported("merges two channel axes")
        if ins == outs == [here[0]] or (len(ins) == 1 and len(outs) == 1):
            ctx.set(out, outs[0], spaces[here[0]])
            if isinstance(shape[ins[0]], int) and target[outs[0]] not in (0, -1, None):
                moved[outs[0]] = spaces[here[0]]
            continue
        dims = [shape[a] for a in ins]
        odims = [out_shape[a] for a in outs]
        if not all(isinstance(d, int) for d in dims + odims):
            raise Unsupported("channel axis reshaped with unknown sizes")
        view = [1] * len(ins)
        view[ins.index(here[0])] = -1
        grid = np.broadcast_to(spaces[here[0]].reshape(view), dims).reshape(odims)
        if node is not None and _repeats_heads(ctx, x, ins, here[0], out, outs):
            copies = ctx.new(grid.size)
            ctx.depend(grid.reshape(-1), copies)
            ctx.set(out, outs[0], copies)
            if target[outs[0]] not in (0, -1, None):
                moved[outs[0]] = grid.reshape(-1)  # the count of copies made: kept kv heads x n
            ctx.fix(RepeatFix(node, outs[0], grid.reshape(-1), copies))
            continue
        found = carrier(grid)
        j = found if found is not None else len(odims) - 1 - int(np.argmax(odims[::-1]))
        couple = found is None
        single = found is not None and found > 0 and odims[found - 1] == 1
        if ctx.heads and (found is None or single):
            # attention heads as classes: the axis that becomes a batch axis of the attention's
            # MatMuls is the heads axis ((heads, head_dim), or (3, heads, head_dim) for a packed
            # projection); coupling along the others makes each head one class. A single head
            # (multi-query attention's key/value head, [1, head_dim]) is one class too, where
            # head_dim is no batch axis itself (not [1, heads] adding a batch of 1).
            if single and _batched(ctx, out, outs[found], 0):  # type: ignore[index]
                candidates = []
            elif single:
                candidates = [found - 1]  # type: ignore[operator]
            else:
                candidates = [k for k in range(len(outs)) if odims[k] > 1]
            batched = [k for k in candidates if _batched(ctx, out, outs[k], 0)]
            if batched:
                j, couple = batched[0], True
                if node is not None:
                    line = grid[tuple(slice(None) if i == j else 0 for i in range(len(outs)))]
                    ctx.head_split(node, line, _prod(odims[j + 1 :]) or 1)
        line = grid[tuple(slice(None) if i == j else 0 for i in range(len(outs)))]
        if couple:
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
            moved[outs[j]] = line
    return moved


def _repeats_heads(
    ctx: ChannelWalk, x: ir.Value, ins: list[int], here: int, out: ir.Value, outs: list[int]
) -> bool:
    """Whether a Reshape merges attention heads with copies of them into the heads of an
    attention (--heads): GQA's key/value heads, repeated by an Expand or a Tile along a new
    axis for the query heads that read them. Each copy is then a channel of its own."""
    if not ctx.heads or len(outs) != 1 or not _batched(ctx, out, outs[0], 0):
        return False
    node = x.producer()
    if node is None or node.op_type not in ("Expand", "Tile") or node.domain not in ("", "ai.onnx"):
        return False
    source = node.inputs[0]
    rank, out_rank = ctx.rank(source), ctx.rank(x)
    if rank is None or out_rank is None:
        return False
    copied = [
        a for a in ins if a != here and a - (out_rank - rank) >= 0 and (ctx.dim(x, a) or 1) > 1
    ]
    return bool(copied) and all(ctx.dim(source, a - (out_rank - rank)) == 1 for a in copied)


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


def _batched(
    ctx: ChannelWalk, value: ir.Value, axis: int, hops: int, seen: set | None = None
) -> bool:
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
            equation = str(attr(user, "equation", "")).replace(" ", "")
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


def _forward_axis(
    ctx: ChannelWalk, node: ir.Node, index: int, value: ir.Value, axis: int
) -> int | None:
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
        perm = list(attr(node, "perm", list(range(rank))[::-1]))
        return perm.index(axis)
    if op == "Gather" and index == 0:
        gathered = positive_axis(int(attr(node, "axis", 0)), rank)
        q = ctx.rank(node.inputs[1])
        if axis == gathered or q is None:
            return None
        return axis if axis < gathered else axis - 1 + q
    if op == "Reshape" and index == 0:
        # where the axis stays whole (1s added or dropped) or is merged with others into one
        # (GQA's [kv_heads, repeats] -> query heads), not where it is split
        shape, out_shape = ctx.named_shape(value), ctx.named_shape(node.outputs[0])
        groups = None if shape is None or out_shape is None else _align(shape, out_shape)
        for ins, outs in groups or []:
            if axis in ins:
                sized = [k for k in outs if out_shape[k] != 1]  # type: ignore[index]
                return sized[0] if len(sized) == 1 else None
        return None
    if op in ("Expand", "Tile") and index == 0:
        out_rank = ctx.rank(node.outputs[0])
        return None if out_rank is None else axis + out_rank - rank
    if op in ("Squeeze", "Unsqueeze") and index == 0:
        axes = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes", None)
        if axes is None:
            return None
        axes = [int(a) for a in np.asarray(axes).reshape(-1)]
        if op == "Squeeze":
            axes = [positive_axis(a, rank) for a in axes]
            return None if axis in axes else axis - sum(a < axis for a in axes)
        out_rank = rank + len(axes)
        new = {positive_axis(a, out_rank) for a in axes}
        return [k for k in range(out_rank) if k not in new][axis]
    return None


def expand(node: ir.Node, ctx: ChannelWalk) -> None:
    """Channels of the input stay on their (right-aligned) axes. A stored input (a class token)
    gets its channels here, so that what it meets later slices it. A target entry of 1 keeps
    the input's size; one equal to it is rewritten, which needs it stored (a constant target,
    or a stored piece of the Concat that computes it). An axis the input broadcasts over that
    the walk has given channels (`Walk` seeds it where a LayerNorm's mean, expanded to the
    width, meets the channels) has its entry rewritten alike."""
    x, shape_input = node.inputs
    rank = ctx.rank(x)
    stored = ctx.const(shape_input)
    if stored is not None:
        target = [int(t) for t in np.asarray(stored).reshape(-1)]
    else:  # computed: entries that differ with the model's symbolic dims are unknown (None)
        target = ctx.entries(shape_input)
        if target is None:
            if ctx.spaces_of(x) or ctx.spaces_of(node.outputs[0]):
                raise Unsupported("computed target shape")
            return
    if rank is None:
        raise Unsupported("unknown rank")
    out_rank = max(rank, len(target))
    moved: dict[int, np.ndarray] = {}

    def entry_of(j: int) -> int | None:
        return target[j - (out_rank - len(target))] if j >= out_rank - len(target) else 1

    def rewritable(j: int) -> bool:
        position = j - (out_rank - len(target))
        return stored is not None or concat_piece(shape_input, position) is not None

    carried = set()
    for axis in range(rank):
        ids = ctx.ids(x, axis)
        if ids is None and ctx.is_const(x) and (ctx.dim(x, axis) or 1) > 1:
            ids = ctx.space(x, axis, "shift", node)
        if ids is None:
            continue
        j = axis + out_rank - rank
        carried.add(j)
        entry = entry_of(j)
        if entry != 1:
            if entry is None or not rewritable(j):
                raise Unsupported("computed target shape names the channel count")
            moved[j] = ids
        ctx.set(node.outputs[0], j, ids)
    for j, ids in ctx.spaces_of(node.outputs[0]).items():
        if j in carried or (j >= out_rank - rank and ctx.dim(x, j - (out_rank - rank)) != 1):
            continue
        if entry_of(j) in (None, 1) or not rewritable(j):  # a seeded broadcast axis
            raise Unsupported("computed target shape names the channel count")
        moved[j] = ids
    if moved:
        ctx.fix(ExpandFix(node, tuple(moved), tuple(moved.values())))


def expand_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    """The input axis an output axis copies, or none where the input broadcasts along it."""
    x = node.inputs[0]
    rank, out_rank = ctx.rank(x), ctx.rank(node.outputs[0])
    if rank is None or out_rank is None:
        return None
    k = axis - (out_rank - rank)
    return [(0, k)] if k >= 0 and ctx.dim(x, k) != 1 else []


def tile(node: ir.Node, ctx: ChannelWalk) -> None:
    """Tile repeats an axis whole: its channels repeat with it ([c0, c1, c0, c1]), so a
    removed channel goes from every copy and the repeat counts stay (GQA's key/value heads
    repeated for the query heads)."""
    x = node.inputs[0]
    repeats = const_ints(ctx, node, 1, "repeats")
    if repeats is None:
        raise Unsupported("computed repeats")
    for axis, ids in ctx.spaces_of(x).items():
        if axis >= len(repeats):
            raise Unsupported("repeats shorter than the rank")
        ctx.set(node.outputs[0], axis, np.tile(ids, max(1, repeats[axis])))


def positions(node: ir.Node, ctx: ChannelWalk) -> None:
    """Range makes positions from scalars: no channel flows through it."""


def transpose_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    rank = ctx.rank(node.inputs[0])
    if rank is None:
        return None
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    return [(0, int(perm[axis]))]


def squeeze_sources(node: ir.Node, axis: int, ctx: ChannelWalk) -> list[tuple[int, int]] | None:
    """The input axis an (Un)Squeeze output axis is."""
    rank = ctx.rank(node.inputs[0])
    out_rank = ctx.rank(node.outputs[0])
    axes = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes", None)
    if rank is None or out_rank is None or axes is None:
        return None
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if node.op_type == "Unsqueeze":
        new = {positive_axis(a, out_rank) for a in axes}
        if axis in new:
            return None
        return [(0, [k for k in range(out_rank) if k not in new].index(axis))]
    gone = {positive_axis(a, rank) for a in axes}
    return [(0, [k for k in range(rank) if k not in gone][axis])]


def expand_dead(node: ir.Node, ctx: ChannelWalk) -> Dead | None:
    """What the input holds, broadcast: a tensor without the channel (a mean broadcast over
    the channel axis) is that tensor in every channel, removed ones included."""
    return ctx.dead(node.inputs[0])


def shape_op(node: ir.Node, ctx: ChannelWalk) -> None:
    """Shape reads the channel count of the axes it covers: those channels are frozen. (Reshape
    targets computed from Shape ops are folded to constants before the walk: channels.prepare.)"""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise Unsupported("unknown rank")
    start = positive_axis(int(attr(node, "start", 0)), rank)
    end = positive_axis(int(attr(node, "end", rank)), rank)
    read: set[int] = set()
    for use in node.outputs[0].uses():
        read |= {start + i for i in _entries_read(ctx, use.node, end - start)}
    if node.outputs[0].is_graph_output():
        read |= set(range(start, end))
    for axis, ids in ctx.spaces_of(x).items():
        if axis in read:
            ctx.freeze(ids, f"Shape {node.name!r} reads the channel count")


def _entries_read(ctx: ChannelWalk, user: ir.Node, n: int) -> set[int]:
    """Which entries of an n-long shape vector a node reads: a Gather or Slice with constant
    indices reads only those (the batch size, say); anything else reads them all."""
    everything = set(range(n))
    if user.op_type == "Gather" and int(attr(user, "axis", 0)) == 0:
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


# -- output dims for shape folding -----------------------------------------------------------------
def resolve_target(x: list[int], target: list[int], allowzero: bool) -> list[int]:
    """A Reshape's output dims from its input dims and target (0 copies, -1 is the rest)."""
    out = [x[i] if t == 0 and not allowzero and i < len(x) else t for i, t in enumerate(target)]
    if out.count(-1) == 1:
        known = int(np.prod([t for t in out if t != -1], dtype=np.int64))
        out[out.index(-1)] = int(np.prod(x, dtype=np.int64)) // max(1, known)
    return out


def transpose_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    perm = attr(node, "perm", None)
    perm = list(range(len(x)))[::-1] if perm is None else [int(p) for p in perm]
    return [x[p] for p in perm] if len(perm) == len(x) else None


def target_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    """Reshape's and Expand's output dims, from a target computed in this run."""
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    target = run.value(node.inputs[1])
    if target is None or np.asarray(target).ndim != 1:
        return None
    entries = [int(t) for t in np.asarray(target)]
    if node.op_type == "Expand":
        return broadcast_dims([x, entries])
    return resolve_target(x, entries, bool(attr(node, "allowzero", 0)))


def squeeze_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    """Squeeze's and Unsqueeze's output dims (axes as an input or an attribute)."""
    x = run.dims(node.inputs[0])
    if x is None:
        return None
    op = node.op_type
    axes = run.value(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = attr(node, "axes", None) if axes is None else axes
    if axes is None:
        return [d for d in x if d != 1] if op == "Squeeze" else None
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if op == "Squeeze":
        drop = {positive_axis(a, len(x)) for a in axes}
        return [d for i, d in enumerate(x) if i not in drop]
    rank = len(x) + len(axes)
    new = {positive_axis(a, rank) for a in axes}
    rest = iter(x)
    return [1 if i in new else next(rest) for i in range(rank)]


def range_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    if run.dims(node.inputs[0]) is None:
        return None
    args = [run.value(v) for v in node.inputs[:3]]
    if any(a is None for a in args):
        return None
    start, limit, delta = (float(np.asarray(a).reshape(-1)[0]) for a in args)  # type: ignore[arg-type]
    return [max(int(np.ceil((limit - start) / delta)), 0) if delta else 0]


# -- views of a stored tensor (finding weights) ----------------------------------------------------
def _given_axes(node: ir.Node) -> list[int] | None:
    """Squeeze's or Unsqueeze's axes as given: stored (input 1, from opset 13) or an attribute;
    [] where none are given, None where they are computed."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = const_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    return [int(a) for a in attr(node, "axes", [])]


def unsqueeze_view(node: ir.Node, index: int, axes: AxisMap) -> list[AxisMap] | None:
    """Unit axes inserted: they hold no stored axis."""
    given = _given_axes(node) if index == 0 else None
    if not given:
        return None
    rank = len(axes) + len(given)
    new = {positive_axis(a, rank) for a in given}
    rest = iter(axes)
    return [[None if k in new else next(rest) for k in range(rank)]]


def squeeze_view(node: ir.Node, index: int, axes: AxisMap) -> list[AxisMap] | None:
    """Unit axes dropped (every unit axis where none are given: read from the input's shape)."""
    given = _given_axes(node) if index == 0 else None
    if given is None:
        return None
    dropped = {positive_axis(a, len(axes)) for a in given}
    if not dropped:
        tensor = const_tensor(node.inputs[0])
        shape = list(tensor.shape) if tensor is not None else node.inputs[0].shape
        if shape is None or len(shape) != len(axes):
            return None
        dropped = {k for k, d in enumerate(shape) if d == 1}
    return [[a for k, a in enumerate(axes) if k not in dropped]]


OPS = (
    OpInfo("Constant", rule=constant),
    OpInfo(
        "Transpose",
        rule=transpose,
        output_dims=transpose_dims,
        dead=keeps_zero,
        sources=transpose_sources,
    ),
    *(
        OpInfo(
            op,
            rule=rule,
            output_dims=squeeze_dims,
            folded_inputs=(1,),
            view=view,
            dead=keeps_zero,
            sources=squeeze_sources,
        )
        for op, rule, view in (
            ("Squeeze", squeeze, squeeze_view),
            ("Unsqueeze", unsqueeze, unsqueeze_view),
        )
    ),
    OpInfo("Flatten", rule=flatten, dead=keeps_zero),
    OpInfo("Reshape", rule=reshape, output_dims=target_dims, dead=keeps_zero),
    OpInfo(
        "Expand",
        rule=expand,
        output_dims=target_dims,
        folded_inputs=(1,),
        dead=expand_dead,
        sources=expand_sources,
    ),
    OpInfo("Tile", rule=tile, folded_inputs=(1,), dead=keeps_zero),
    OpInfo("Shape", rule=shape_op),
    OpInfo("Range", rule=positions, output_dims=range_dims),
)
