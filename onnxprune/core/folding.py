"""Evaluating what a graph computes from stored constants (and from inputs fed the same value
in every run): constant folding before the channel walk, and which If branch never runs.

Nodes are evaluated one at a time with onnx's reference implementation at the model's opset,
only where every input is known and small; a node it cannot evaluate stays unknown, and so does
everything after it. Nothing here changes a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.core.graphs import opset_version
from onnxprune.core.tensors import const_tensor

# A node is evaluated when its inputs hold at most this many elements together (a Shape reads
# only its input's dims) and so do its outputs.
INPUT_LIMIT = 1 << 16
# A value a chain of stored constants hands to a node that reads data is stored when it is an
# integer or bool tensor of at most this many elements (it is written with the model where the
# model is written: Pad amounts, axes, shapes; float chains of stored tensors are weights' views,
# left as they are).
STORED_LIMIT = 1 << 12
# Ops never evaluated: their result is not a function of their inputs alone, or they hold a body.
NOT_EVALUATED = frozenset(
    {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
     "Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}
)  # fmt: skip


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    found = node.attributes.get(name)
    return default if found is None else int(found.value)


def _known(value: ir.Value, known: Mapping[ir.Value, np.ndarray]) -> np.ndarray | None:
    array = known.get(value)
    if array is not None:
        return array
    tensor = const_tensor(value)
    if tensor is None or int(np.prod(tensor.shape, dtype=np.int64)) > INPUT_LIMIT:
        return None
    return tensor.numpy()


def evaluate(
    node: ir.Node, known: Mapping[ir.Value, np.ndarray], version: int | None
) -> list[np.ndarray] | None:
    """`node`'s outputs where every input is stored or in `known` (values computed already,
    or inputs fed one value), else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NOT_EVALUATED or not node.inputs:
        return None
    if node.op_type in ("Shape", "Size"):
        source = node.inputs[0]
        tensor = const_tensor(source)
        dims = list(tensor.shape) if tensor is not None else None
        if dims is None and source in known:
            dims = list(known[source].shape)
        if dims is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)]
        start, end = _attr_int(node, "start", 0), _attr_int(node, "end", len(dims))
        return [np.array(dims[slice(start, end)], dtype=np.int64)]
    arrays = []
    total = 0
    for value in node.inputs:
        if value is None:
            arrays.append(None)
            continue
        array = _known(value, known)
        if array is None:
            return None
        total += array.size
        if total > INPUT_LIMIT:
            return None
        arrays.append(array)
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    feeds = {n: a for n, a in zip(proto.input, arrays, strict=True) if n and a is not None}
    try:
        results = ReferenceEvaluator(proto, opsets={"": version or 1}).run(None, feeds)
    except Exception:  # an op or attribute the reference does not evaluate: left unknown
        return None
    results = [np.asarray(r) for r in results]
    if len(results) != len(node.outputs) or any(r.size > INPUT_LIMIT for r in results):
        return None
    return results


def untaken_branches(
    graph: ir.Graph, inputs: Mapping[ir.Value, np.ndarray], version: int | None
) -> list[tuple[ir.Node, str, bool]]:
    """The If branches that never run when the graph's inputs hold `inputs` (values fed the
    same in every run: a sample rate): (the If, its branch not taken, the condition's value),
    an If inside a taken branch included. Where a condition is not decided by them, both
    branches may run and neither is listed."""
    known: dict[ir.Value, np.ndarray] = dict(inputs)
    found: list[tuple[ir.Node, str, bool]] = []
    graphs = [graph]
    while graphs:
        for node in graphs.pop(0):
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                cond = known.get(node.inputs[0]) if node.inputs[0] is not None else None
                if cond is None:
                    cond_tensor = const_tensor(node.inputs[0])
                    cond = None if cond_tensor is None else cond_tensor.numpy()
                if cond is None or np.asarray(cond).size != 1:
                    continue
                taken = bool(np.asarray(cond).reshape(-1)[0])
                found.append((node, "else_branch" if taken else "then_branch", taken))
                branch = node.attributes.get("then_branch" if taken else "else_branch")
                if branch is not None:
                    graphs.append(branch.value)
                continue
            results = evaluate(node, known, version)
            if results is not None:
                known.update(zip(node.outputs, results, strict=True))
    return found


def fold_constants(model: ir.Model) -> int:
    """Evaluate the main graph's nodes fed by stored constants only, and store each small
    integer value such a chain hands to a node that reads data, in place of the chain's output
    (the chain itself is left for unused-node removal). Returns how many values were stored."""
    version = opset_version(model)
    known: dict[ir.Value, np.ndarray] = {}
    for node in model.graph:
        found = evaluate(node, known, version)
        if found is not None:
            known.update(zip(node.outputs, found, strict=True))
    folded = 0
    for value, array in known.items():
        if array.dtype.kind not in "iub" or array.size > STORED_LIMIT or value.is_graph_output():
            continue
        readers = [(u.node, u.idx) for u in value.uses() if u.node.outputs[0] not in known]
        if not readers:
            continue
        name = f"{value.name or 'folded'}_folded"
        while name in model.graph.initializers:
            name += "_"
        tensor = ir.Tensor(np.array(array, order="C"), name=name)  # keeps 0-d as 0-d
        const = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        const.const_value = tensor
        model.graph.register_initializer(const)
        for reader, index in readers:
            reader.replace_input_with(index, const)
        folded += 1
    return folded
