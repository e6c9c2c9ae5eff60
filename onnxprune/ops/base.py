"""What every op family declares with, and the small helpers their declarations share.

`OpInfo` is one op's entry in the registry (`onnxprune.ops`). The stages that read it never hand
their own objects to ops: a channel rule sees the walk through `ChannelWalk`, a fix sees the plan
through `Kept` and the new constants through `Constants`, shape folding gives `RunDims`, a design
reads a weight through `WeightLike`/`UseLike`. So ops imports no stage, and every stage imports
ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import const_tensor

# -- what the stages look like from here -----------------------------------------------------


class Unsupported(Exception):
    """A channel rule cannot follow channels through this node; the message says why."""


class ChannelWalk(Protocol):
    """What a channel rule uses of the walk (`channels.Walk`): reading shapes, constants and the
    channel spaces found so far, and recording spaces, links, freezes and fixes."""

    model: ir.Model
    heads: bool  # attention heads as channel classes (see shape.reshape)

    def const(self, value: ir.Value | None) -> np.ndarray | None: ...
    def is_const(self, value: ir.Value | None) -> bool: ...
    def shape(self, value: ir.Value | None) -> list[int | None] | None: ...
    def named_shape(self, value: ir.Value | None) -> list[int | str | None] | None: ...
    def rank(self, value: ir.Value | None) -> int | None: ...
    def dim(self, value: ir.Value, axis: int) -> int | None: ...
    def ids(self, value: ir.Value | None, axis: int) -> np.ndarray | None: ...
    def spaces_of(self, value: ir.Value | None) -> dict[int, np.ndarray]: ...
    def space(self, value: ir.Value, axis: int, role: str, node: ir.Node) -> np.ndarray: ...
    def union(self, a: np.ndarray, b: np.ndarray) -> None: ...
    def set(self, value: ir.Value, axis: int, ids: np.ndarray) -> None: ...
    def carry(
        self, src: ir.Value, dst: ir.Value, axis_map: dict[int, int] | None = None
    ) -> None: ...
    def freeze(self, ids: np.ndarray, reason: str) -> None: ...
    def head_split(self, node: ir.Node, heads: np.ndarray, head_dim: int) -> None: ...
    def new(self, n: int) -> np.ndarray: ...
    def depend(self, parents: np.ndarray, children: np.ndarray) -> None: ...
    def fix(self, fix: Fix) -> None: ...
    def entries(self, value: ir.Value) -> list[int | None] | None: ...
    def dead(self, value: ir.Value) -> Dead | None: ...


Rule = Callable[[ir.Node, ChannelWalk], None]


@dataclass(frozen=True, eq=False)
class Dead:
    """What a removed channel holds in a tensor, as an expression: zero (no node, no value), a
    tensor without the channel that broadcasts along it (`value`, used as it is: a mean), or
    `node` applied to its inputs' expressions (an input the node does not have is None)."""

    node: ir.Node | None = None
    inputs: tuple[Dead | None, ...] = ()
    value: ir.Value | None = None

    @property
    def zero(self) -> bool:
        return self.node is None and self.value is None


ZERO = Dead()

# How one op's output holds a removed channel, from what its inputs hold (`ChannelWalk.dead`);
# None where it cannot tell (the walk then refuses what needs it).
DeadRule = Callable[[ir.Node, ChannelWalk], Dead | None]
# Where an output axis's entries come from, one to one: (input, axis) pairs; [] where the op
# makes the axis itself (Expand broadcasting along it); None where it cannot tell.
SourcesRule = Callable[[ir.Node, int, ChannelWalk], list[tuple[int, int]] | None]


class Kept(Protocol):
    """What a fix needs of a channel plan (`selection.channels.ChannelPlan`)."""

    removed: np.ndarray  # bool per channel class

    def kept_of(self, ids: np.ndarray) -> int: ...


class Constants(Protocol):
    """Where a fix puts a changed constant input (`rewrite.constants.NodeConstants`): a new one
    for that node alone, since exporters share shape constants between nodes."""

    def replace(self, node: ir.Node, index: int, array: np.ndarray) -> None: ...


@dataclass(eq=False)
class Fix:
    """A node whose attributes or shape constants count channels: after channel removal,
    `apply` rewrites them to the counts kept. The fields holding numpy arrays are channel ids
    (the walk's, then the class labels `relabel` maps them to)."""

    node: ir.Node
    kind: ClassVar[str] = ""

    def relabel(self, label: np.ndarray) -> Fix:
        """The same fix with every ids array (or tuple of them) mapped through `label`."""
        changes: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, np.ndarray):
                changes[item.name] = label[value]
            elif isinstance(value, tuple) and value and isinstance(value[0], np.ndarray):
                changes[item.name] = tuple(label[ids] for ids in value)
        return dataclasses.replace(self, **changes)

    def apply(self, kept: Kept, consts: Constants) -> None:
        raise NotImplementedError


