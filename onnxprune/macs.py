"""Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at known shapes (each op's count
is the op registry's).

`node_macs` is the one counter: validation's totals (metrics.count_macs) and the structured
planner's MACs per weight element (selection.channels) both come from it. Validation counts at the
shapes it runs: `resolve_shapes` forgets every shape a file declares for a computed value (a
value_info that copied a -1 batch is not a size), sets the inputs' real shapes, and alternates
ONNX shape inference with evaluating the small integer tensors exporters compute shapes from
(Shape -> Gather -> Unsqueeze -> Slice), until every shape that can be known is known. A node whose
shapes stay unknown is listed, never guessed, and a total with such nodes is a lower bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune.core.folding import fold_constants
from onnxprune.core.graphs import infer_shapes
from onnxprune.core.tensors import const_tensor
from onnxprune.ops import MAC_OPS, node_macs  # the ops with a MAC count, and the one counter
from onnxprune.ops.base import attr, broadcast_exact, input_at


def known_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    """Dims of a stored tensor or of a value whose inferred shape is all positive numbers."""
    if value is None:
        return None
    tensor = const_tensor(value)
    if tensor is not None:
        return tuple(int(d) for d in tensor.shape)
    shape = value.shape
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None  # a symbolic dim, or a -1 / 0 a file wrote where it meant "any"
    return tuple(int(d) for d in shape)


# ---------------------------------------------------------------------------------------------
# shapes at given input shapes

# Ops exporters compute shapes with; evaluated when their inputs are known and small.
SHAPE_OPS = frozenset(
    {"Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity",
     "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Equal", "Less", "Greater",
     "Not", "And", "Or", "Where", "Max", "Min", "ConstantOfShape", "Reshape", "Range", "Expand",
     "Pow", "Sqrt", "ReduceProd", "Constant"}
)  # fmt: skip
# Tensors larger than this are data, not shape arithmetic: never evaluated.
MAX_ELEMENTS = 4096
ROUNDS = 8


def _forget_shapes(model: ir.Model) -> None:
    """Drop what the file says about computed values (value_info, output shapes): inference at
    the given shapes decides them, and a stale or -1 entry would otherwise stand."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            for value in node.outputs:
                value.shape = None


def _infer(model: ir.Model) -> None:
    logging.getLogger("onnx_ir").disabled = True  # a failure only leaves some shapes unknown
    try:
        infer_shapes(model, strict=False)
    finally:
        logging.getLogger("onnx_ir").disabled = False


def _size_ok(node: ir.Node, args: list[np.ndarray | None]) -> bool:
    """Whether evaluating `node` on `args` makes at most MAX_ELEMENTS elements (checked before)."""
    op = node.op_type
    present = [a for a in args if a is not None]
    if any(a.size > MAX_ELEMENTS for a in present):
        return False
    if op == "ConstantOfShape":
        return bool(present) and math.prod(int(d) for d in present[0].reshape(-1)) <= MAX_ELEMENTS
    if op == "Expand" and len(present) == 2:
        target = broadcast_exact(present[0].shape, tuple(int(d) for d in present[1].reshape(-1)))
        return target is not None and math.prod(target) <= MAX_ELEMENTS
    if op == "Range" and len(present) == 3:
        start, limit, delta = (float(a.reshape(-1)[0]) for a in present)
        return delta != 0 and math.ceil((limit - start) / delta) <= MAX_ELEMENTS
    return True


