"""Zero the weights a plan selects. Only the pruned tensors change; the graph stays as it was.

Each pruned tensor is computed from the original when it is read (by the saver, the checker or
ONNX Runtime), and written to disk chunk by chunk: no pruned copy of the model, nor of a whole
tensor, is ever held in memory while saving, so external data streams through in bounded memory.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx_ir as ir

from onnxprune.selection import LayerPlan, Plan, layer_masks


def zeroed(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`values` with +0.0 where `mask` is set: the bits times 0 or 1, ten times np.where's speed."""
    bits = np.dtype(f"u{values.dtype.itemsize}")
    return np.multiply(values.view(bits), ~mask, dtype=bits).view(values.dtype)


def pruned_array(layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's weights with the planned elements set to zero, in the original dtype."""
    out = np.empty(layer.weight.size, dtype=np.dtype(source.dtype.numpy()))
    for where, values, mask in layer_masks(layer, source, keys):
        out[where] = zeroed(values, mask)
    return out.reshape(layer.weight.shape)


class PrunedTensor(ir.LazyTensor):
    """A pruned weight: computed from its source when read, streamed when written to a file."""

    __slots__ = ("_keys", "_layer", "_source")

    def __init__(self, layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> None:
        super().__init__(
            lambda: ir.Tensor(pruned_array(layer, source, keys), dtype=source.dtype),
            dtype=source.dtype,
            shape=source.shape,
            name=layer.weight.name,
        )
        self._layer, self._source, self._keys = layer, source, keys

    def tofile(self, file: BinaryIO) -> None:
        for _, values, mask in layer_masks(self._layer, self._source, self._keys):
            file.write(zeroed(values, mask).view(np.uint8).data)


def apply_plan(model: ir.Model, plan: Plan) -> ir.Model:
    """Replace every changed weight of `model` (in place) by its pruned version; returns `model`."""
    for layer in plan.layers:
        if layer.changed:
            layer.weight.set_tensor(PrunedTensor(layer, layer.weight.tensor(), plan.keys))
    return model
