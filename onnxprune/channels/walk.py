"""The channel walk: which channel indices of which tensors must be removed together.

Every (value, axis) that carries channels gets an array of integer ids, one per index along that
axis. The rules of the op registry (`onnxprune.ops`) link ids (residual Adds), place them at
offsets (Concat), cut them (Split, Slice) or repeat them (a Flatten output repeats a channel's id
over its block of rows), and record the constants to slice (members) and the attributes or shape
constants to recompute (fixes). The graph is walked once in topological order; the union-find is
resolved at the end in one vectorised pass, so a *class* is every index, anywhere in the model,
that stands for one channel. Working per index rather than per whole axis is what lets Concat
offsets, Split and Slice compose.

A class can be removed when some producer (a Conv, Gemm or MatMul weight whose output channels it
names) makes it and nothing froze it. An op with no rule freezes every class it touches, with the
reason; so do model inputs and outputs, which keep their shapes. A weight the walk cannot make a
layer of (inside an If/Loop/Scan body, read by a recurrent op or by a node whose rule gave up) is
listed in `ChannelGraph.unreached` with the reason, so that no weight is left out in silence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxprune import ops, weights
from onnxprune.channels import shapemath
from onnxprune.channels.graph import (
    ZEROED_ROLES,
    ChannelGraph,
    Heads,
    Layer,
    Member,
    Unreached,
    components,
    group_layers,
)
from onnxprune.core import quantized
from onnxprune.core.graphs import subgraph_owners
from onnxprune.core.tensors import const_tensor
from onnxprune.errors import NothingToPruneError
from onnxprune.ops import RECURRENT_OPS, RECURRENT_REASON, Fix, Unsupported
from onnxprune.ops.base import ZERO, Dead
from onnxprune.ops.dead import as_is

# Ops through which a stored tensor is still "the same constant" (weights.PASS_THROUGH).
CONST_VIEWS = ("Transpose", "Cast", "Identity")
# More channels on one axis than any layer has: each is an int64 id, so this bounds memory.
MAX_CHANNELS = 1 << 26


class Walk:
    """The context the channel rules (`ops.ChannelWalk`) work on: spaces, links, members,
    fixes, freezes; and, for shape folding (`shapemath`), the stand-ins of symbolic dims."""

    def __init__(
        self, model: ir.Model, heads: bool = False, seeds: set[tuple[ir.Value, int]] | None = None
    ) -> None:
        self.model = model
        self.heads = heads  # attention heads as channel classes (see ops.shape.reshape)
        # (value, axis) given channels when first read: what an earlier walk found computed
        # from stored tensors (build); and where this walk froze a computed tensor's axis
        self.seeds: dict[ir.Value, set[int]] = {}
        for value, axis in seeds or ():
            self.seeds.setdefault(value, set()).add(axis)
        self.seeding = False
        self.demands: list[tuple[ir.Value, int]] = []
        self.cache = cache_inputs(model)  # past key/value inputs -> the present outputs
        self.head_splits: list[tuple[ir.Node, np.ndarray, int]] = []  # (Reshape, heads, head_dim)
        self.depends: list[tuple[np.ndarray, np.ndarray]] = []  # (parent of each child, children)
        self.symbols: dict[object, int] = {}  # symbolic dims met by shape arithmetic
        self.memos: list[dict] = [{} for _ in range(shapemath.RUNS)]  # shape arithmetic per run
        self.run_dims: dict[int, dict[ir.Value, list[int]]] = {}  # dims per run (shapemath.dims)
        self.count = 0
        self.spaces: dict[ir.Value, dict[int, np.ndarray]] = {}
        self.links: list[tuple[np.ndarray, np.ndarray]] = []
        self.freezes: list[tuple[np.ndarray, str]] = []
        self.members: list[Member] = []
        self.fixes: list[Fix] = []
        self.no_rule: dict[ir.Value, str] = {}
        self.journal: list[tuple[ir.Value, int]] = []  # spaces made, so a failed rule is undone
        # (node, value) pairs whose rule looked at the value's channels: a stored tensor with
        # channels must be looked at by every node that reads it (see check_readers)
        self.current: ir.Node | None = None
        self.looked: set[tuple[ir.Node, ir.Value]] = set()
        self.held: dict[ir.Value, Dead | None] = {}  # dead(), for the node being visited

    # -- reading the graph -------------------------------------------------------------------
    def const(self, value: ir.Value | None) -> np.ndarray | None:
        tensor = const_tensor(value)
        return None if tensor is None else tensor.numpy()

    def is_const(self, value: ir.Value | None) -> bool:
        return self._const_view(value, 0) is not None

    def shape(self, value: ir.Value | None) -> list[int | None] | None:
        """Static dims (None where symbolic or unknown); None if the rank is unknown."""
        if value is None:
            return None
        tensor = const_tensor(value)
        if tensor is not None:
            return [int(d) for d in tensor.shape]
        if value.shape is None:
            return None
        return [d if isinstance(d, int) else None for d in value.shape]

    def named_shape(self, value: ir.Value | None) -> list[int | str | None] | None:
        """Like `shape`, with a named symbolic dim as its name (equal names, equal sizes)."""
        shape = self.shape(value)
        if shape is None or value is None or value.shape is None:
            return shape
        names = [getattr(d, "value", None) for d in value.shape]
        return [d if d is not None else n or None for d, n in zip(shape, names, strict=True)]

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def dim(self, value: ir.Value, axis: int) -> int | None:
        shape = self.shape(value)
        return None if shape is None or not 0 <= axis < len(shape) else shape[axis]

    def ids(self, value: ir.Value | None, axis: int) -> np.ndarray | None:
        if value is None:
            return None
        self._look(value)
        self._seed(value)
        return self.spaces.get(value, {}).get(axis)

    def spaces_of(self, value: ir.Value | None) -> dict[int, np.ndarray]:
        if value is None:
            return {}
        self._look(value)
        self._seed(value)
        return dict(self.spaces.get(value, {}))

    def _seed(self, value: ir.Value) -> None:
        """Give a seeded value its channels when a rule first reads it: a stored tensor becomes
        a member (sliced with the channels it meets), a computed one (a broadcast axis) gets
        fresh channels."""
        axes = self.seeds.get(value)
        if not axes or self.seeding or self.current is None:
            return
        have = self.spaces.get(value, {})
        self.seeding = True
        try:
            for axis in sorted(a for a in axes if a not in have):
                if self._const_view(value, axis) is not None:
                    with contextlib.suppress(Unsupported):  # it stays whole, as unseeded
                        self.space(value, axis, "param", self.current)
                elif (n := self.dim(value, axis)) is not None:
                    self._put(value, axis, self.new(n))
        finally:
            self.seeding = False

    def _look(self, value: ir.Value) -> None:
        if self.current is not None:
            self.looked.add((self.current, value))

    # -- building --------------------------------------------------------------------------
    def new(self, n: int) -> np.ndarray:
        if not 0 <= n <= MAX_CHANNELS:
            # a declared shape no weight agrees with (a corrupt model): not ids to allocate
            raise Unsupported(f"an axis of {n} channels is more than onnxprune tracks")
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise Unsupported(f"channel counts {len(a)} and {len(b)} do not match")
        self.links.append((a, b))

    def set(self, value: ir.Value, axis: int, ids: np.ndarray) -> None:
        """Give `value` a channel space on `axis` (linking it if it has one already)."""
        current = self.ids(value, axis)
        if current is not None:
            self.union(current, ids)
        else:
            self._put(value, axis, ids)

    def _put(self, value: ir.Value, axis: int, ids: np.ndarray) -> None:
        self.spaces.setdefault(value, {})[axis] = ids
        self.journal.append((value, axis))

    def carry(self, src: ir.Value, dst: ir.Value, axis_map: dict[int, int] | None = None) -> None:
        """Copy the spaces of `src` to `dst`, same axes or through `axis_map` (src -> dst)."""
        for axis, ids in self.spaces_of(src).items():
            target = axis if axis_map is None else axis_map.get(axis)
            if target is None:
                raise Unsupported(f"axis {axis} of {src.name!r} carries channels and is dropped")
            self.set(dst, target, ids)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self.freezes.append((ids, reason))

    def freeze_value(self, value: ir.Value | None, reason: str) -> None:
        for ids in self.spaces_of(value).values():
            self.freeze(ids, reason)

    def member(self, role: str, value: ir.Value, axis: int, ids: np.ndarray, node: ir.Node) -> None:
        self.members.append(Member(role, value, axis, ids, node))

    def head_split(self, node: ir.Node, heads: np.ndarray, head_dim: int) -> None:
        """Record a Reshape that splits a channel axis into attention heads (heads=True)."""
        self.head_splits.append((node, heads, head_dim))

    def depend(self, parents: np.ndarray, children: np.ndarray) -> None:
        """Channels `children` are copies of `parents` (one parent per child; GQA's query heads
        reading the key/value head repeated for them): a parent goes when all its copies do,
        never on its own (ChannelGraph.settle)."""
        self.depends.append((parents, children))

    def fix(self, fix: Fix) -> None:
        """Record attributes or shape constants the rewrite recomputes after removal."""
        self.fixes.append(fix)

    def entries(self, value: ir.Value) -> list[int | None] | None:
        """A computed 1-D integer tensor entry by entry: None where it depends on symbolic dims."""
        return shapemath.entries(self, value)

    def dead(self, value: ir.Value) -> Dead | None:
        """What a removed channel holds in `value` (ops.dead): as it is where the value carries
        no channel, zero in a stored tensor whose entries a dead channel has at zero (a bias, a
        shift, a scale that multiplies), else what its producer's rule says. None where that
        is not known, or where the value carries channels on several axes."""
        if value in self.held:
            return self.held[value]
        self.held[value] = None
        spaces = self.spaces_of(value)
        if not spaces:
            found: Dead | None = as_is(value)
        elif len(spaces) > 1:
            found = None
        elif self._const_view(value, 0) is not None:
            stored = self._const_view(value, 0)[0]  # type: ignore[index]
            found = ZERO if any(_zeroed(m) for m in self.members if m.value is stored) else None
        else:
            producer = value.producer()
            info = None if producer is None else ops.op_info(producer)
            rule = None if info is None else info.dead
            found = None if rule is None else rule(producer, self)  # type: ignore[arg-type]
        self.held[value] = found
        return found

    def _const_view(self, value: ir.Value | None, axis: int) -> tuple[ir.Value, int] | None:
        """(stored constant, its axis) that `value`'s axis is, through Transpose/Cast/Identity
        and the DequantizeLinear of a quantized weight or bias (q's axis is the value's)."""
        seen = 0
        while value is not None and seen < 16:
            if const_tensor(value) is not None:
                return value, axis
            node = value.producer()
            if node is None or node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type not in CONST_VIEWS and not quantized.viewable(node):
                return None
            axis = self._input_axis(node, axis)
            if axis is None:
                return None
            value = node.inputs[0]
            seen += 1
        return None

    def _dequantized(self, node: ir.Node, axis: int, ids: np.ndarray) -> None:
        """q's axis carries channels `ids` through DequantizeLinear `node`: a scale and zero
        point per index of that axis are sliced with it (a per-tensor one, or one per index of
        another axis, stays whole)."""
        q = const_tensor(node.inputs[0])
        assert q is not None
        quant, why = quantized.quantization(node, q)
        if quant is None:
            raise Unsupported(why)
        if quant.block_size:
            raise Unsupported(
                f"{node.inputs[0].name!r} is quantized in {quant.kind}: blocked scales are not "
                "sliced"
            )
        if quant.axis == axis:
            for parameter in node.inputs[1:3]:
                if parameter is not None:
                    self.union(ids, self.space(parameter, 0, "param", node))

    def _input_axis(self, view: ir.Node, axis: int) -> int | None:
        """The input axis a Transpose/Cast/Identity output axis comes from."""
        if view.op_type != "Transpose":
            return axis
        rank = self.rank(view.inputs[0])
        if rank is None:
            return None
        perm_attr = view.attributes.get("perm")
        return (list(perm_attr.value) if perm_attr else list(range(rank))[::-1])[axis]

    def space(self, value: ir.Value, axis: int, role: str, node: ir.Node) -> np.ndarray:
        """The space on `value`'s axis, made if missing: a constant becomes a sliced member; any
        other value gets frozen ids (a model input, or the output of an op with no rule)."""
        self.looked.add((node, value))
        ids = self.ids(value, axis)
        if ids is not None:
            return ids
        view = self._const_view(value, axis)
        if view is not None and view[0] is not value:
            # one hop back at a time, so every Transpose/Cast/Identity output on the way to the
            # stored tensor gets the space too (and its dims updated by the rewrite)
            producer = value.producer()
            assert producer is not None
            source_axis = self._input_axis(producer, axis)
            assert source_axis is not None
            ids = self.space(producer.inputs[0], source_axis, role, node)
            if quantized.is_dequantize(producer):
                self._dequantized(producer, source_axis, ids)
            self._put(value, axis, ids)
            return ids
        producer = value.producer()
        if value in self.cache and producer is not None:  # a Concat on the cache's way
            parts = [self.space(v, axis, role, node) for v in producer.inputs if v is not None]
            for ids in parts[1:]:
                self.union(parts[0], ids)
            self._put(value, axis, parts[0])
            return parts[0]
        n = self.dim(value, axis)
        if n is None:
            raise Unsupported(f"axis {axis} of {value.name!r} has no static size")
        ids = self.new(n)
        self._put(value, axis, ids)
        if value in self.cache:
            return ids  # the model's own state: narrowed with the channels it holds
        if view is not None:
            self.member(role, value, axis, ids, node)
        else:
            self.freeze(ids, self._origin(value, axis))
            self.demands.append((value, axis))
        return ids

    def _origin(self, value: ir.Value, axis: int) -> str:
        """Why a value has no channels here, for the report: where its data comes from."""
        source, hops = value, 0
        while source is not None and hops < 64:
            if source.is_graph_input():
                via = f" (through {hops} ops)" if hops else ""
                return f"meets model input {source.name!r}{via}, which keeps its shape"
            if source in self.no_rule:
                return self.no_rule[source]
            producer = source.producer()
            if producer is None or not producer.inputs:
                break
            source, hops = producer.inputs[0], hops + 1
        producer = value.producer()
        op = producer.op_type if producer is not None else "?"
        return f"meets axis {axis} of {value.name!r} ({op} output), which is no channel axis"

    # -- the walk --------------------------------------------------------------------------
    def visit(self, node: ir.Node) -> None:
        rule = ops.channel_rule(node)
        name = f"{node.op_type} {node.name or node.outputs[0].name!r}"
        empty = self._empty_weight(node)
        if rule is None:
            reason = f"{name} has no channel rule"
        elif any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            reason = f"{name} has a subgraph"
        elif empty is not None:
            reason = f"{name}: its weight {empty}"
        else:
            mark = (
                len(self.links),
                len(self.members),
                len(self.fixes),
                len(self.journal),
                len(self.head_splits),
                len(self.depends),
            )
            self.current = node
            self.held = {}
            try:
                rule(node, self)
                return
            except Unsupported as exc:
                self._rollback(mark)
                reason = f"{name}: {exc}"
        for value in node.inputs:
            self.freeze_value(value, reason)
            if value is not None:
                self.looked.add((node, value))
            # a stored tensor read through Identity/Cast/Transpose is frozen at its source too,
            # or another reader of that source could still slice it
            view = self._const_view(value, 0)
            if view is not None and view[0] is not value:
                self.freeze_value(view[0], reason)
        for value in node.outputs:
            self.no_rule[value] = reason
            self.freeze_value(value, reason)
        for sub in _subgraph_inputs(node):
            self.freeze_value(sub, reason)

    def _empty_weight(self, node: ir.Node) -> str | None:
        """Why a weight slot (`ops.weight_inputs`) holds nothing to slice, if so: a stored
        tensor with a 0 dim has no channels to rank (and would divide by zero)."""
        for index in ops.weight_inputs(node):
            value = node.inputs[index] if index < len(node.inputs) else None
            view = self._const_view(value, 0)
            shape = self.shape(view[0]) if view is not None else None
            if shape is not None and 0 in shape:
                return f"{view[0].name!r} holds no elements (shape {tuple(shape)})"
        return None

    def _rollback(self, mark: tuple[int, int, int, int, int, int]) -> None:
        links, members, fixes, journal, heads, depends = mark
        del self.head_splits[heads:]
        del self.depends[depends:]
        del self.links[links:]
        del self.members[members:]
        del self.fixes[fixes:]
        # spaces made by the failed rule go; its freezes stay but name ids nothing links to
        while len(self.journal) > journal:
            value, axis = self.journal.pop()
            self.spaces[value].pop(axis, None)


def _zeroed(member: Member) -> bool:
    """Whether a dead channel has this member's entries at zero: its producer's weight and bias,
    its shifts and the scales that multiply it (not a divisor)."""
    if member.role not in ZEROED_ROLES:
        return False
    return not (member.role == "scale" and member.node.op_type == "Div")


def _subgraph_inputs(node: ir.Node) -> Iterator[ir.Value]:
    """Values an If/Loop/Scan body reads, outer-scope values included."""
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for graph in graphs:
            for inner in graph.all_nodes():
                yield from (v for v in inner.inputs if v is not None)


def build(model: ir.Model, heads: bool = False) -> ChannelGraph:
    """Channel classes, members, fixes, layers and groups of the main graph. With `heads`, an
    attention's heads are its channel classes: a channel axis split into (heads, head_dim)
    keeps one class per head (all its head_dim indices, in Q, K, V and the output projection's
    inputs), so pruning removes whole heads and rewrites the head count in the shapes; without,
    class d is index d of head_dim in every head, and pruning narrows every head alike.

    Where channels meet a computed tensor that is made entry by entry of stored ones (RoPE's
    cos and sin, made of inv_freq; a LayerNorm's mean expanded to the width), a second walk
    gives those stored tensors (or the broadcast axis) channels from the start, so that they
    are sliced with the channels they meet instead of freezing them; it is kept where it
    leaves more channels removable."""
    walk = _walk(model, heads, set())
    graph = _resolve(walk)
    seeds: set[tuple[ir.Value, int]] = set()
    for value, axis in walk.demands:
        found: set[tuple[ir.Value, int]] = set()
        if _derive(walk, value, axis, found, 0):
            seeds |= found
    if seeds:
        again = _walk(model, heads, seeds)
        other = _resolve(again)
        if other.prunable.sum() > graph.prunable.sum():
            walk, graph = again, other
    graph.unreached = _unreached(model, walk, graph)
    return graph


def _walk(model: ir.Model, heads: bool, seeds: set[tuple[ir.Value, int]]) -> Walk:
    walk = Walk(model, heads=heads, seeds=seeds)
    for node in model.graph:
        walk.visit(node)
    walk.current = None
    presents = {out for outs in walk.cache.values() for out in outs}
    for value in model.graph.outputs:
        if value not in presents:
            walk.freeze_value(value, f"reaches model output {value.name!r}, which keeps its shape")
    _check_readers(walk)
    return walk


def cache_inputs(model: ir.Model) -> dict[ir.Value, list[ir.Value]]:
    """The KV cache of a decoder export (Optimum, onnxruntime-genai, torch): each model input
    (past_key_values.i.key) that reaches model outputs (present.i.key) through Concats only,
    read otherwise by Shape alone (the past length), with those outputs; the Concats' outputs
    on the way are keys too. The model feeds its presents back as its pasts, so the two are its
    own state, not an interface to keep: with the key/value heads (or head_dim) they hold
    removed, both narrow alike."""
    outputs = set(model.graph.outputs)
    found: dict[ir.Value, list[ir.Value]] = {}
    for value in model.graph.inputs:
        presents: list[ir.Value] = []
        path, stack, pure = [value], [value], True
        while stack and pure:
            for use in stack.pop().uses():
                node = use.node
                if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                    continue
                if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
                    pure = False
                    break
                out = node.outputs[0]
                if out in outputs:
                    presents.append(out)
                else:
                    stack.append(out)
                    path.append(out)
        if pure and presents:
            found.update(dict.fromkeys(path, presents))
    return found


def _derive(
    walk: Walk, value: ir.Value, axis: int, found: set[tuple[ir.Value, int]], depth: int
) -> bool:
    """Whether `value`'s axis is made entry by entry of stored tensors' axes (or of an axis an
    op broadcasts along), following the ops' `sources`; adds those to `found`."""
    if depth > 32 or value.is_graph_input():
        return False
    if walk._const_view(value, axis) is not None:
        found.add((value, axis))
        return True
    node = value.producer()
    info = None if node is None else ops.op_info(node)
    rule = None if info is None else info.sources
    if rule is None:
        return False
    try:
        made = rule(node, axis, walk)  # type: ignore[arg-type]
    except Unsupported:
        return False
    if made is None:
        return False
    if not made:
        found.add((value, axis))
        return True
    return all(
        node.inputs[i] is not None and _derive(walk, node.inputs[i], k, found, depth + 1)  # type: ignore[union-attr, arg-type]
        for i, k in made
    )


def _unreached(model: ir.Model, walk: Walk, graph: ChannelGraph) -> list[Unreached]:
    """Every stored weight of a weight slot (Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU, RNN;
    subgraphs included) that no member of the channel graph slices, with the reason: inside a
    subgraph, read by a recurrent op, the reason its reader's rule gave, or why `find_weights`
    skipped it. A weight sliced only as some layer's input (a grouped ConvTranspose's, whose
    channels go with its input's groups) is reached."""
    owners = subgraph_owners(model)
    order = {node: i for i, node in enumerate(model.graph)}
    placed = sorted(order[layer.member.node] for layer in graph.layers)
    found = weights.find_weights(model)
    found_at = {w.constant.outputs[0] if w.constant else w.value: w for w in found.weights}
    skipped = dict(found.skipped)
    seen = {m.value for m in graph.members}
    result = []
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        for index in ops.weight_inputs(node):
            source = weights.source_of(node.inputs[index]) if index < len(node.inputs) else None
            tensor = None if source is None else const_tensor(source[0])
            if source is None or source[0] in seen or tensor is None or len(tensor.shape) < 2:
                continue
            value = source[0]
            seen.add(value)
            weight = found_at.get(value)
            name = weight.name if weight is not None else value.name or "?"
            if weight is None and name not in skipped:
                continue
            body = None
            if node in owners:
                top, where = owners[node]
                body = f"{where} of {top.op_type} {top.name or top.outputs[0].name!r}"
                reason = (
                    f"inside the {body}: channel removal reaches the main graph's weights only"
                    + (" (unstructured pruning zeroes them)" if weight is not None else "")
                )
            elif node.op_type in RECURRENT_OPS:
                reason = RECURRENT_REASON.format(op=node.op_type)
            else:
                reason = next(
                    (walk.no_rule[v] for v in node.outputs if v in walk.no_rule),
                    skipped.get(name)
                    or f"{node.op_type} {node.name or node.outputs[0].name!r} reads it as no "
                    "layer: channel removal does not reach it",
                )
            shape = [int(d) for d in tensor.shape]
            if weight is not None:
                axis = weight.out_axis
            else:  # the axis as the node sees it, where nothing lies between
                slot = ops.weight_axes(node, index, len(shape))
                axis = slot[0] if slot and node.inputs[index] is value else None
            position = order.get(owners[node][0] if node in owners else node, len(order))
            label = node.name or name
            if node.op_type in RECURRENT_OPS and node.name:
                label = f"{node.name}:{'W' if index == 1 else 'R'}"  # two weights, one node
            result.append(
                Unreached(
                    name=label,
                    op_type=weight.op_type if weight is not None else node.op_type,
                    weight=name,
                    channels=None if axis is None else shape[axis],
                    params=int(np.prod(shape, dtype=np.int64)),
                    reason=reason,
                    subgraph=body,
                    after=int(np.searchsorted(placed, position)),
                )
            )
    for weight in found.weights:  # read in pieces (Slice, Concat...), no slot holds it whole
        value = weight.constant.outputs[0] if weight.constant else weight.value
        if value in seen:
            continue
        seen.add(value)
        use = weight.uses[0]
        body = None
        if use.node in owners:
            top, where = owners[use.node]
            body = f"{where} of {top.op_type} {top.name or top.outputs[0].name!r}"
            reason = (
                f"inside the {body}: channel removal reaches the main graph's weights only "
                "(unstructured pruning zeroes them)"
            )
        elif use.node.op_type in RECURRENT_OPS:
            reason = RECURRENT_REASON.format(op=use.node.op_type)
        else:
            cut = next((op for op in use.via if op in ops.VIEW_OPS), "a view")
            reason = (
                f"read in pieces (through {cut}) by {use.node.op_type} {use.node.name!r}: "
                "channel removal leaves it whole (unstructured pruning zeroes it)"
            )
        position = order.get(owners[use.node][0] if use.node in owners else use.node, len(order))
        label = use.node.name or weight.name
        if use.node.op_type in RECURRENT_OPS and use.node.name:
            label = f"{use.node.name}:{'W' if use.input_index == 1 else 'R'}"
        result.append(
            Unreached(
                name=label,
                op_type=weight.op_type,
                weight=weight.name,
                channels=None if weight.out_axis is None else weight.shape[weight.out_axis],
                params=weight.size,
                reason=reason,
                subgraph=body,
                after=int(np.searchsorted(placed, position)),
            )
        )
    return result


def check_removable(graph: ChannelGraph) -> None:
    """Refuse a model where channel removal can remove nothing, saying why (the reasons of the
    frozen layers, the weights it cannot reach), as unstructured pruning refuses a model with no
    prunable weight: never an output that only looks pruned."""
    if graph.prunable.any():
        return
    parts = []
    inside = [u for u in graph.unreached if u.subgraph]
    if inside:
        bodies = list(dict.fromkeys(str(u.subgraph) for u in inside))
        more = f" and {len(bodies) - 2} more" if len(bodies) > 2 else ""
        parts.append(
            f"the weights of {len(inside)} layer(s) sit inside subgraphs (the "
            + ", the ".join(bodies[:2])
            + f"{more}): onnxprune removes channels of the main graph's weights only"
        )
    recurrent = sorted(
        {u.op_type for u in graph.unreached if u.op_type in RECURRENT_OPS and not u.subgraph}
    )
    if recurrent:
        parts.append(
            f"{'/'.join(recurrent)} weights keep their channels (a recurrent hidden "
            "size couples W, R, B and the initial states)"
        )
    others = [u for u in graph.unreached if not u.subgraph and u.op_type not in RECURRENT_OPS]
    if others:
        parts.append(
            f"{len(others)} layer(s) are not reached ({others[0].name}: {others[0].reason})"
        )
    if graph.layers:
        reasons = list(dict.fromkeys(r for group in graph.groups for r in group.reasons))
        parts.append(
            f"every channel of the {len(graph.layers)} layer(s) it reaches is frozen ("
            + "; ".join(reasons[:2])
            + (f" and {len(reasons) - 2} more reasons" if len(reasons) > 2 else "")
            + ")"
        )
    if not parts:
        parts.append("the model has no Conv, ConvTranspose, Gemm or MatMul weight")
    hint = (
        "; unstructured pruning (without --structured) zeroes weights there"
        if inside or recurrent
        else ""
    )
    raise NothingToPruneError("no channel can be removed: " + "; ".join(parts) + hint)


def _check_readers(walk: Walk) -> None:
    """Every node reading a tensor with channels must have followed them: its rule looked at
    them, or it froze them. A stored tensor is followed through Identity/Cast/Transpose, since
    exporters share equal tensors (zero biases) between unrelated layers; a reader whose rule
    never looked (a LayerNorm whose input has no channels, say, or a node inside a subgraph)
    freezes the channels instead of leaving a sliced tensor where a whole one is read."""
    for source in list(walk.spaces):
        stack = [source]
        while stack:
            value = stack.pop()
            if (
                value.is_graph_output()
                and const_tensor(source) is not None
                and not any(value in o for o in walk.cache.values())
            ):
                # (a computed value there is frozen as reaching the model output already; a
                # KV cache's present narrows with its past)
                walk.freeze_value(source, f"stored tensor {source.name!r} is a model output")
            for use in value.uses():
                reader = use.node
                view = reader.op_type in CONST_VIEWS and reader.domain in ("", "ai.onnx")
                if view or (use.idx == 0 and quantized.viewable(reader)):
                    stack.append(reader.outputs[0])
                elif (reader, value) not in walk.looked:
                    name = f"{reader.op_type} {reader.name or reader.outputs[0].name!r}"
                    walk.freeze_value(
                        source, f"{source.name!r} is also read by {name}, which leaves it whole"
                    )


def _resolve(walk: Walk) -> ChannelGraph:
    n = walk.count
    if walk.links:
        a = np.concatenate([x for x, _ in walk.links])
        b = np.concatenate([y for _, y in walk.links])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    root = components(n, a, b)
    _, label = np.unique(root, return_inverse=True)
    label = label.astype(np.int64).reshape(-1)
    n_classes = int(label.max()) + 1 if n else 0

    frozen = np.zeros(n_classes, dtype=bool)
    reason = np.full(n_classes, -1, dtype=np.int64)
    reasons: list[str] = []
    pairs = []
    for ids, text in walk.freezes:
        classes = np.unique(label[ids])
        if text not in reasons:
            reasons.append(text)
        index = reasons.index(text)
        reason[classes[reason[classes] < 0]] = index
        frozen[classes] = True
        pairs.append(np.stack([classes, np.full(len(classes), index)], axis=1))
    freeze_pairs = (
        np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), dtype=np.int64)
    )
    reasons_used = np.unique(freeze_pairs[:, 1]) if len(freeze_pairs) else np.zeros(0, np.int64)
    if len(reasons_used) < len(reasons):  # texts whose freezes named no class: dropped
        keep = {int(r): k for k, r in enumerate(reasons_used)}
        reasons = [reasons[int(r)] for r in reasons_used]
        freeze_pairs[:, 1] = [keep[int(r)] for r in freeze_pairs[:, 1]]
        reason = np.where(reason >= 0, [keep.get(int(r), -1) for r in reason], -1)

    spaces = {v: {ax: label[ids] for ax, ids in s.items()} for v, s in walk.spaces.items()}
    members = [Member(m.role, m.value, m.axis, label[m.ids], m.node) for m in walk.members]
    fixes = [f.relabel(label) for f in walk.fixes]
    seen: set[tuple[ir.Value, int]] = set()
    layers = []
    for m in members:
        if m.role == "out" and (m.value, m.axis) not in seen:
            seen.add((m.value, m.axis))
            layers.append(Layer(m))
    graph = ChannelGraph(n_classes, spaces, members, fixes, frozen, reason, reasons, layers, [])
    graph.freeze_pairs = freeze_pairs
    graph.depends = [(label[p], label[c]) for p, c in walk.depends]
    graph.groups = group_layers(graph)
    graph.heads = _attention_heads(walk, label, members)
    return graph


