"""Find the prunable weights: constant operands of Conv, ConvTranspose, Gemm and MatMul, and the
input (W) and recurrence (R) weights of LSTM, GRU and RNN (which inputs of which op, and their
axes, are the op registry's: `ops.weight_inputs`, `ops.weight_axes`).

A weight is a stored tensor (initializer or Constant node), reached directly or through Transpose,
Cast and Identity nodes. Each is found once however many nodes share it, and knows, for every use,
which axis of the stored tensor carries output channels and which carries input channels.

A quantized weight is an integer q (int8, uint8, int16, uint16, int4, uint4) stored right behind
a DequantizeLinear whose scale and zero point are stored (QDQ models, see `quantized.py`); after
the DequantizeLinear it may go through the same views. Its magnitudes are the dequantized values'.

Recurrent weights (ops/recurrent.py) are zeroed as soundly as a MatMul's; their biases (B) and
initial states are never pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune import ops
from onnxprune.core import quantized
from onnxprune.core.quantized import DequantizedTensor, Quantization
from onnxprune.core.tensors import tensor_chunks
from onnxprune.errors import ModelLoadError
from onnxprune.options import compile_patterns

# The registry's: ops with weights (messages list them), recurrent ones (W and R pruned
# unstructured only), and the inputs of each op that may hold a weight.
PRUNABLE_OPS = ops.PRUNABLE_OPS
RECURRENT_OPS = ops.RECURRENT_OPS
WEIGHT_INPUTS = ops.WEIGHT_INPUTS
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
# Ops a weight may flow through on its way to its consumer without changing what a zero means.
PASS_THROUGH = frozenset({"Transpose", "Cast", "Identity"})


@dataclass(frozen=True)
class Use:
    """One consumer of a weight. Axes index the stored tensor (mapped back through Transposes)."""

    node: ir.Node
    input_index: int
    out_axis: int | None
    in_axis: int | None
    via: tuple[str, ...] = ()


@dataclass(eq=False)
class Weight:
    """A prunable stored tensor and everything that consumes it."""

    name: str
    shape: tuple[int, ...]
    dtype: ir.DataType
    uses: list[Use]
    value: ir.Value | None = None  # set when the tensor is an initializer
    constant: ir.Node | None = None  # set when the tensor is a Constant node's value
    external: bool = False
    # set when the stored tensor is an integer q read through DequantizeLinear: `dtype` is then
    # q's type, `tensor()` and `numpy()` the dequantized float32 values, `stored()` q itself
    quant: Quantization | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def op_type(self) -> str:
        return "+".join(dict.fromkeys(u.node.op_type for u in self.uses))

    @property
    def node_names(self) -> list[str]:
        return [u.node.name or "" for u in self.uses]

    @property
    def out_axis(self) -> int | None:
        return self.uses[0].out_axis

    @property
    def in_axis(self) -> int | None:
        return self.uses[0].in_axis

    @property
    def values_dtype(self) -> ir.DataType:
        """The type of the weight's values as its layer computes with them (`tensor()`)."""
        return quantized.VALUES if self.quant is not None else self.dtype

    def stored(self) -> ir.TensorProtocol:
        """The tensor as stored (q for a quantized weight)."""
        if self.value is not None:
            assert self.value.const_value is not None
            return self.value.const_value
        assert self.constant is not None
        return self.constant.attributes["value"].value

    def tensor(self) -> ir.TensorProtocol:
        """The weight's values: as stored, or dequantized when read (a quantized weight)."""
        stored = self.stored()
        return stored if self.quant is None else DequantizedTensor(stored, self.quant)

    def numpy(self) -> np.ndarray:
        """The weights' values (as stored: a memory map for external data, read-only, no copy;
        a quantized weight's dequantized, a new float32 array)."""
        return self.tensor().numpy()

    def set_tensor(self, tensor: ir.TensorProtocol) -> None:
        """Swap the stored tensor, keeping the name; the graph structure is left as it was."""
        tensor.name = self.name
        if self.value is not None:
            self.value.const_value = tensor
        else:
            assert self.constant is not None
            self.constant.attributes["value"] = ir.AttrTensor("value", tensor)

    def set_values(self, values: np.ndarray) -> None:
        """Store new values, laid out as `numpy()` gives them. A quantized weight is only ever
        zeroed, never updated: its entries whose value is 0 go to their zero point, the rest of
        q stays as it was."""
        if self.quant is None:
            self.set_tensor(ir.Tensor(values, dtype=self.dtype))
            return
        q = self.stored().numpy()
        self.set_tensor(
            ir.Tensor(self.quant.with_zero_points(q, np.asarray(values) == 0), dtype=self.dtype)
        )


@dataclass
class Found:
    """What `find_weights` saw: the weights to prune and the constants it left alone, with why."""

    weights: list[Weight] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(w.size for w in self.weights)


def _perm(node: ir.Node, rank: int) -> list[int]:
    attr = node.attributes.get("perm")
    return list(attr.value) if attr is not None else list(range(rank))[::-1]


