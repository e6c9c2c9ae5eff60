"""Channel groups: which channel indices of which tensors must be removed together.

Every (value, axis) that carries channels gets an array of integer ids, one per index along that
axis. The rules of `oprules.py` link ids (residual Adds), place them at offsets (Concat), cut them
(Split, Slice) or repeat them (a Flatten output repeats a channel's id over its block of rows), and
record the constants to slice (members) and the attributes or shape constants to recompute (fixes).
The graph is walked once in topological order; the union-find is resolved at the end in one
vectorised pass, so a *class* is every index, anywhere in the model, that stands for one channel.
Working per index rather than per whole axis is what lets Concat offsets, Split and Slice compose.

A class can be removed when some producer (a Conv, Gemm or MatMul weight whose output channels it
names) makes it and nothing froze it. An op with no rule freezes every class it touches, with the
reason; so do model inputs and outputs, which keep their shapes. A weight the walk cannot make a
layer of (inside an If/Loop/Scan body, read by a recurrent op or by a node whose rule gave up) is
listed in `ChannelGraph.unreached` with the reason, so that no weight is left out in silence.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from onnxprune import weights
from onnxprune.channels import shapemath
from onnxprune.channels.oprules import RULES, Unsupported
from onnxprune.core import quantized
from onnxprune.core.graphs import subgraph_owners
from onnxprune.core.tensors import const_tensor
from onnxprune.errors import NothingToPruneError

# Member roles. out/in: a weight's output/input-channel axis; bias: the producer's bias; scale and
# shift: per-channel carrier parameters (a dead channel has its shifts zero); param: anything else.
ROLES = ("out", "in", "bias", "scale", "shift", "param")


@dataclass(frozen=True, eq=False)
class Member:
    """A stored tensor sliced along `axis`: index i goes when id `ids[i]` is removed."""

    role: str
    value: ir.Value  # an initializer, or the output of a Constant node
    axis: int
    ids: np.ndarray
    node: ir.Node  # the node that reads it


@dataclass(eq=False)
class Fix:
    """A node whose attributes or shape constants depend on how many channels are kept."""

    kind: str
    node: ir.Node
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Layer:
    """One producer: a weight's output-channel axis. The unit of --min-keep and of the report."""

    member: Member

    @property
    def name(self) -> str:
        return self.member.node.name or self.member.value.name or "?"

    @property
    def op_type(self) -> str:
        return self.member.node.op_type

    @property
    def classes(self) -> np.ndarray:
        return self.member.ids


@dataclass
class Group:
    """Layers that share channel classes: what the report shows and --round-to rounds together."""

    layers: list[int]
    classes: np.ndarray
    frozen: int  # frozen classes among `classes`
    reasons: list[str]


@dataclass(eq=False)
class Heads:
    """One attention's heads (build(heads=True)): removing a class removes that head, its rows
    of Q, K and V and its columns of the output projection."""

    name: str  # the output projection's node, else the Q projection's
    classes: np.ndarray  # the class of each head, in head order
    head_dim: int  # size of the axes after the heads axis in the split
    reshapes: list[ir.Node]  # the Reshapes that split the heads off

    def kept(self, removed: np.ndarray) -> int:
        return int(np.count_nonzero(~removed[self.classes]))


@dataclass(frozen=True)
class Unreached:
    """A prunable weight (as `weights.find_weights` finds it) that channel removal leaves whole:
    no layer reads its output channels. The report lists it with `reason`."""

    name: str  # the node that reads it, else the weight
    op_type: str
    weight: str
    channels: int | None  # its output channels, where it has an output axis
    params: int
    reason: str
    subgraph: str | None  # the If/Loop/Scan body it sits in ("then_branch of If 'x'"), if so
    after: int  # how many layers come before it in graph order (where the table lists it)


