"""Zero the weights a plan selects. Only the pruned tensors change; the graph stays as it was.

Each pruned tensor becomes a lazy tensor computed from the original when it is read (by the saver,
the checker or ONNX Runtime), so no pruned copy of the model is ever held in memory as a whole:
memory-mapped external data streams through one tensor at a time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxprune.selection import LayerPlan, Plan, layer_masks


def pruned_array(layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's weights with the planned elements set to zero, in the original dtype."""
    array = source.numpy()
    flat = array.reshape(-1)
    out = np.empty_like(flat)
    zero = np.zeros((), dtype=array.dtype)
    for where, mask in layer_masks(layer, array, keys):
        out[where] = np.where(mask, zero, flat[where])
    return out.reshape(array.shape)


def apply_plan(model: ir.Model, plan: Plan) -> ir.Model:
    """Replace every changed weight of `model` (in place) by its pruned version; returns `model`."""
    for layer in plan.layers:
        if not layer.changed:
            continue
        source = layer.weight.tensor()

        def compute(layer: LayerPlan = layer, source: ir.TensorProtocol = source) -> ir.Tensor:
            return ir.Tensor(pruned_array(layer, source, plan.keys), dtype=source.dtype)

        layer.weight.set_tensor(ir.LazyTensor(compute, dtype=source.dtype, shape=source.shape))
    return model
