"""Models with every form of normalisation over channels that exporters write (fused
LayerNormalization, RMSNormalization, ONNX Runtime's simplified and skip forms, RMSNorm and
LayerNorm spelt out as TorchScript, torch.export, tf2onnx and jax2tf write them), on a pre-norm
residual stack whose channels all go through them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from tests.builders import IR_VERSION, GraphBuilder

E, T = 12, 5
EPS = 1e-5


def _eps(b: GraphBuilder) -> str:
    return b.constant(np.array(EPS, np.float32))


def _scalar(b: GraphBuilder, v: float) -> str:
    return b.constant(np.array(v, np.float32))


def _axes(b: GraphBuilder) -> str:
    return b.constant(np.array([-1], np.int64))


def fused(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    return b.node("LayerNormalization", [h, b.weight((E,)), b.weight((E,))], axis=-1), None


def rms_torchscript(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    """TorchScript / Optimum: a float Cast, Pow, ReduceMean, Add eps, Sqrt, Div(1, .)."""
    x = b.node("Cast", [h], to=onnx.TensorProto.FLOAT)
    mean = b.node("ReduceMean", [b.node("Pow", [x, _scalar(b, 2.0)]), _axes(b)], keepdims=1)
    inv = b.node("Div", [_scalar(b, 1.0), b.node("Sqrt", [b.node("Add", [mean, _eps(b)])])])
    return b.node("Mul", [b.weight((E,)), b.node("Mul", [x, inv])]), None


def rms_dynamo(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    """torch.export: Pow, ReduceMean, Add, Sqrt, Reciprocal."""
    mean = b.node("ReduceMean", [b.node("Pow", [h, _scalar(b, 2.0)]), _axes(b)], keepdims=1)
    inv = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [mean, _eps(b)])])])
    return b.node("Mul", [b.weight((E,)), b.node("Mul", [h, inv])]), None


def mean_spelt(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    """LayerNorm spelt out with means: the variance sums (x - mean)^2 over removed channels too."""
    mean = b.node("ReduceMean", [h, _axes(b)], keepdims=1)
    centred = b.node("Sub", [h, mean])
    var = b.node("ReduceMean", [b.node("Pow", [centred, _scalar(b, 2.0)]), _axes(b)], keepdims=1)
    normed = b.node("Div", [centred, b.node("Sqrt", [b.node("Add", [var, _eps(b)])])])
    return b.node("Add", [b.node("Mul", [normed, b.weight((E,))]), b.weight((E,))]), None


def sum_spelt(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    """jax's mean as a sum over the count: ReduceSum, Div, Sub, Mul, ReduceSum."""
    count = _scalar(b, float(E))
    mean = b.node("Div", [b.node("ReduceSum", [h, _axes(b)], keepdims=1), count])
    centred = b.node("Sub", [h, mean])
    var = b.node("ReduceSum", [b.node("Mul", [centred, centred]), _axes(b)], keepdims=1)
    std = b.node("Sqrt", [b.node("Add", [b.node("Div", [var, count]), _eps(b)])])
    return b.node("Mul", [b.node("Div", [centred, std]), b.weight((E,))]), None


def rms23(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    return b.node("RMSNormalization", [h, b.weight((E,))], axis=-1, epsilon=EPS), None


def simplified(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    node = helper.make_node(
        "SimplifiedLayerNormalization", [h, b.weight((E,))], [b.name("sln")],
        axis=-1, epsilon=EPS, name=b.name("SLN"),
    )  # fmt: skip
    b.nodes.append(node)
    return node.output[0], None


def _skip(b: GraphBuilder, h: str, skip: str | None, simplified: bool) -> tuple[str, str | None]:
    if skip is None:
        return fused(b, h)
    op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
    params = [b.weight((E,))] if simplified else [b.weight((E,)), b.weight((E,))]
    params.append(b.weight((E,), scale=0.1))  # the bias added before normalising
    out, total = b.name("skn"), b.name("sum")
    outputs = [out, "", "", total]
    b.nodes.append(
        helper.make_node(
            op, [h, skip, *params], outputs, domain="com.microsoft", epsilon=EPS, name=b.name(op)
        )
    )
    return out, total


def skip_ln(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    return _skip(b, h, skip, False)


def skip_simplified(b: GraphBuilder, h: str, skip: str | None = None) -> tuple[str, str | None]:
    return _skip(b, h, skip, True)


Norm = Callable[[GraphBuilder, str, str | None], tuple[str, str | None]]
NORMS: dict[str, Norm] = {
    "fused": fused,
    "rms_torchscript": rms_torchscript,
    "rms_dynamo": rms_dynamo,
    "mean_spelt": mean_spelt,
    "sum_spelt": sum_spelt,
    "rms23": rms23,
    "simplified": simplified,  # in the default domain, where ONNX Runtime registers it
    "skip": skip_ln,
    "skip_simplified": skip_simplified,
}
MICROSOFT = ("simplified", "skip", "skip_simplified")


def residual_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A pre-norm residual stack (E channels) with `name`'s normalisation before each block and
    before the head; the residual stream, the MLPs and the embedding are all prunable. The skip
    forms add the block's output to the stream inside the norm (and give the sum back)."""
    norm = NORMS[name]
    b = GraphBuilder(300 + seed)
    h = b.node("MatMul", [b.input("x", ["N", T, 6]), b.weight((6, E), scale=0.5)])
    h = b.node("Add", [h, b.weight((E,), scale=0.1)])
    branch = None
    for _ in range(2):
        normed, total = norm(b, h, branch)
        h = total if total is not None else (b.node("Add", [h, branch]) if branch else h)
        inner = b.node("Relu", [b.node("MatMul", [normed, b.weight((E, 16), scale=0.3)])])
        branch = b.node("MatMul", [inner, b.weight((16, E), scale=0.3)])
    if name.startswith("skip"):
        normed, _ = norm(b, h, branch)
    else:
        normed, _ = norm(b, b.node("Add", [h, branch]))
    b.node("MatMul", [normed, b.weight((E, 3))], out="y")
    b.output("y", shape=["N", T, 3])
    opsets = [helper.make_opsetid("", 23 if name == "rms23" else 18)]
    if name in MICROSOFT:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(b.nodes, name, b.inputs, b.outputs, b.initializers)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=opsets)