@dataclass
class ChannelGraph:
    """The analysis result. After `build`, every ids array holds class labels 0..n_classes-1."""

    n_classes: int
    spaces: dict[ir.Value, dict[int, np.ndarray]]
    members: list[Member]
    fixes: list[Fix]
    frozen: np.ndarray  # bool per class
    reason: np.ndarray  # index into `reasons` per class, -1 when not frozen
    reasons: list[str]
    layers: list[Layer]
    groups: list[Group]
    heads: list[Heads] = field(default_factory=list)  # attentions whose heads are classes
    unreached: list[Unreached] = field(default_factory=list)  # weights no layer stands for

    @property
    def produced(self) -> np.ndarray:
        """Bool per class: some producer makes it (so zeroing its weights kills the channel)."""
        mask = np.zeros(self.n_classes, dtype=bool)
        for layer in self.layers:
            mask[layer.classes] = True
        return mask

    @property
    def prunable(self) -> np.ndarray:
        return self.produced & ~self.frozen


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (a[i], b[i]): the smallest node id per node.

    Hooking roots to the smaller root and pointer jumping, all in numpy: O(log n) rounds.
    """
    label = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return label
    while True:
        la, lb = label[a], label[b]
        if np.array_equal(la, lb):
            return label
        low = np.minimum(la, lb)
        np.minimum.at(label, la, low)
        np.minimum.at(label, lb, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped




def stored_values(value: ir.Value) -> np.ndarray:
    """A stored tensor's values as the model computes with them: q dequantized where a
    DequantizeLinear reads it (a quantized weight), else as stored."""
    tensor = const_tensor(value)
    assert tensor is not None, f"{value.name!r} is not stored"
    quant = quantized.of_stored(value)
    return tensor.numpy() if quant is None else quantized.DequantizedTensor(tensor, quant).numpy()


def zeroed(value: ir.Value, axis: int, mask: np.ndarray) -> np.ndarray:
    """A stored tensor with the indices `mask` selects along `axis` at zero: at their zero point
    where a DequantizeLinear reads it, so that what the model computes with is exactly 0."""
    tensor = const_tensor(value)
    assert tensor is not None, f"{value.name!r} is not stored"
    array = np.array(tensor.numpy(), copy=True)
    index: list[slice | np.ndarray] = [slice(None)] * array.ndim
    index[axis] = mask
    quant = quantized.of_stored(value)
    if quant is None:
        array[tuple(index)] = 0
        return array
    where = np.zeros(array.shape, dtype=bool)
    where[tuple(index)] = True
    return quant.with_zero_points(array, where)


def concat_piece(value: ir.Value, position: int) -> tuple[ir.Node, int, int] | None:
    """Where entry `position` of a computed shape vector is stored: (the Concat that makes the
    vector, its input holding the entry, the entry's index there), when that input is a stored
    constant and the vector is read once (so changing the piece changes nothing else)."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(value.uses()) != 1:
        return None
    offset = 0
    for index, piece in enumerate(node.inputs):
        shape = None if piece is None else piece.shape
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        if offset <= position < offset + shape[0]:
            return (node, index, position - offset) if const_tensor(piece) is not None else None
        offset += shape[0]
    return None


# Ops through which a stored tensor is still "the same constant" (weights.PASS_THROUGH).
_CONST_VIEWS = ("Transpose", "Cast", "Identity")
# More channels on one axis than any layer has: each is an int64 id, so this bounds memory.
MAX_CHANNELS = 1 << 26
# The operands of each weight op that hold channels when stored (the weights of Conv/Gemm/MatMul).
_WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}