def _attention_heads(walk: Walk, label: np.ndarray, members: list[Member]) -> list[Heads]:
    """One entry per attention: the head splits whose heads ended up the same classes (Q, K and
    V of one attention are joined by its MatMuls), named after the output projection, the first
    weight that reads exactly those classes (else the first that makes them)."""
    found: dict[bytes, Heads] = {}
    copied = {int(c) for parents, _ in walk.depends for c in label[parents]}
    for node, ids, head_dim in walk.head_splits:
        classes = label[ids]
        if all(int(c) in copied for c in classes):
            continue  # GQA's key/value heads: they go with their query heads
        key = np.unique(classes).tobytes()
        if key in found:
            found[key].reshapes.append(node)
            continue
        found[key] = Heads("", classes, head_dim, [node])
    weights = [(m, np.unique(m.ids)) for m in members if m.role in ("in", "out")]
    for entry in found.values():
        distinct = np.unique(entry.classes)
        same = [m for m, classes in weights if np.array_equal(classes, distinct)]
        source = next((m for m in same if m.role == "in"), same[0] if same else None)
        if source is not None:
            entry.name = source.node.name or source.value.name or "?"
        else:
            entry.name = entry.reshapes[0].name or "?"
    return list(found.values())


def freeze_layers(graph: ChannelGraph, layers: list[int], reason: str) -> None:
    """Freeze the channels of these layers (e.g. --exclude), recording why, and regroup."""
    if not layers:
        return
    _freeze(graph, np.concatenate([graph.layers[i].classes for i in layers]), reason)


def freeze_tensors(graph: ChannelGraph, reasons: dict[str, str]) -> None:
    """Freeze every channel of the stored tensors named in `reasons` (a fixed transform: its
    rows and columns alike), recording why, and regroup."""
    for name, reason in reasons.items():
        ids = [m.ids for m in graph.members if m.value.name == name]
        if ids:
            _freeze(graph, np.concatenate(ids), reason)


def _freeze(graph: ChannelGraph, ids: np.ndarray, reason: str) -> None:
    classes = np.unique(ids)
    if reason not in graph.reasons:
        graph.reasons.append(reason)
    index = graph.reasons.index(reason)
    fresh = classes[graph.reason[classes] < 0]
    graph.reason[fresh] = index
    graph.frozen[classes] = True
    pairs = np.stack([classes, np.full(len(classes), index)], axis=1)
    graph.freeze_pairs = np.unique(np.concatenate([graph.freeze_pairs, pairs]), axis=0)
    graph.groups = group_layers(graph)
