"""Add a per-output-feature shift to a layer's bias, creating the bias where there is none.

Bias correction (calibration) and constant compensation need the same edit: Conv gets its
optional bias input, Gemm its C, a MatMul the constant of the Add that follows it (as exporters
write a Linear) (`fold_bias`), or, for constant compensation only, a new Add where there is none
to reuse (`shift_bias`). A shared bias is never edited in place: the node gets a new constant of
its own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import const_tensor
from onnxprune.rewrite.constants import NodeConstants


def _shaped(delta: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """delta laid along `axis` of a tensor of `rank` dims (other dims 1), for broadcasting."""
    axis = axis % rank
    shape = [1] * rank
    shape[axis] = delta.size
    return delta.reshape(shape)


def _add_after(model: ir.Model, node: ir.Node, term: np.ndarray) -> ir.Value:
    """Insert y' = y + term after the node's first output and move every reader of y to y'."""
    y = node.outputs[0]
    readers = list(y.uses())
    name = f"{y.name}_bias"
    value = ir.Value(name=name, shape=ir.Shape(term.shape), type=ir.TensorType(_dtype(term)))
    value.const_value = ir.Tensor(term, name=name)
    while value.name in model.graph.initializers:
        value.name = f"{value.name}_"
    model.graph.register_initializer(value)
    add = ir.node("Add", inputs=[y, value], name=f"{node.name or node.op_type}_bias_add")
    out = add.outputs[0]
    out.shape, out.type = y.shape, y.type
    model.graph.insert_after(node, add)
    for usage in readers:
        usage.node.replace_input_with(usage.idx, out)
    outputs = model.graph.outputs
    for i, graph_output in enumerate(outputs):
        if graph_output is y:
            outputs[i] = out
            original = y.name
            y.name = f"{original}_unbiased"
            out.name = original
    if not out.name:
        out.name = f"{y.name}_biased"
    return out


def _dtype(array: np.ndarray) -> ir.DataType:
    return ir.DataType.from_numpy(array.dtype)


def shift_bias(
    model: ir.Model,
    node: ir.Node,
    delta: np.ndarray,
    out_axis: int,
    dtype: np.dtype,
    consts: NodeConstants,
) -> ir.Value | None:
    """Add `delta` (one value per output feature, along `out_axis` of the node's output), in
    the node's bias where it has a place for one (`fold_bias`), else in an Add inserted after it.

    Returns the new output that the node's readers now read when an Add had to be inserted.
    """
    if fold_bias(node, delta, out_axis, dtype, consts):
        return None
    delta = np.asarray(delta, dtype=np.float64)
    if node.op_type in ("Conv", "ConvTranspose"):
        term = _shaped(delta, 1, 2 + _spatial(node))
    else:
        y = node.outputs[0]
        rank = len(y.shape) if y.shape is not None else max(2, -out_axis)
        term = _shaped(delta, out_axis, min(rank, -out_axis) if out_axis < 0 else rank)
    return _add_after(model, node, term.astype(dtype))


def fold_bias(
    node: ir.Node, delta: np.ndarray, out_axis: int, dtype: np.dtype, consts: NodeConstants
) -> bool:
    """Add `delta` to the bias the node already has a place for: a Conv's bias input (given or
    not), a Gemm's C (with beta != 0), the constant of the Add that follows a MatMul (as
    exporters write a Linear). False, nothing changed, where a new node would be needed."""
    delta = np.asarray(delta, dtype=np.float64)
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        old = const_tensor(node.inputs[2]) if len(node.inputs) > 2 else None
        if old is None and len(node.inputs) > 2 and node.inputs[2] is not None:
            return False
        base = np.zeros(delta.size) if old is None else old.numpy().astype(np.float64)
        consts.replace(
            node, 2, (base + delta).astype(old.dtype.numpy() if old is not None else dtype)
        )
        return True
    if op == "Gemm":
        beta_attr = node.attributes.get("beta")
        beta = float(beta_attr.value) if beta_attr is not None else 1.0
        if beta == 0:  # C is ignored: the shift needs an Add of its own
            return False
        term = _shaped(delta / beta, out_axis, 2)
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        old = const_tensor(node.inputs[2]) if has_c else None
        if has_c and old is None:
            return False
        base = np.zeros((1, 1)) if old is None else old.numpy().astype(np.float64)
        merged = base + term
        if merged.shape[0] == 1 and (old is None or len(old.shape) == 1):
            # one row broadcast over the batch: C stays 1-D as exporters write it (tools that
            # read C per output, onnxruntime.quantization's bias quantizer, want it so)
            merged = merged.reshape(-1)
        consts.replace(node, 2, merged.astype(old.dtype.numpy() if old is not None else dtype))
        return True
    # MatMul: reuse the constant of a following Add that holds one value per output feature
    y = node.outputs[0]
    readers = list(y.uses())
    rank = len(y.shape) if y.shape is not None else max(2, -out_axis)
    term = _shaped(delta, out_axis, min(rank, -out_axis) if out_axis < 0 else rank)
    if len(readers) == 1 and not y.is_graph_output():
        add, index = readers[0].node, readers[0].idx
        if add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            other = add.inputs[1 - index]
            old = const_tensor(other)
            if old is not None:
                base = old.numpy().astype(np.float64)
                merged = base + term
                if merged.shape == base.shape:
                    consts.replace(add, 1 - index, merged.astype(old.dtype.numpy()))
                    return True
    return False


def _spatial(node: ir.Node) -> int:
    weight = node.inputs[1]
    if weight is not None and weight.shape is not None:
        return max(0, len(weight.shape) - 2)
    return 2