class Walk:
    """The context the rules of oprules.py work on: spaces, links, members, fixes, freezes."""

    def __init__(self, model: ir.Model, heads: bool = False) -> None:
        self.model = model
        self.heads = heads  # attention heads as channel classes (see oprules.reshape)
        self.head_splits: list[tuple[ir.Node, np.ndarray, int]] = []  # (Reshape, heads, head_dim)
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

    concat_piece = staticmethod(concat_piece)

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
        return self.spaces.get(value, {}).get(axis)

    def spaces_of(self, value: ir.Value | None) -> dict[int, np.ndarray]:
        if value is None:
            return {}
        self._look(value)
        return dict(self.spaces.get(value, {}))

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

    def fix(self, kind: str, node: ir.Node, ids: dict[str, np.ndarray] | None = None, **data: Any):
        self.fixes.append(Fix(kind, node, ids or {}, data))

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
            if node.op_type not in _CONST_VIEWS and not quantized.viewable(node):
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
        n = self.dim(value, axis)
        if n is None:
            raise Unsupported(f"axis {axis} of {value.name!r} has no static size")
        ids = self.new(n)
        self._put(value, axis, ids)
        if view is not None:
            self.member(role, value, axis, ids, node)
        else:
            self.freeze(ids, self._origin(value, axis))
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
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
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
            )
            self.current = node
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
        """Why a weight slot of a Conv/ConvTranspose/Gemm/MatMul holds nothing to slice, if so:
        a stored tensor with a 0 dim has no channels to rank (and would divide by zero)."""
        if node.op_type not in _WEIGHT_SLOTS or node.domain not in ("", "ai.onnx"):
            return None
        for index in _WEIGHT_SLOTS[node.op_type]:
            value = node.inputs[index] if index < len(node.inputs) else None
            view = self._const_view(value, 0)
            shape = self.shape(view[0]) if view is not None else None
            if shape is not None and 0 in shape:
                return f"{view[0].name!r} holds no elements (shape {tuple(shape)})"
        return None

    def _rollback(self, mark: tuple[int, int, int, int, int]) -> None:
        links, members, fixes, journal, heads = mark
        del self.head_splits[heads:]
        del self.links[links:]
        del self.members[members:]
        del self.fixes[fixes:]
        # spaces made by the failed rule go; its freezes stay but name ids nothing links to
        while len(self.journal) > journal:
            value, axis = self.journal.pop()
            self.spaces[value].pop(axis, None)


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


# Integer inputs that older exporters compute from Shape ops and that the walk needs constant.
FOLDED_INPUTS = {
    "Split": (1,), "Slice": (1, 2, 3, 4), "Expand": (1,), "Unsqueeze": (1,), "Squeeze": (1,),
    "Pad": (1,), "Resize": (3,),
}  # fmt: skip


def prepare(model: ir.Model, rounds: int = 64) -> ir.Model:
    """Shapes for the walk (in place): infer them, and fold the shape arithmetic that exporters
    write (Shape -> Gather -> Div -> Concat -> Reshape) into constants where it does not depend
    on the model's symbolic dims (a Reshape's entries that copy the batch or sequence become 0,
    one other entry -1), so channels reshaped, split or sliced that way stay prunable; shape
    arithmetic read as data (attention's 1 / sqrt(head_dim) computed from the hidden width) is
    folded too, or its Shape would freeze the width. A Reshape -> Transpose -> Reshape that
    merges axes only to split them again (heads folded into the batch) is rewritten so that
    nothing merges (see `_regroups`), and a stored tensor reshaped is stored reshaped (Swin's
    relative position bias, [49*49, H] -> [1, H, 49, 49], is then sliced with the heads it is
    added to). Folding one node can make a later shape known, so it repeats until nothing more
    folds. Returns `model`."""
    ShapeInferencePass()(model)
    for _ in range(rounds):
        if not _fold(model) + _stored_views(model) + _regroups(model) + _static_dims(model):
            break
        RemoveUnusedNodesPass()(model)
        ShapeInferencePass()(model)
    return model


def _fold(model: ir.Model) -> int:
    walk = Walk(model)
    memos = walk.memos
    folded = 0
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or const_tensor(value) is not None:
                continue
            if node.op_type == "Reshape" and index == 1:
                found = shapemath.static_target(walk, node, memos)
                if found is None:
                    continue
                target, copies = found
                array = np.array(target, dtype=np.int64)
                if copies:
                    node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            else:
                producer = value.producer()
                if producer is None or producer.op_type not in (*shapemath.SHAPE_MATH, "Shape"):
                    continue
                # a computed input the walk needs constant, a static piece of a target that
                # stays computed (its channel count then is a constant the rewrite can change),
                # or a scalar read as data
                slot = index in FOLDED_INPUTS.get(node.op_type, ()) or (
                    node.op_type == "Concat"
                    and shapemath.static_value(walk, node.outputs[0], memos) is None
                )
                if not slot and not _reads_data(walk, node, memos):
                    continue
                array = shapemath.static_value(walk, value, memos)
                if array is None:
                    continue
                if array.size > 1 and not slot:
                    continue  # data made from a shape (ConstantOfShape) keeps reading it
                if value.dtype is not None:
                    array = array.astype(value.dtype.numpy())
            name = f"{node.name or node.op_type}_input{index}"
            while name in model.graph.initializers:
                name += "_"
            tensor = ir.Tensor(np.array(array, order="C"), name=name)  # keeps 0-d as 0-d
            const = ir.Value(
                name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype)
            )
            const.const_value = tensor
            model.graph.register_initializer(const)
            node.replace_input_with(index, const)
            folded += 1
    return folded