def _evaluate(node: ir.Node, args: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """One node on numpy arguments with ONNX's reference implementation; None if it fails."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [v.name if v is not None else "" for v in node.inputs]
    feeds = {n: a for n, a in zip(names, args, strict=True) if n and a is not None}
    try:
        outputs = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
    except Exception:
        return None
    return [np.asarray(o) for o in outputs]


def _shape_values(
    model: ir.Model, input_values: Mapping[str, np.ndarray]
) -> Iterator[tuple[ir.Node, int, np.ndarray]]:
    """(node, input index, value) for each computed input of the main graph that the known
    shapes (and the inputs of known value) make a small constant, in graph order."""
    opset = model.opset_imports.get("", 17)
    known: dict[ir.Value, np.ndarray] = {
        v: np.asarray(input_values[v.name]) for v in model.graph.inputs if v.name in input_values
    }

    def value_of(value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        if value in known:
            return known[value]
        tensor = const_tensor(value)
        if tensor is None or tensor.size > MAX_ELEMENTS:
            return None
        return tensor.numpy()

    for node in model.graph:
        for index, value in enumerate(node.inputs):
            if value is not None and value in known and const_tensor(value) is None:
                yield node, index, known[value]
        if node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("Shape", "Size"):
            dims = known_dims(input_at(node, 0))
            if dims is None:
                continue
            if node.op_type == "Size":
                known[node.outputs[0]] = np.array(math.prod(dims), dtype=np.int64)
                continue
            rank = len(dims)
            start, end = int(attr(node, "start", 0)), int(attr(node, "end", rank))  # type: ignore[call-overload]
            known[node.outputs[0]] = np.array(dims[start:end], dtype=np.int64)
            continue
        if node.op_type == "Constant":
            continue  # its value is read where it is used
        args = [value_of(v) for v in node.inputs]
        if any(a is None for v, a in zip(node.inputs, args, strict=True) if v is not None):
            continue
        if not _size_ok(node, args):
            continue
        outputs = _evaluate(node, args, opset)
        if outputs is None:
            continue
        for value, array in zip(node.outputs, outputs, strict=False):
            if array.size <= MAX_ELEMENTS:
                known[value] = array


def _fold(model: ir.Model, input_values: Mapping[str, np.ndarray]) -> int:
    """Replace computed inputs that the known shapes make constant by stored tensors; how many."""
    found = list(_shape_values(model, input_values))
    for node, index, array in found:
        name = f"{node.name or node.op_type}_input{index}_at_shape"
        while name in model.graph.initializers:
            name += "_"
        value = node.inputs[index]
        if value is not None and value.dtype is not None:
            array = array.astype(value.dtype.numpy())
        tensor = ir.Tensor(np.array(array, order="C"), name=name)
        const = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        const.const_value = tensor
        model.graph.register_initializer(const)
        node.replace_input_with(index, const)
    return len(found)


def resolve_shapes(
    model: ir.Model,
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Shapes of every value that the given input shapes decide (in place: load a copy).

    Inputs not in `input_shapes` keep their declared shapes. Shape arithmetic that only depends
    on known shapes, and on `input_values` (inputs fed the same value every run: a scalar sample
    rate), is folded into stored tensors, so inference can follow Reshape, Slice and Expand
    targets computed from them, and an If whose condition they decide is counted by its
    branch."""
    _forget_shapes(model)
    for value in model.graph.inputs:
        if value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
    for _ in range(ROUNDS):
        _infer(model)
        # chains of stored constants (torch's Pad amounts) too, which shape arithmetic leaves
        if not _fold(model, input_values or {}) + fold_constants(model):
            break


# ---------------------------------------------------------------------------------------------
# counting a whole model


@dataclass
class MacCount:
    """Dense and non-zero MACs of the nodes that could be counted, and those that could not."""

    dense: int = 0
    nonzero: int = 0
    unknown: list[str] = field(default_factory=list)  # node names, with the reason in `why`
    why: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.unknown


def _name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def _has_macs(graph: ir.Graph) -> bool:
    for node in graph.all_nodes():
        if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx"):
            return True
    return False


def _branch(node: ir.Node) -> bool | None:
    """An If's condition when the known shapes decide it (stored or folded); None otherwise."""
    tensor = const_tensor(input_at(node, 0))
    if tensor is None or tensor.size != 1:
        return None
    return bool(tensor.numpy().reshape(-1)[0])


def count_graph(
    graph: ir.Graph,
    density: Callable[[ir.Node], float],
    count: MacCount,
    scale: int = 1,
) -> None:
    """Add `graph`'s MACs to `count`, `scale` times (the trips of a Loop), subgraphs included.

    An If whose condition is known counts its branch; otherwise the smaller branch counts (a
    lower bound) and the If is unknown. A Loop counts its body times a stored trip count with no
    condition, else only as unknown; a Scan likewise."""
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in MAC_OPS:
            dense = node_macs(node, known_dims)
            if dense is None:
                count.unknown.append(_name(node))
                count.why[_name(node)] = "shapes not known at the shapes run"
                continue
            count.dense += dense * scale
            count.nonzero += round(dense * density(node)) * scale
            continue
        graphs = [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
        if not any(_has_macs(g) for g in graphs):
            continue
        if node.op_type == "If" and len(graphs) == 2:
            taken = _branch(node)
            then_branch, else_branch = (
                node.attributes[k].value for k in ("then_branch", "else_branch")
            )
            if taken is not None:
                count_graph(then_branch if taken else else_branch, density, count, scale)
                continue
            counts = [MacCount(), MacCount()]
            for branch, sub in zip((then_branch, else_branch), counts, strict=True):
                count_graph(branch, density, sub, scale)
            low = min(counts, key=lambda c: c.dense)
            count.dense += low.dense
            count.nonzero += low.nonzero
            count.unknown.append(_name(node))
            count.why[_name(node)] = "If: which branch runs is decided at run time"
            for sub in counts:
                count.unknown += [n for n in sub.unknown if n not in count.unknown]
                count.why.update(sub.why)
            continue
        trips = None
        if node.op_type == "Loop" and input_at(node, 1) is None:
            tensor = const_tensor(input_at(node, 0))
            trips = None if tensor is None else int(tensor.numpy().reshape(-1)[0])
        if trips is not None:
            for sub in graphs:
                count_graph(sub, density, count, scale * max(trips, 0))
            continue
        count.unknown.append(_name(node))
        count.why[_name(node)] = f"{node.op_type}: how often its body runs is decided at run time"
