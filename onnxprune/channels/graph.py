"""What channel analysis finds: the result types of `build` and the helpers that read them.

Every (value, axis) that carries channels has an array of class labels, one per index along that
axis; a *class* is every index, anywhere in the model, that stands for one channel. Members are
the stored tensors sliced with their classes, layers the producers that make them, groups the
layers that share classes (what the report shows and --round-to rounds together).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.core import quantized
from onnxprune.core.tensors import const_tensor
from onnxprune.ops import Fix

# Member roles. out/in: a weight's output/input-channel axis; bias: the producer's bias; scale and
# shift: per-channel carrier parameters (a dead channel has its shifts zero); param: anything else.
ROLES = ("out", "in", "bias", "scale", "shift", "param")
# The roles whose entries are zero in a dead channel (the zero-channel invariant), a scale that
# divides excepted: its producer's weight and bias, its shifts and multiplying scales.
ZEROED_ROLES = ("out", "bias", "shift", "scale")


@dataclass(frozen=True, eq=False)
class Member:
    """A stored tensor sliced along `axis`: index i goes when id `ids[i]` is removed."""

    role: str
    value: ir.Value  # an initializer, or the output of a Constant node
    axis: int
    ids: np.ndarray
    node: ir.Node  # the node that reads it


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
    # every (class, index into `reasons`) a freeze recorded, not only the first reason of each
    # class (`reason`): a group names all the constraints that hold it
    freeze_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def reasons_of(self, classes: np.ndarray) -> list[str]:
        """Every reason that froze some of `classes`, the one freezing most of them first."""
        if not len(self.freeze_pairs):
            return [self.reasons[i] for i in np.unique(self.reason[classes]) if i >= 0]
        held = np.isin(self.freeze_pairs[:, 0], classes)
        found, counts = np.unique(self.freeze_pairs[held, 1], return_counts=True)
        order = np.lexsort((found, -counts))
        return [self.reasons[int(found[i])] for i in order]

    # (parent of each copy, the copies): GQA's key/value heads and the query heads that read
    # them; a parent is removed exactly when all its copies are (settle)
    depends: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def produced(self) -> np.ndarray:
        """Bool per class: some producer makes it (so zeroing its weights kills the channel)."""
        mask = np.zeros(self.n_classes, dtype=bool)
        for layer in self.layers:
            mask[layer.classes] = True
        return mask

    @property
    def derived(self) -> np.ndarray:
        """Bool per class: removed with its copies only (a GQA key/value head), not chosen."""
        mask = np.zeros(self.n_classes, dtype=bool)
        for parents, _ in self.depends:
            mask[parents] = True
        return mask

    @property
    def prunable(self) -> np.ndarray:
        return self.produced & ~self.frozen & ~self.derived

    def settle(self, removed: np.ndarray) -> np.ndarray:
        """`removed` with each derived class removed exactly when all its copies are (a key/value
        head whose query heads all go goes too; one a query head still reads stays)."""
        if not self.depends:
            return removed
        derived = self.derived
        needed = np.zeros(self.n_classes, dtype=bool)
        for parents, children in self.depends:
            needed[parents[~removed[children]]] = True
        out = removed.copy()
        out[derived] = ~needed[derived] & ~self.frozen[derived]
        return out


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


def group_layers(graph: ChannelGraph) -> list[Group]:
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
        groups.append(
            Group([int(i) for i in members], cls, int(frozen.sum()), graph.reasons_of(cls))
        )
    return groups


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