def _trace_uses(
    value: ir.Value, rank: int, graph_outputs: set[int], dequantize: ir.Node | None = None
) -> tuple[list[Use], str | None]:
    """Follow a constant forward to its weight slots; name the first use that is not one.

    A quantized weight's q goes through its DequantizeLinear (`dequantize`) first."""
    uses: list[Use] = []
    # stack of (value, axis map from the value's axes to the stored tensor's axes, path)
    stack: list[tuple[ir.Value, list[int], tuple[str, ...]]] = [(value, list(range(rank)), ())]
    while stack:
        current, axes, via = stack.pop()
        if id(current) in graph_outputs:
            return uses, "it is also a graph output"
        for usage in current.uses():
            node, idx = usage.node, usage.idx
            if dequantize is not None and node is dequantize and idx == 0 and current is value:
                stack.append((node.outputs[0], axes, (*via, node.op_type)))
                continue
            if node.op_type in PASS_THROUGH and node.domain == "" and idx == 0:
                if node.op_type == "Cast":
                    to = ir.DataType(node.attributes["to"].value)
                    if to not in FLOAT_TYPES:
                        return uses, f"it is cast to {to.name} by {node.name or 'a Cast'}"
                mapped = (
                    [axes[p] for p in _perm(node, rank)] if node.op_type == "Transpose" else axes
                )
                stack.append((node.outputs[0], mapped, (*via, node.op_type)))
                continue
            slot = ops.weight_axes(node, idx, rank)
            if slot is None:
                name = node.name or node.outputs[0].name
                return uses, f"it is also read by {node.op_type} {name!r}, which is not pruned"
            out_axis, in_axis = (None if a is None else axes[a] for a in slot)
            uses.append(Use(node, idx, out_axis, in_axis, via))
    return uses, None


def source_of(value: ir.Value) -> tuple[ir.Value, ir.Node | None, ir.Node | None] | None:
    """Walk back through pass-through ops to a stored constant: (its value, its Constant node,
    the DequantizeLinear it is read through when it is a quantized weight's q)."""
    seen = 0
    dequantize = None
    while value is not None and seen < 64:
        if value.const_value is not None and value.producer() is None:
            return value, None, dequantize
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            return value, node, dequantize
        if quantized.is_dequantize(node) and dequantize is None:
            # a quantized weight: q stored right behind its DequantizeLinear (no view of q)
            dequantize, value = node, node.inputs[0]
            producer = None if value is None else value.producer()
            if value is None or (producer is not None and producer.op_type != "Constant"):
                return None
            continue
        if node.op_type not in PASS_THROUGH or node.domain != "":
            return None
        value = node.inputs[0]
        seen += 1
    return None




def check_finite(tensors: Iterable[tuple[str, ir.TensorProtocol]]) -> None:
    """Refuse stored float tensors holding NaN or Inf, naming them: calibration multiplies the
    samples through the weights and solves with them, so one NaN would spread through every
    result and look like bad samples. (Magnitude pruning alone ranks NaN above every number,
    never pruning it first: it runs.)"""
    bad = []
    for name, tensor in tensors:
        if not tensor.dtype.is_floating_point():
            continue
        try:
            finite = all(np.isfinite(chunk).all() for _, chunk in tensor_chunks(tensor))
        except TypeError:  # a float type numpy cannot test: not judged
            continue
        if not finite:
            bad.append(name)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ModelLoadError(
            f"weight {bad[0]!r}{more} holds NaN or Inf: the model itself is damaged; re-export it"
        )


def find_weights(
    model: ir.Model,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> Found:
    """Every prunable weight once, in graph order (subgraphs included: If, Loop and Scan bodies).

    `include`/`exclude` are regular expressions searched in the weight's name and its consumers'
    node names: with `include`, only matching weights are pruned; `exclude` removes matches.
    """
    includes = compile_patterns(include, "--include")
    excludes = compile_patterns(exclude, "--exclude")
    graph_outputs = {id(v) for v in model.graph.outputs}
    found = Found()
    seen: set[int] = set()
    for node in model.graph.all_nodes():
        slots = ops.weight_inputs(node)
        if not slots:
            continue
        for idx, inp in enumerate(node.inputs):
            if inp is None or idx not in slots:
                continue
            source = source_of(inp)
            if source is None:
                continue
            value, constant, dequantize = source
            key = id(constant) if constant is not None else id(value)
            if key in seen:
                continue
            seen.add(key)
            tensor = constant.attributes["value"].value if constant else value.const_value
            name = value.name or (constant.name if constant else "") or f"weight_{len(seen)}"
            shape = tuple(int(d) for d in tensor.shape)
            quant = None
            if dequantize is not None:
                if len(shape) < 2:
                    continue
                quant, why = quantized.quantization(dequantize, tensor)
                if quant is not None and tensor.dtype not in quantized.TYPES:
                    quant, why = None, f"{tensor.dtype.name} weights are not pruned"
                if quant is None:
                    found.skipped.append((name, why))
                    continue
            elif tensor.dtype not in FLOAT_TYPES:
                found.skipped.append((name, f"{tensor.dtype.name} weights are not pruned"))
                continue
            if len(shape) < 2:
                continue
            if 0 in shape:
                found.skipped.append((name, f"it holds no weights (shape {shape})"))
                continue
            uses, blocked = _trace_uses(value, len(shape), graph_outputs, dequantize)
            if blocked is not None:
                found.skipped.append((name, blocked))
                continue
            if not uses:
                continue
            names = [name, *(u.node.name for u in uses if u.node.name)]
            if includes and not any(p.search(n) for p in includes for n in names):
                found.skipped.append((name, "not matched by --include"))
                continue
            if any(p.search(n) for p in excludes for n in names):
                found.skipped.append((name, "matched by --exclude"))
                continue
            found.weights.append(
                Weight(
                    name=name,
                    shape=shape,
                    dtype=tensor.dtype,
                    uses=uses,
                    value=None if constant is not None else value,
                    constant=constant,
                    external=isinstance(tensor, ir.ExternalTensor),
                    quant=quant,
                )
            )
    return found