# Ops that only rearrange a tensor; prepare stores their result when their input is stored.
_REARRANGE = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
_STORED_VIEW_LIMIT = 1 << 20  # elements; larger rearranged weights are left as they are


def _stored_views(model: ir.Model) -> int:
    """Store what a Reshape, Unsqueeze, Squeeze or Flatten makes of a stored float tensor (read
    through Transpose, Cast or Identity): the walk slices stored tensors, not their views."""
    done = 0
    for node in list(model.graph):
        if node.op_type not in _REARRANGE or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        if out.is_graph_output() or not out.uses():
            continue
        array = _stored_array(node.inputs[0])
        if array is None or array.dtype.kind != "f" or array.size > _STORED_VIEW_LIMIT:
            continue
        extra = [const_tensor(v) for v in node.inputs[1:] if v is not None]
        if any(t is None for t in extra):
            continue
        args = [t.numpy() for t in extra]  # type: ignore[union-attr]
        array = _rearranged(node, array, args)
        name = f"{out.name}_stored"
        while name in model.graph.initializers:
            name += "_"
        const = ir.Value(name=name, shape=ir.Shape(array.shape), type=out.type)
        const.const_value = ir.Tensor(np.array(array, order="C"), name=name)
        model.graph.register_initializer(const)
        out.replace_all_uses_with(const)
        done += 1
    return done


def _stored_array(value: ir.Value | None) -> np.ndarray | None:
    """A stored tensor's values as `value` holds them, through Transpose, Cast and Identity."""
    chain = []
    while value is not None and const_tensor(value) is None and len(chain) < 16:
        node = value.producer()
        if node is None or node.op_type not in _CONST_VIEWS or node.domain not in ("", "ai.onnx"):
            return None
        chain.append(node)
        value = node.inputs[0]
    tensor = const_tensor(value)
    if tensor is None or int(np.prod(tensor.shape)) > _STORED_VIEW_LIMIT:
        return None
    array = tensor.numpy()
    for node in reversed(chain):
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            array = np.transpose(array, None if perm is None else list(perm.value))
        elif node.op_type == "Cast":
            array = array.astype(ir.DataType(node.attributes["to"].value).numpy())
    return array


def _rearranged(node: ir.Node, array: np.ndarray, args: list[np.ndarray]) -> np.ndarray:
    attr = node.attributes
    if node.op_type == "Reshape":
        zero = attr.get("allowzero")
        target = [int(t) for t in args[0].reshape(-1)]
        dims = shapemath.resolve_target(list(array.shape), target, bool(zero and zero.value))
        return array.reshape(dims)
    if node.op_type == "Flatten":
        axis = int(attr["axis"].value) if "axis" in attr else 1
        axis = axis % array.ndim if array.ndim else 0
        return array.reshape(int(np.prod(array.shape[:axis])), -1)
    axes = args[0] if args else np.array(attr["axes"].value if "axes" in attr else [], np.int64)
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if node.op_type == "Squeeze":
        return np.squeeze(array, tuple(axes)) if axes else np.squeeze(array)
    rank = array.ndim + len(axes)
    return np.expand_dims(array, tuple(a % rank for a in axes))


def _reads_data(walk: Walk, node: ir.Node, memos: list[dict]) -> bool:
    """Whether some input of `node` is data rather than shape arithmetic: its other inputs that
    are scalars computed from shapes are then folded (a Div of attention scores by
    sqrt(head_dim), head_dim computed from the hidden width)."""
    return any(v is not None and not shapemath.evaluable(walk, v, memos) for v in node.inputs)


