"""Small ONNX models built with onnx.helper for the tests; IR version 10 (ORT rejects newer)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.selection import threshold as global_threshold

IR_VERSION = 10
OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; `model()` wraps them with fixed IR version and opset."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def input(self, name: str, shape: Sequence[int | str], dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, dtype: int = TensorProto.FLOAT, shape=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def weight(
        self,
        shape: Sequence[int],
        *,
        name: str | None = None,
        dtype=np.float32,
        scale: float = 1.0,
        array: np.ndarray | None = None,
    ) -> str:
        name = name or self.name("w")
        if array is None:
            array = (self.rng.standard_normal(shape) * scale).astype(dtype)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def constant(self, array: np.ndarray, *, name: str | None = None) -> str:
        name = name or self.name("const")
        self.nodes.append(
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))
        )
        return name

    def node(
        self, op: str, inputs: Sequence[str], n_out: int = 1, out: str | None = None, **attrs
    ) -> str | list[str]:
        outs = [out] if out else [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", opset)]
        )
        # outputs declared without a shape get the inferred one: the checker requires a shape
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            if not out.type.tensor_type.HasField("shape") and out.name in inferred:
                out.CopyFrom(inferred[out.name])
        return model


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU, residual Add, Flatten into Gemm: the everyday CNN shape."""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", 3, 8, 8])
    c1 = b.node("Conv", [x, b.weight((8, 3, 3, 3)), b.weight((8,))], pads=[1, 1, 1, 1])
    bn = b.node(
        "BatchNormalization",
        [
            c1,
            b.weight((8,), array=np.ones(8, np.float32)),
            b.weight((8,)),
            b.weight((8,)),
            b.weight((8,), array=np.ones(8, np.float32)),
        ],
    )
    r1 = b.node("Relu", [bn])
    c2 = b.node("Conv", [r1, b.weight((8, 8, 3, 3))], pads=[1, 1, 1, 1])
    add = b.node("Add", [c2, r1])
    pool = b.node("MaxPool", [add], kernel_shape=[2, 2], strides=[2, 2])
    flat = b.node("Flatten", [pool])
    b.node("Gemm", [flat, b.weight((10, 128)), b.weight((10,))], out="y", transB=1)
    b.output("y", shape=["N", 10])
    return b.model()


def mlp(seed: int = 0, dims: Sequence[int] = (16, 32, 8), dtype=np.float32) -> onnx.ModelProto:
    """MatMul/Add/Relu layers: the transformer MLP shape."""
    b = GraphBuilder(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    h = b.input("x", ["N", dims[0]], elem)
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        h = b.node("MatMul", [h, b.weight((d_in, d_out), dtype=dtype)])
        last = i == len(dims) - 2
        h = b.node("Add", [h, b.weight((d_out,), dtype=dtype)], out="y" if last else None)
        if not last:
            h = b.node("Relu", [h])
    b.output("y", elem, ["N", dims[-1]])
    return b.model()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a model in ONNX Runtime on the CPU."""
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializers(path: Path) -> dict[str, np.ndarray]:
    """The stored tensors of a saved model, external data loaded."""
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# Every way the global threshold can be found; each must give the very same masks.
PATHS = {
    "radix": {"WINDOW_MIN_WEIGHTS": 1 << 62},
    # a tiny sample, so the window is narrow and often misplaced: exercises both outcomes
    "window": {"WINDOW_MIN_WEIGHTS": 0, "SAMPLE_BLOCKS": 4, "SAMPLE_BLOCK": 3},
    "window-sparse": {
        "WINDOW_MIN_WEIGHTS": 0,
        "SAMPLE_BLOCKS": 4,
        "SAMPLE_BLOCK": 3,
        "DENSE_WINDOW": 0,
    },
    # windows the counts must reject: the threshold is found by digits after all
    "missed-below": {"WINDOW_MIN_WEIGHTS": 0, "sample_window": lambda *a: (0, 0)},
    "missed-above": {
        "WINDOW_MIN_WEIGHTS": 0,
        "sample_window": lambda w, k, *a: (int(np.iinfo(k).max),) * 2,
    },
}


@contextlib.contextmanager
def threshold_path(name: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for attr, value in PATHS[name].items():
            patch.setattr(global_threshold, attr, value)
        yield
