"""Quantized weights: integer tensors stored behind DequantizeLinear, as QDQ models hold them.

onnxruntime.quantization (QDQ format) stores a weight as q (int8, uint8; int4, uint4 or int16 on
request) and computes it as `DequantizeLinear(q, scale, zero_point)`: y = (q - zero_point) x
scale, with one scale and zero point for the whole tensor (per tensor), one per index of `axis`
(per axis, a 1-D scale; `axis` defaults to 1), or one per `block_size` consecutive indices along
`axis` (blocked, opset 21: the scale has q's rank). An entry of q at its zero point dequantizes
to exactly 0, so that is what pruning writes; magnitudes are those of the dequantized values,
|(q - zero_point) x scale| in float32, so quantized and float layers rank on one scale.

This module reads the parameters and dequantizes q chunk by chunk (no float copy of a whole big
tensor is kept); `weights.find_weights` finds the weights, the rewrites write q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

DEQUANTIZE = "DequantizeLinear"
# DequantizeLinear of the ONNX domain, and the contrib op ONNX Runtime writes for types the
# model's opset lacks (int4, int16 before opset 21): the same formula and attributes.
DOMAINS = ("", "ai.onnx", "com.microsoft")
# Stored types pruned: an integer grid with a zero point. Float8 (no zero point in practice)
# and int32 (biases) are not weights to prune.
TYPES = frozenset(
    {
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT4,
        ir.DataType.UINT4,
    }
)
# What the dequantized values are computed and ranked in.
VALUES = ir.DataType.FLOAT


def is_dequantize(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == DEQUANTIZE and node.domain in DOMAINS


def _stored(value: ir.Value | None) -> ir.TensorProtocol | None:
    """An initializer's tensor or a Constant node's value; None for anything computed."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None if value.is_graph_input() else value.const_value
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("value")
    return None if attr is None else attr.value