class RunDims(Protocol):
    """Shape folding's view of one run of the stand-ins (`channels.shapemath`): a value's dims
    (symbolic ones at their stand-ins) and a small computed tensor's value."""

    def dims(self, value: ir.Value | None) -> list[int] | None: ...
    def value(self, value: ir.Value) -> np.ndarray | None: ...


# Dims of a value for counting MACs: a tuple of positive ints, or None where not known.
Dims = Callable[[ir.Value | None], tuple[int, ...] | None]


class UseLike(Protocol):
    """One consumer of a weight (`weights.Use`); axes index the stored tensor."""

    node: ir.Node
    input_index: int
    out_axis: int | None
    in_axis: int | None
    via: tuple[str, ...]


class WeightLike(Protocol):
    """A prunable weight (`weights.Weight`) as a design reads it."""

    shape: tuple[int, ...]
    dtype: ir.DataType
    quant: Any

    @property
    def uses(self) -> Sequence[UseLike]: ...


@dataclass(frozen=True)
class Design:
    """One use of a weight seen as a (grouped) matrix product: the weight as matrices W [G, O, K]
    (G groups, O output features per group, K input features per group) and, for a batch of the
    layer's input activation, rows X [G, n, K] such that X[g] @ W[g].T is the layer's output for
    group g (bias left out). Calibration statistics and every reconstruction work in this layout,
    so the solvers never need to know which op they serve.

    `signature` identifies designs that give the same rows from the same activation, so layers
    that read one tensor the same way (attention's Q, K and V) share one set of statistics.
    """

    activation: ir.Value  # the layer's input that X is built from
    groups: int
    out_features: int  # per group
    in_features: int  # per group
    signature: tuple
    # activation -> chunks of X [G, n, K]; sample=True: the rows statistics use (a Conv keeps at
    # most statistic_positions(K) output positions per sample)
    rows: Callable[..., list[np.ndarray]]
    to_matrix: Callable[[np.ndarray], np.ndarray]  # stored weight -> [G, O, K]
    from_matrix: Callable[[np.ndarray], np.ndarray]  # [G, O, K] -> stored layout
    out_axis: int  # axis of the node's output that carries the G*O output features (bias axis)
    layout: tuple  # what to_matrix does; uses of one shared weight must agree on it
    # column blocks each group's K was cut into (calibration.capture.column_blocks: a layer too
    # wide for its full statistics); G = the op's groups x blocks, each block solved alone
    blocks: int = 1


def statistic_positions(k: int) -> int:
    """Output positions per sample a Conv's statistics use: 8 rows per input feature, at least
    1024 (ResNet-50's stem, 147 inputs at 112x112 = 12,544 positions, keeps 1,176; a 28x28 map
    keeps all). Fewer rows than that estimate X^T X no worse than the samples themselves allow."""
    return max(8 * k, 1024)


# -- one op's entry ------------------------------------------------------------------------------

AxesOf = Callable[[ir.Node, int, int], tuple[int | None, int | None] | None]
MacsOf = Callable[[ir.Node, Dims], int | None]
DesignOf = Callable[[WeightLike, UseLike], Design | None]
OutputDims = Callable[[ir.Node, RunDims], list[int] | None]
# A stored tensor's axes through an op that only cuts, places or adds unit axes to its values:
# (node, input index, axis map of that input) -> one axis map per output, or None. An axis map
# lists, per axis of a value, the stored tensor's axis it is (None: an inserted unit axis).
AxisMap = list[int | None]
ViewOf = Callable[[ir.Node, int, AxisMap], list[AxisMap] | None]