def _static_dims(model: ir.Model) -> int:
    """Static dims that shape inference leaves unknown and the propagated dims tell (an
    attention mask expanded by a computed target to [B, 1, S, S] broadcasts over the heads):
    equal in every run of the stand-ins. Returns how many outputs changed."""
    walk = Walk(model)
    changed = 0
    for node in model.graph:
        for out in node.outputs:
            if out is None or out.shape is None or all(isinstance(d, int) for d in out.shape):
                continue
            found = [shapemath.dims(walk, out, r) for r in range(shapemath.RUNS)]
            if any(f is None or len(f) != len(out.shape) for f in found):
                continue
            new = [
                old if isinstance(old, int) or len(set(column)) != 1 else column[0]
                for old, column in zip(out.shape, zip(*found, strict=True), strict=True)  # type: ignore[arg-type]
            ]
            if new != list(out.shape):
                out.shape = ir.Shape(new)
                changed += 1
    return changed


def _regroups(model: ir.Model) -> int:
    """Rewrite each Reshape -> Transpose -> Reshape whose first Reshape merges axes that the
    last splits apart again as a Reshape that only splits, the Transpose, and a Reshape that
    only merges (each left out where it would do nothing). nn.MultiheadAttention folds the heads
    into the batch, [S, B, E] -> [S, B*H, D] -> [B*H, S, D] -> [B, H, S, D], and the dynamo
    exporter's scaled_dot_product_attention transposes k through [B*H, S, D]: a channel axis
    merged with a symbolic one has no per-index classes, and rewritten it is never merged."""
    walk = Walk(model)
    done = 0
    for first in list(model.graph):
        chain = _chain(first)
        if chain is None:
            continue
        swap, last = chain
        found = _regroup(walk, first, swap, last)
        if found is None:
            continue
        split, perm, merge = found
        x, out = first.inputs[0], last.outputs[0]
        name = last.name or "Reshape"
        value = x
        steps = [("Reshape", split), ("Transpose", perm), ("Reshape", merge)]
        for k, (op, data) in enumerate(steps):
            if data is None:
                continue
            if op == "Transpose":
                node = ir.Node("", op, [value], [ir.AttrInt64s("perm", data)], name=f"{name}_{k}")
            else:
                target = f"{name}_regrouped_{k}"
                while target in model.graph.initializers:
                    target += "_"
                tensor = ir.Tensor(np.array(data, dtype=np.int64), name=target)
                shape = ir.Value(name=target, const_value=tensor)
                model.graph.register_initializer(shape)
                node = ir.Node("", op, [value, shape], name=f"{name}_{k}")
            node.outputs[0].name = f"{out.name}_regrouped_{k}"
            node.outputs[0].type = out.type
            model.graph.insert_before(last, node)
            value = node.outputs[0]
        value.shape = out.shape
        out.replace_all_uses_with(value)
        done += 1
    return done


