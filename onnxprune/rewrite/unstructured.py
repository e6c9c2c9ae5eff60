"""Zero the weights a plan selects. Only the pruned tensors change; the graph stays as it was.

Each pruned tensor is computed from the original when it is read (by the saver, the checker or
ONNX Runtime), and written to disk chunk by chunk: no pruned copy of the model, nor of a whole
tensor, is ever held in memory while saving, so external data streams through in bounded memory.
A quantized weight's q gets the zero point of each pruned entry (its value is then exactly 0);
the plan's masks come from its dequantized values, chunk by chunk alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np
import onnx_ir as ir

from onnxprune.core.quantized import DequantizedTensor
from onnxprune.core.tensors import flat_view
from onnxprune.selection import LayerPlan, Plan, layer_masks


def zeroed(values: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`values` with +0.0 where `mask` is set: the bits times 0 or 1, ten times np.where's speed.

    `out` (same dtype, at least values.size) receives the result without a new allocation.
    """
    bits = np.dtype(f"u{values.dtype.itemsize}")
    target = None if out is None else out[: values.size].view(bits)
    return np.multiply(values.view(bits), ~mask, dtype=bits, out=target).view(values.dtype)


def pruned_array(layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's weights with the planned elements set to zero, in the original dtype."""
    out = np.empty(layer.weight.size, dtype=np.dtype(source.dtype.numpy()))
    for where, values, mask in layer_masks(layer, source, keys):
        zeroed(values, mask, out=out[where])
    return out.reshape(layer.weight.shape)


class Rewritten(ir.LazyTensor):
    """A tensor a rewrite computes from the one it replaced (`source`), when read."""

    __slots__ = ("source",)


def before_rewrite(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """The tensor a rewrite replaced (itself where none did): repair reads the dense weights."""
    while isinstance(tensor, Rewritten):
        tensor = tensor.source
    return tensor


class PrunedTensor(Rewritten):
    """A pruned weight: computed from its source when read, streamed when written to a file."""

    __slots__ = ("_keys", "_layer", "_source")

    def __init__(self, layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> None:
        super().__init__(
            lambda: ir.Tensor(self.array(), dtype=source.dtype),
            dtype=source.dtype,
            shape=source.shape,
            name=layer.weight.name,
        )
        self._layer, self._source, self._keys = layer, source, keys
        self.source = source

    def array(self) -> np.ndarray:
        return pruned_array(self._layer, self._source, self._keys)

    def chunks(self) -> Iterator[np.ndarray]:
        """The pruned values chunk by chunk, the next one pruned on a helper thread meanwhile.

        Whatever consumes a chunk (a write into the page cache or a staging block) and numpy's
        work both release the GIL, so the two overlap on two cores. Two chunk buffers alternate,
        reused throughout; a yielded chunk is valid until the next one is requested.
        """
        masks = layer_masks(self._layer, self._source, self._keys)
        buffers: list[np.ndarray] = []

        def prune_next(slot: int) -> np.ndarray | None:
            item = next(masks, None)
            if item is None:
                return None
            _, values, mask = item
            if len(buffers) <= slot:
                buffers.append(np.empty(values.size, dtype=values.dtype))
            return zeroed(values, mask, out=buffers[slot])

        with ThreadPoolExecutor(max_workers=1) as helper:
            slot = 0
            ahead = helper.submit(prune_next, slot)
            while (chunk := ahead.result()) is not None:
                slot ^= 1
                ahead = helper.submit(prune_next, slot)
                yield chunk

    def tofile(self, file: BinaryIO) -> None:
        for chunk in self.chunks():
            file.write(chunk.view(np.uint8).data)


def pruned_quantized(
    layer: LayerPlan, stored: ir.TensorProtocol, keys: np.dtype
) -> Iterator[np.ndarray]:
    """A quantized layer's q (`stored`, the original), chunk by chunk, with the planned entries
    at their zero points."""
    quant = layer.weight.quant
    assert quant is not None
    q = flat_view(stored)
    for where, _, mask in layer_masks(layer, DequantizedTensor(stored, quant), keys):
        start = where.start or 0
        yield quant.with_zero_points(q[start : start + mask.size], mask, start)


class PrunedQuantized(PrunedTensor):
    """A pruned quantized weight (a byte or more per element: int8, uint8, int16, uint16): q
    (`source`) with the planned entries at their zero points, computed when read, streamed
    chunk by chunk when written."""

    __slots__ = ()

    def array(self) -> np.ndarray:
        return quantized_array(self._layer, self._source, self._keys)

    def chunks(self) -> Iterator[np.ndarray]:
        return pruned_quantized(self._layer, self._source, self._keys)


def quantized_array(layer: LayerPlan, source: ir.TensorProtocol, keys: np.dtype) -> np.ndarray:
    """The layer's q with the planned entries at their zero points, whole."""
    pieces = list(pruned_quantized(layer, source, keys))
    return np.concatenate(pieces).reshape(layer.weight.shape)


def apply_plan(model: ir.Model, plan: Plan) -> ir.Model:
    """Replace every changed weight of `model` (in place) by its pruned version; returns `model`."""
    ZeroWeightsPass(plan)(model)
    return model


class ZeroWeightsPass(ir.passes.InPlacePass):
    """Zero the weights a plan selects: each pruned tensor is computed from the original when
    read and streamed when written, so no pruned copy of the model is held."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = [layer for layer in self.plan.layers if layer.changed]
        for layer in changed:
            _zero(layer, self.plan.keys)
        return ir.passes.PassResult(model, modified=bool(changed))


def _zero(layer: LayerPlan, keys: np.dtype) -> None:
    weight = layer.weight
    if weight.quant is not None:
        source = weight.stored()
        if weight.dtype.bitwidth % 8 == 0:
            weight.set_tensor(PrunedQuantized(layer, source, keys))
        else:  # packed sub-byte q (int4): written whole by onnx-ir, not streamed in chunks
            array = quantized_array(layer, source, keys)
            weight.set_tensor(ir.Tensor(array, dtype=weight.dtype))
    else:
        weight.set_tensor(PrunedTensor(layer, weight.tensor(), keys))