@dataclass(frozen=True, eq=False)
class Quantization:
    """How a stored q becomes the weight: y = (q - zero_point) x scale."""

    node: ir.Node  # the DequantizeLinear
    dtype: ir.DataType  # q's stored type
    shape: tuple[int, ...]  # q's shape
    scale: np.ndarray  # float32: shape () per tensor, (shape[axis],) per axis, q's rank blocked
    zero_point: np.ndarray  # int64, the scale's shape (zeros where the model gives none)
    axis: int | None  # None per tensor
    block_size: int = 0  # blocked quantization along `axis` (opset 21), else 0

    @property
    def kind(self) -> str:
        if self.axis is None:
            return "per tensor"
        if self.block_size:
            return f"blocks of {self.block_size} along axis {self.axis}"
        return f"per axis {self.axis}"

    def _index(self, positions: np.ndarray) -> np.ndarray | None:
        """For flat positions of q, the flat index of their scale (None per tensor)."""
        if self.axis is None:
            return None
        inner = int(np.prod(self.shape[self.axis + 1 :], dtype=np.int64))
        dim = self.shape[self.axis]
        along = (positions // inner) % dim
        if not self.block_size:
            return along
        blocks = self.scale.shape[self.axis]
        outer = positions // (inner * dim)
        return (outer * blocks + along // self.block_size) * inner + positions % inner

    def _at(self, array: np.ndarray, positions: np.ndarray) -> np.ndarray:
        index = self._index(positions)
        flat = array.reshape(-1)
        return np.broadcast_to(flat[0], positions.shape) if index is None else flat[index]

    def scales(self, positions: np.ndarray) -> np.ndarray:
        return self._at(self.scale, positions)

    def zero_points(self, positions: np.ndarray) -> np.ndarray:
        return self._at(self.zero_point, positions)

    def dequantize(self, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 values of q's entries at the given flat positions (q's chunk, flat)."""
        shifted = np.asarray(q, dtype=np.int64).reshape(-1) - self.zero_points(positions)
        return shifted.astype(np.float32) * self.scales(positions)

    def full(self, array: np.ndarray) -> np.ndarray:
        """A per-entry parameter (scale or zero point) at every position of q, shaped as q."""
        size = int(np.prod(self.shape, dtype=np.int64))
        return np.array(self._at(array, np.arange(size, dtype=np.int64))).reshape(self.shape)

    def with_zero_points(self, q: np.ndarray, where: np.ndarray, offset: int = 0) -> np.ndarray:
        """q's entries (any shape; a flat chunk of q from position `offset`) with those marked
        in `where` (a bool mask of their shape) at their zero point: what dequantizes to 0."""
        out = np.array(q, copy=True)
        marked = np.flatnonzero(where)
        out.reshape(-1)[marked] = self.zero_points(marked + offset).astype(out.dtype)
        return out


# What a DequantizeLinear may read that channel removal slices: the weights, and int32 biases.
INTEGERS = TYPES | {ir.DataType.INT32, ir.DataType.UINT32}


def quantization(node: ir.Node, q: ir.TensorProtocol) -> tuple[Quantization | None, str]:
    """The parameters of DequantizeLinear `node` reading the stored integer `q`, or why they
    cannot be read (empty string when they can)."""
    if q.dtype not in INTEGERS:
        return None, f"{q.dtype.name} values behind DequantizeLinear are not pruned"
    scale = _stored(node.inputs[1] if len(node.inputs) > 1 else None)
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = _stored(zero_value)
    if scale is None or (zero_value is not None and zero is None):
        return None, "its DequantizeLinear scale or zero point is computed, not stored"
    shape = tuple(int(d) for d in q.shape)
    scales = np.asarray(scale.numpy(), dtype=np.float32)
    zeros = (
        np.zeros(scales.shape, dtype=np.int64)
        if zero is None
        else np.asarray(zero.numpy(), dtype=np.int64)
    )
    if scales.size == 1 and zeros.size == 1 and scales.ndim <= 1:  # onnxruntime.quantization
        # writes some per-tensor biases' scales as [1] beside a scalar zero point
        return Quantization(node, q.dtype, shape, scales.reshape(()), zeros.reshape(()), None), ""
    if zeros.shape != scales.shape:
        return None, "its DequantizeLinear scale and zero point differ in shape"
    attr = node.attributes.get("axis")
    axis = int(attr.value) if attr is not None else 1
    attr = node.attributes.get("block_size")
    block = int(attr.value) if attr is not None else 0
    if not -len(shape) <= axis < len(shape):
        return None, f"its DequantizeLinear axis {axis} is outside rank {len(shape)}"
    axis %= len(shape)
    if scales.ndim == 1 and not block and scales.shape[0] == shape[axis]:
        return Quantization(node, q.dtype, shape, scales, zeros, axis), ""
    blocks = list(shape)
    if block > 0:
        blocks[axis] = -(-shape[axis] // block)
    if block > 0 and list(scales.shape) == blocks:
        return Quantization(node, q.dtype, shape, scales, zeros, axis, block), ""
    return None, f"its DequantizeLinear scale of shape {scales.shape} does not fit q {shape}"


def viewable(node: ir.Node) -> bool:
    """Whether `node` is an ONNX DequantizeLinear of a stored q with stored parameters: what
    channel removal follows back to q as it follows a Transpose to its stored input."""
    if not is_dequantize(node) or node.domain == "com.microsoft" or _stored(node.inputs[0]) is None:
        return False
    return all(v is None or _stored(v) is not None for v in node.inputs[1:3])


def reader(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear that reads the stored `value` as its q (input 0), if one does."""
    for use in value.uses():
        if use.idx == 0 and is_dequantize(use.node):
            return use.node
    return None


def of_stored(value: ir.Value) -> Quantization | None:
    """The quantization a stored tensor is read through (its DequantizeLinear), if any."""
    node = reader(value)
    tensor = _stored(value)
    if node is None or tensor is None:
        return None
    return quantization(node, tensor)[0]


class DequantizedTensor(ir.LazyTensor):
    """A quantized weight's float32 values, computed from q when read: whole by `numpy()`,
    chunk by chunk by `weights.tensor_chunks` (so a big q is never held dequantized)."""

    __slots__ = ("quant", "stored")

    def __init__(self, stored: ir.TensorProtocol, quant: Quantization) -> None:
        super().__init__(self._compute, dtype=VALUES, shape=stored.shape, name=stored.name)
        self.stored, self.quant = stored, quant

    def _compute(self) -> ir.Tensor:
        q = self.stored.numpy()
        positions = np.arange(q.size, dtype=np.int64)
        return ir.Tensor(self.quant.dequantize(q, positions).reshape(q.shape), dtype=VALUES)