@dataclass(frozen=True)
class OpInfo:
    """Everything onnxprune knows of one op type; each field is optional.

    - weight_inputs, weight_axes: the inputs that may hold a prunable weight, and (out_axis,
      in_axis) of a stored tensor of a given rank in one of them as the node reads it (None:
      no weight there).
    - rule: how channels flow through the node (the channel walk); an op without one freezes
      every channel it touches.
    - macs: dense multiply-accumulates at given dims.
    - design / no_design: how a use of a weight turns its input into calibration rows, or why
      its weights get none.
    - output_dims: its first output's dims in one run of shape folding's stand-ins.
    - folded_inputs: computed integer inputs the walk needs constant (folded before it).
    - view: how a stored tensor's axes pass through the op where it only rearranges pieces of
      it (Slice, Concat, Split, a Gather of stored indices, Unsqueeze, Squeeze): finding
      weights follows a constant through such views to the weight slot that reads it.
    - dead: what its output holds in a removed channel, from what its inputs hold (ops/dead.py).
    - sources: where an output axis's entries come from (the walk gives a computed tensor the
      channels of the stored tensors it is made of, as RoPE's cos and sin of inv_freq).
    """

    op_type: str
    domain: str = ""
    weight_inputs: tuple[int, ...] = ()
    weight_axes: AxesOf | None = None
    rule: Rule | None = None
    macs: MacsOf | None = None
    design: DesignOf | None = None
    no_design: str | None = None
    output_dims: OutputDims | None = None
    folded_inputs: tuple[int, ...] = ()
    view: ViewOf | None = None
    dead: DeadRule | None = None
    sources: SourcesRule | None = None


def declare(op_types: Sequence[str], **fields: Any) -> tuple[OpInfo, ...]:
    """One OpInfo per op type, all with the same `fields`."""
    return tuple(OpInfo(op, **fields) for op in op_types)


# -- helpers the families share ------------------------------------------------------------------


def attr(node: ir.Node, name: str, default: Any) -> Any:
    """An attribute's value, or `default` where the node does not set it."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def attr_int(node: ir.Node, name: str, default: int) -> int:
    found = node.attributes.get(name)
    return int(found.value) if found is not None else default


def attr_ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    found = node.attributes.get(name)
    return [int(v) for v in found.value] if found is not None else list(default)


def attr_float(node: ir.Node, name: str, default: float) -> float:
    found = node.attributes.get(name)
    return float(found.value) if found is not None else default


def attr_str(node: ir.Node, name: str, default: str) -> str:
    found = node.attributes.get(name)
    if found is None:
        return default
    value = found.value
    return value.decode() if isinstance(value, bytes) else str(value)


def node_opset(node: ir.Node) -> int | None:
    """The default domain's version of the graph `node` sits in (None where that graph imports
    none: a body's nodes; channel rewrites change main-graph nodes only)."""
    graph = node.graph
    imports = {} if graph is None else graph.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    return None if version is None else int(version)


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """Input `index`, None where the node has fewer inputs."""
    return node.inputs[index] if index < len(node.inputs) else None


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def const_ints(ctx: ChannelWalk, node: ir.Node, index: int, name: str) -> list[int] | None:
    """Integers given as an input constant (newer opsets) or an attribute (older ones)."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = ctx.const(node.inputs[index])
        if array is None:
            raise Unsupported(f"input {index} is computed, not a constant")
        return [int(x) for x in np.asarray(array).reshape(-1)]
    value = attr(node, name, None)
    return None if value is None else [int(x) for x in value]


def only_axes(ctx: ChannelWalk, value: ir.Value, allowed: set[int], why: str) -> None:
    """Refuse channels on any axis of `value` but `allowed`."""
    for axis in ctx.spaces_of(value):
        if axis not in allowed:
            raise Unsupported(f"channels on axis {axis} {why}")


def carrier(grid: np.ndarray) -> int | None:
    """The one axis of `grid` along which its values vary (they are constant along the rest)."""
    for j in range(grid.ndim):
        line = grid[tuple(slice(None) if i == j else 0 for i in range(grid.ndim))]
        shaped = [1] * grid.ndim
        shaped[j] = -1
        if np.array_equal(np.broadcast_to(line.reshape(shaped), grid.shape), grid):
            return j
    return None


def stored_ints(node: ir.Node, index: int) -> np.ndarray:
    """A node's stored integer input, flat, as a copy to change (what a fix rewrites)."""
    tensor = const_tensor(node.inputs[index])
    assert tensor is not None, f"{node.name}: input {index} is no constant"
    return np.array(tensor.numpy(), copy=True).reshape(-1)


def broadcast_dims(shapes: list[list[int]]) -> list[int]:
    """Multidirectional broadcasting; where two operands disagree (two names for one runtime
    size, as a valid model has), the first operand's stands."""
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        entries = [s[k - (rank - len(s))] for s in shapes if k >= rank - len(s)]
        out.append(next((e for e in entries if e != 1), 1))
    return out


def broadcast_exact(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """Multidirectional broadcasting of two known shapes; None where they do not broadcast."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    out = []
    for i, j in zip(a, b, strict=True):
        if i != j and 1 not in (i, j):
            return None
        out.append(max(i, j))
    return tuple(out)


def same_dims(node: ir.Node, run: RunDims) -> list[int] | None:
    """Output dims of an op whose output has the dims of its first input."""
    return run.dims(node.inputs[0])
