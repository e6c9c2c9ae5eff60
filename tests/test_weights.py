"""Finding weights: every op form, Constant nodes, pass-through ops, sharing, subgraphs, dtypes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper

from onnxprune.errors import InvalidArgumentError
from onnxprune.weights import find_weights


def found(model: onnx.ModelProto, **kw):
    return find_weights(ir.serde.deserialize_model(model), **kw)


def axes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {w.name: (w.op_type, w.out_axis, w.in_axis) for w in found(model).weights}


def test_conv_and_convtranspose_axes() -> None:
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 5])
    c = b.node("Conv", [x, b.weight((6, 4, 3, 3), name="conv"), b.weight((6,), name="bias")])
    b.node("ConvTranspose", [c, b.weight((6, 2, 2, 2), name="deconv")], out="y")
    b.output("y")
    assert axes(b.model()) == {"conv": ("Conv", 0, 1), "deconv": ("ConvTranspose", 1, 0)}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_b_honours_transb(trans_b: int) -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    shape = (3, 4) if trans_b else (4, 3)
    b.node(
        "Gemm", [x, b.weight(shape, name="B"), b.weight((3,), name="C")], out="y", transB=trans_b
    )
    b.output("y")
    assert axes(b.model()) == {"B": ("Gemm", 0 if trans_b else 1, 1 if trans_b else 0)}


def test_gemm_constant_a_with_transa() -> None:
    b = GraphBuilder()
    x = b.input("x", [4, 2])
    b.node("Gemm", [b.weight((4, 3), name="A"), x], out="y", transA=1)
    b.output("y")
    assert axes(b.model()) == {"A": ("Gemm", 1, 0)}


def test_matmul_constant_on_either_side() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4, 4])
    h = b.node("MatMul", [x, b.weight((4, 5), name="right")])
    b.node("MatMul", [b.weight((3, 4), name="left"), h], out="y")
    b.output("y")
    assert axes(b.model()) == {"right": ("MatMul", 1, 0), "left": ("MatMul", 0, 1)}


def test_constant_node_weights_are_found() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    w = b.constant(np.arange(12, dtype=np.float32).reshape(4, 3) % 5 - 2, name="cw")
    b.node("MatMul", [x, w], out="y")
    b.output("y")
    (weight,) = found(b.model()).weights
    assert weight.name == "cw" and weight.constant is not None and weight.value is None


def test_weights_through_transpose_and_cast_map_axes_back() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    w = b.weight((3, 4), name="stored", dtype=np.float16)
    t = b.node("Transpose", [w], perm=[1, 0])
    c = b.node("Cast", [t], to=TensorProto.FLOAT)
    b.node("MatMul", [x, c], out="y")
    b.output("y")
    (weight,) = found(b.model()).weights
    # MatMul sees [4, 3]: in axis 0, out axis 1; stored [3, 4] has them swapped
    assert (weight.out_axis, weight.in_axis) == (0, 1)
    assert weight.uses[0].via == ("Transpose", "Cast")


def test_shared_weight_counted_once() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    w = b.weight((4, 4), name="shared")
    h = b.node("MatMul", [x, w])
    b.node("MatMul", [h, w], out="y")
    b.output("y")
    result = found(b.model())
    assert [w.name for w in result.weights] == ["shared"]
    assert len(result.weights[0].uses) == 2 and result.total == 16


def test_weight_shared_with_gather_is_skipped() -> None:
    """Tied embeddings: zeroing would change the embedding lookup too."""
    b = GraphBuilder()
    ids = b.input("ids", [2], TensorProto.INT64)
    emb = b.weight((10, 4), name="emb")
    h = b.node("Gather", [emb, ids])
    t = b.node("Transpose", [emb], perm=[1, 0])
    b.node("MatMul", [h, t], out="y")
    b.output("y")
    result = found(b.model())
    assert result.weights == []
    assert result.skipped[0][0] == "emb" and "Gather" in result.skipped[0][1]


def test_biases_and_norm_parameters_are_never_weights() -> None:
    from builders import small_cnn

    names = {w.name for w in found(small_cnn()).weights}
    assert len(names) == 3  # two Conv weights and the Gemm weight, no bias or BN tensor


def test_integer_weights_are_skipped_with_reason() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4], TensorProto.INT32)
    b.node("MatMul", [x, b.weight((4, 3), name="q", dtype=np.int32)], out="y")
    b.output("y", TensorProto.INT32)
    result = found(b.model())
    assert result.weights == [] and result.skipped == [("q", "INT32 weights are not pruned")]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16], ids=str)
def test_float_dtypes(dtype) -> None:
    b = GraphBuilder()
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = b.input("x", [2, 4], elem)
    b.node("MatMul", [x, b.weight((4, 3), name="w", dtype=dtype)], out="y")
    b.output("y", elem)
    (weight,) = found(b.model()).weights
    assert weight.numpy().dtype == np.dtype(dtype)


def test_weights_inside_if_subgraph() -> None:
    then_b = GraphBuilder(1)
    then_b.node("MatMul", ["x", then_b.weight((4, 3), name="then_w")], out="t")
    then_b.output("t")
    then_g = helper.make_graph(then_b.nodes, "then", [], then_b.outputs, then_b.initializers)
    else_b = GraphBuilder(2)
    else_b.node("MatMul", ["x", "outer_w"], out="e")
    else_b.output("e")
    else_g = helper.make_graph(else_b.nodes, "else", [], else_b.outputs, [])
    b = GraphBuilder()
    b.input("x", [2, 4])
    cond = b.input("cond", [], TensorProto.BOOL)
    b.weight((4, 3), name="outer_w")
    b.node("If", [cond], out="y", then_branch=then_g, else_branch=else_g)
    b.output("y")
    assert {w.name for w in found(b.model()).weights} == {"then_w", "outer_w"}


def test_include_exclude_match_weight_or_node_names() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    h = b.node("MatMul", [x, b.weight((4, 4), name="encoder.w")])
    b.node("MatMul", [h, b.weight((4, 2), name="head.w")], out="y")
    b.output("y")
    model = b.model()
    assert [w.name for w in found(model, include=["encoder"]).weights] == ["encoder.w"]
    assert [w.name for w in found(model, exclude=["^head"]).weights] == ["encoder.w"]
    node_name = model.graph.node[0].name
    assert [w.name for w in found(model, include=[node_name + "$"]).weights] == ["encoder.w"]
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        found(model, include=["("])


def test_graph_output_weight_is_skipped() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    w = b.weight((4, 3), name="w")
    b.node("MatMul", [x, w], out="y")
    b.output("y")
    b.outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))
    result = found(b.model())
    assert result.weights == [] and "graph output" in result.skipped[0][1]


def test_weight_numpy_is_the_stored_tensor() -> None:
    b = GraphBuilder()
    x = b.input("x", [2, 4])
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    b.node("MatMul", [x, b.weight((4, 3), name="w", array=arr)], out="y")
    b.output("y")
    (weight,) = found(b.model()).weights
    np.testing.assert_array_equal(weight.numpy(), arr)