def _chain(first: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(Transpose, Reshape) after a Reshape, each the only reader of what comes before."""
    if first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
        return None
    nodes = []
    value = first.outputs[0]
    for op in ("Transpose", "Reshape"):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != op:
            return None
        nodes.append(uses[0].node)
        value = uses[0].node.outputs[0]
    if value.is_graph_output():
        return None
    return nodes[0], nodes[1]


def _regroup(
    walk: Walk, first: ir.Node, swap: ir.Node, last: ir.Node
) -> tuple[list[int] | None, list[int], list[int] | None] | None:
    """(split target, perm, merge target) that first -> swap -> last is, where the first
    Reshape merges axes (else None: there is nothing to gain). Worked out in every run of the
    stand-ins: the finest dims both x's and the merged shape are made of, permuted, and merged
    into the output's; the targets as constants (0 for a symbolic dim kept in place, one -1)."""
    attr = swap.attributes.get("perm")
    runs = []
    for run in range(shapemath.RUNS):
        xs = shapemath.dims(walk, first.inputs[0], run)
        mid = _resolved(walk, first, xs, run)
        if xs is None or mid is None:
            return None
        perm = [int(p) for p in attr.value] if attr is not None else list(range(len(mid)))[::-1]
        out = _resolved(walk, last, [mid[p] for p in perm], run)
        refined = _refine(xs, mid)
        if out is None or refined is None or len(perm) != len(mid):
            return None
        fine, _, runs_mid = refined
        order = [i for p in perm for i in runs_mid[p]]
        permuted = [fine[i] for i in order]
        merged = _refine(permuted, out)
        if merged is None or len(merged[0]) != len(permuted):
            return None  # the last Reshape splits further: not handled
        runs.append((xs, mid, fine, order, permuted, out))
    if len({(len(r[2]), tuple(r[3])) for r in runs}) != 1:
        return None
    if all([d for d in r[1] if d != 1] == r[2] for r in runs):
        return None  # the first Reshape merges nothing
    split = _as_target([r[0] for r in runs], [r[2] for r in runs])
    merge = _as_target([r[4] for r in runs], [r[5] for r in runs])
    if split is None or merge is None:
        return None
    return (
        None if all(r[0] == r[2] for r in runs) else split,
        runs[0][3],
        None if all(r[4] == r[5] for r in runs) else merge,
    )


def _refine(
    a: list[int], b: list[int]
) -> tuple[list[int], list[list[int]], list[list[int]]] | None:
    """The common refinement of two shapes of one tensor (dims of 1 dropped), and the axes of
    it each axis of a and of b is made of; None unless their running products nest."""
    ends_a = [int(np.prod(a[: k + 1], dtype=object)) for k in range(len(a))]
    ends_b = [int(np.prod(b[: k + 1], dtype=object)) for k in range(len(b))]
    if (ends_a[-1] if ends_a else 1) != (ends_b[-1] if ends_b else 1):
        return None
    bounds = sorted({1, *ends_a, *ends_b})
    if any(hi % lo for lo, hi in itertools.pairwise(bounds)):
        return None
    fine = [hi // lo for lo, hi in itertools.pairwise(bounds)]

    def runs(ends: list[int]) -> list[list[int]]:
        starts = [1, *ends[:-1]]
        return [
            list(range(bounds.index(lo), bounds.index(hi)))
            for lo, hi in zip(starts, ends, strict=True)
        ]

    return fine, runs(ends_a), runs(ends_b)


def _resolved(walk: Walk, node: ir.Node, xs: list[int] | None, run: int) -> list[int] | None:
    """A Reshape's output dims in one run of the stand-ins, given its input dims."""
    target = shapemath.shape_value(walk, node.inputs[1], run, walk.memos[run])
    if target is None or xs is None or np.asarray(target).ndim != 1:
        return None
    allowzero = node.attributes.get("allowzero")
    entries = [int(t) for t in np.asarray(target)]
    return shapemath.resolve_target(xs, entries, bool(allowzero is not None and allowzero.value))


def _as_target(ins: list[list[int]], outs: list[list[int]]) -> list[int] | None:
    """A Reshape target from input to output dims over the runs: static entries as they are, a
    symbolic dim kept at its position 0, at most one other -1."""
    target = []
    for i, column in enumerate(zip(*outs, strict=True)):
        if len(set(column)) == 1:
            target.append(column[0])
        elif all(i < len(x) and x[i] == c for x, c in zip(ins, column, strict=True)):
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1 or (0 in target and any(c == 0 for c in outs[0])):
        return None
    return target


def build(model: ir.Model, heads: bool = False) -> ChannelGraph:
    """Channel classes, members, fixes, layers and groups of the main graph. With `heads`, an
    attention's heads are its channel classes: a channel axis split into (heads, head_dim)
    keeps one class per head (all its head_dim indices, in Q, K, V and the output projection's
    inputs), so pruning removes whole heads and rewrites the head count in the shapes; without,
    class d is index d of head_dim in every head, and pruning narrows every head alike."""
    walk = Walk(model, heads=heads)
    for node in model.graph:
        walk.visit(node)
    walk.current = None
    for value in model.graph.outputs:
        walk.freeze_value(value, f"reaches model output {value.name!r}, which keeps its shape")
    _check_readers(walk)
    graph = _resolve(walk)
    graph.unreached = _unreached(model, walk, graph)
    return graph


# Why channel removal leaves a recurrent layer's weights whole.
RECURRENT_REASON = (
    "a recurrent hidden size couples W, R, B and the initial states: channel removal leaves "
    "{op} weights whole (unstructured pruning zeroes them)"
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
        for index in weights.WEIGHT_INPUTS.get(node.op_type, ()):
            source = weights._source_of(node.inputs[index]) if index < len(node.inputs) else None
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
            elif node.op_type in weights.RECURRENT_OPS:
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
                slot = weights._slot_axes(node, index, len(shape))
                axis = slot[0] if slot and node.inputs[index] is value else None
            position = order.get(owners[node][0] if node in owners else node, len(order))
            label = node.name or name
            if node.op_type in weights.RECURRENT_OPS and node.name:
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
        {
            u.op_type
            for u in graph.unreached
            if u.op_type in weights.RECURRENT_OPS and not u.subgraph
        }
    )
    if recurrent:
        parts.append(
            f"{'/'.join(recurrent)} weights keep their channels (a recurrent hidden "
            "size couples W, R, B and the initial states)"
        )
    others = [
        u for u in graph.unreached if not u.subgraph and u.op_type not in weights.RECURRENT_OPS
    ]
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
            if value.is_graph_output():
                walk.freeze_value(source, f"stored tensor {source.name!r} is a model output")
            for use in value.uses():
                reader = use.node
                view = reader.op_type in _CONST_VIEWS and reader.domain in ("", "ai.onnx")
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
    for ids, text in walk.freezes:
        classes = np.unique(label[ids])
        new = classes[reason[classes] < 0]
        if len(new):
            if text not in reasons:
                reasons.append(text)
            reason[new] = reasons.index(text)
        frozen[classes] = True

    spaces = {v: {ax: label[ids] for ax, ids in s.items()} for v, s in walk.spaces.items()}
    members = [Member(m.role, m.value, m.axis, label[m.ids], m.node) for m in walk.members]
    fixes = [
        Fix(f.kind, f.node, {k: label[i] for k, i in f.ids.items()}, f.data) for f in walk.fixes
    ]
    seen: set[tuple[ir.Value, int]] = set()
    layers = []
    for m in members:
        if m.role == "out" and (m.value, m.axis) not in seen:
            seen.add((m.value, m.axis))
            layers.append(Layer(m))
    graph = ChannelGraph(n_classes, spaces, members, fixes, frozen, reason, reasons, layers, [])
    graph.groups = _groups(graph)
    graph.heads = _attention_heads(walk, label, members)
    return graph


def _attention_heads(walk: Walk, label: np.ndarray, members: list[Member]) -> list[Heads]:
    """One entry per attention: the head splits whose heads ended up the same classes (Q, K and
    V of one attention are joined by its MatMuls), named after the output projection, the first
    weight that reads exactly those classes (else the first that makes them)."""
    found: dict[bytes, Heads] = {}
    for node, ids, head_dim in walk.head_splits:
        classes = label[ids]
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


def _groups(graph: ChannelGraph) -> list[Group]:
    """Layers joined when they share a class: the coupled units the report lists."""
    if not graph.layers:
        return []
    layer_of = np.concatenate(
        [np.full(len(layer.classes), i, dtype=np.int64) for i, layer in enumerate(graph.layers)]
    )
    classes = np.concatenate([layer.classes for layer in graph.layers])
    order = np.lexsort((layer_of, classes))
    same = classes[order][1:] == classes[order][:-1]
    a, b = layer_of[order][:-1][same], layer_of[order][1:][same]
    root = components(len(graph.layers), a, b)
    groups = []
    for r in np.unique(root):
        members = np.flatnonzero(root == r)
        cls = np.unique(np.concatenate([graph.layers[i].classes for i in members]))
        frozen = graph.frozen[cls]
        texts = [graph.reasons[i] for i in np.unique(graph.reason[cls]) if i >= 0]
        groups.append(Group([int(i) for i in members], cls, int(frozen.sum()), texts))
    return groups


def freeze_layers(graph: ChannelGraph, layers: list[int], reason: str) -> None:
    """Freeze the channels of these layers (e.g. --exclude), recording why, and regroup."""
    if not layers:
        return
    classes = np.unique(np.concatenate([graph.layers[i].classes for i in layers]))
    if reason not in graph.reasons:
        graph.reasons.append(reason)
    fresh = classes[graph.reason[classes] < 0]
    graph.reason[fresh] = graph.reasons.index(reason)
    graph.frozen[classes] = True
    graph.groups = _groups(graph)
