"""Hand-built models, one per family of channel rules, and the zero-channel invariant check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from onnxprune import channels
from onnxprune.core.tensors import const_tensor
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan, _accept, counted_weights
from onnxprune.storage import io
from tests.builders import GraphBuilder, run


def _conv(b: GraphBuilder, x: str, c_in: int, c_out: int, k: int = 3, **attrs) -> str:
    pads = [k // 2] * 4
    return b.node(
        "Conv",
        [x, b.weight((c_out, c_in, k, k), scale=0.3), b.weight((c_out,))],
        pads=pads,
        **attrs,
    )


def _bn(b: GraphBuilder, x: str, c: int) -> str:
    return b.node(
        "BatchNormalization",
        [
            x,
            b.weight((c,)),
            b.weight((c,)),
            b.weight((c,)),
            b.weight((c,), array=np.abs(b.rng.standard_normal(c)).astype(np.float32) + 0.5),
        ],
    )


def _head(b: GraphBuilder, x: str, c: int, n: int = 5) -> None:
    """GlobalAveragePool, Flatten, Gemm: the classifier every CNN here ends with."""
    pooled = b.node("GlobalAveragePool", [x])
    flat = b.node("Flatten", [pooled])
    b.node("Gemm", [flat, b.weight((n, c)), b.weight((n,))], out="y", transB=1)
    b.output("y", shape=["N", n])


def conv_bn_act() -> onnx.ModelProto:
    """Conv, BatchNorm and the zero-preserving element-wise activations, MaxPool, Gemm head."""
    b = GraphBuilder(1)
    h = b.input("x", ["N", 3, 8, 8])
    h = b.node("Relu", [_bn(b, _conv(b, h, 3, 8), 8)])
    for op, attrs in (
        ("LeakyRelu", {"alpha": 0.1}),
        ("Tanh", {}),
        ("Elu", {}),
        ("Selu", {}),
        ("HardSwish", {}),
        ("Softsign", {}),
        ("Neg", {}),
        ("Abs", {}),
    ):
        h = b.node(op, [h], **attrs)
    h = b.node(
        "Clip", [h, b.constant(np.array(-2, np.float32)), b.constant(np.array(2, np.float32))]
    )
    h = b.node("MaxPool", [_conv(b, h, 8, 12)], kernel_shape=[2, 2], strides=[2, 2])
    h = b.node("AveragePool", [b.node("Relu", [h])], kernel_shape=[2, 2], strides=[2, 2])
    _head(b, h, 12)
    return b.model()


def grouped() -> onnx.ModelProto:
    """Depthwise Conv (multiplier 1 and 2) and a grouped Conv: groups pruned whole."""
    b = GraphBuilder(2)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 8, 8]), 3, 8)])
    h = b.node(
        "Relu",
        [b.node("Conv", [h, b.weight((8, 1, 3, 3)), b.weight((8,))], pads=[1, 1, 1, 1], group=8)],
    )
    h = b.node(
        "Relu",
        [b.node("Conv", [h, b.weight((16, 1, 3, 3)), b.weight((16,))], pads=[1, 1, 1, 1], group=8)],
    )
    h = b.node("Relu", [b.node("Conv", [h, b.weight((8, 4, 1, 1))], group=4)])
    _head(b, _conv(b, h, 8, 6), 6)
    return b.model()


def conv_transpose() -> onnx.ModelProto:
    b = GraphBuilder(3)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 6, 6]), 3, 8)])
    h = b.node("ConvTranspose", [h, b.weight((8, 6, 2, 2)), b.weight((6,))], strides=[2, 2])
    h = b.node("Relu", [h])
    b.node("Conv", [h, b.weight((2, 6, 1, 1))], out="y")
    b.output("y", shape=["N", 2, 12, 12])
    return b.model()


def grouped_conv_transpose() -> onnx.ModelProto:
    """Grouped and depthwise ConvTranspose: whole groups go, with their inputs and bias."""
    b = GraphBuilder(13)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 6, 6]), 3, 8)])
    w = b.weight((8, 3, 2, 2))  # 4 groups: 2 input rows and 3 outputs each, 12 outputs
    h = b.node("ConvTranspose", [h, w, b.weight((12,))], strides=[2, 2], group=4)
    h = b.node("Relu", [h])
    h = b.node("ConvTranspose", [h, b.weight((12, 1, 3, 3))], pads=[1, 1, 1, 1], group=12)
    b.node("Conv", [b.node("Relu", [h]), b.weight((2, 12, 1, 1))], out="y")
    b.output("y", shape=["N", 2, 12, 12])
    return b.model()


def per_channel_constants() -> onnx.ModelProto:
    """InstanceNorm, per-channel Mul/Add/Sub/Div constants (several broadcast forms), PRelu."""
    b = GraphBuilder(4)
    h = _conv(b, b.input("x", ["N", 3, 6, 6]), 3, 8)
    h = b.node("InstanceNormalization", [h, b.weight((8,)), b.weight((8,))])
    h = b.node("Mul", [h, b.weight((8, 1, 1))])
    h = b.node("Add", [b.weight((1, 8, 1, 1)), h])
    h = b.node("Sub", [h, b.weight((8, 1, 1))])
    h = b.node("Div", [h, b.weight((8, 1, 1), array=np.full((8, 1, 1), 2.0, np.float32))])
    h = b.node("Mul", [h, b.weight((1,), array=np.array([0.5], np.float32))])
    h = b.node("PRelu", [h, b.weight((8, 1, 1))])
    _head(b, _conv(b, h, 8, 4), 4)
    return b.model()


def elementwise_between() -> onnx.ModelProto:
    """Add/Sub/Mul/Max/Min/Where between activations: all of them couple one group."""
    b = GraphBuilder(5)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.node("Relu", [_conv(b, x, 3, 8)])
    c = b.node("Relu", [_conv(b, x, 3, 8)])
    d = b.node("Relu", [_conv(b, a, 8, 8)])
    h = b.node("Add", [a, c])
    h = b.node("Sub", [h, d])
    h = b.node("Mul", [h, b.node("Relu", [_conv(b, x, 3, 8)])])
    h = b.node("Max", [h, b.node("Relu", [_conv(b, x, 3, 8)])])
    h = b.node("Min", [h, b.node("Relu", [_conv(b, x, 3, 8)])])
    e = b.node("Relu", [_conv(b, x, 3, 8)])
    h = b.node("Where", [b.node("Greater", [h, e]), h, e])
    _head(b, _conv(b, h, 8, 4), 4)
    return b.model()


def concat_split_slice() -> onnx.ModelProto:
    """Concat places channels at offsets; Split and Slice cut them again."""
    b = GraphBuilder(6)
    x = b.input("x", ["N", 3, 6, 6])
    a = b.node("Relu", [_conv(b, x, 3, 6)])
    c = b.node("Relu", [_conv(b, x, 3, 10)])
    cat = b.node("Concat", [a, c], axis=1)
    s1, s2 = b.node("Split", [cat, b.constant(np.array([4, 12], np.int64))], n_out=2, axis=1)
    bounds = [b.constant(np.array([v], np.int64)) for v in (3, 11, 1)]
    sl = b.node("Slice", [cat, *bounds])
    h = b.node("Add", [_conv(b, s1, 4, 5), _conv(b, s2, 12, 5)])
    h = b.node("Add", [h, _conv(b, sl, 8, 5)])
    h = b.node("Concat", [h, cat], axis=1)
    _head(b, b.node("Relu", [h]), 21)
    return b.model()


def mlp_transformer() -> onnx.ModelProto:
    """Transformer MLP block: LayerNorm, MatMul, bias, Gelu, MatMul, residual; hidden dim pruned."""
    b = GraphBuilder(7)
    x = b.input("x", ["N", 4, 8])
    h = b.node("LayerNormalization", [x, b.weight((8,)), b.weight((8,))], axis=-1)
    h = b.node("MatMul", [h, b.weight((8, 32), scale=0.3)])
    h = b.node("Relu", [b.node("Add", [h, b.weight((32,))])])
    h = b.node("MatMul", [h, b.weight((32, 8), scale=0.3)])
    h = b.node("Add", [h, b.weight((8,))])
    b.node("Add", [h, x], out="y")
    b.output("y", shape=["N", 4, 8])
    return b.model()


def gemm_mlp() -> onnx.ModelProto:
    """Gemm with transB 0 and 1, MatMul+Add: the fully connected family."""
    b = GraphBuilder(8)
    h = b.input("x", ["N", 10])
    h = b.node("Relu", [b.node("Gemm", [h, b.weight((10, 16)), b.weight((16,))])])
    h = b.node("Relu", [b.node("Gemm", [h, b.weight((12, 16)), b.weight((1, 12))], transB=1)])
    h = b.node("MatMul", [h, b.weight((12, 6))])
    b.node("Add", [h, b.weight((6,))], out="y")
    b.output("y", shape=["N", 6])
    return b.model()


def pool_reduce_resize() -> onnx.ModelProto:
    """Resize (scales and sizes), Pad, GlobalMaxPool, ReduceMean/ReduceMax over space, Gemm."""
    b = GraphBuilder(9)
    x = b.input("x", [1, 3, 4, 4])
    h = b.node("Relu", [_conv(b, x, 3, 8)])
    empty = b.constant(np.zeros(0, np.float32))
    h = b.node("Resize", [h, empty, b.constant(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    h = b.node(
        "Resize", [h, empty, empty, b.constant(np.array([1, 8, 6, 6], np.int64))], mode="nearest"
    )
    h = b.node("Pad", [h, b.constant(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    h = _conv(b, h, 8, 10)
    g = b.node("Flatten", [b.node("GlobalMaxPool", [h])])
    m = b.node("ReduceMean", [h], axes=[2, 3], keepdims=0)
    r = b.node("ReduceMax", [h], axes=[2, 3], keepdims=0)
    s = b.node("Add", [b.node("Add", [g, m]), r])
    b.node("Gemm", [s, b.weight((3, 10))], out="y", transB=1)
    b.output("y", shape=[1, 3])
    return b.model(opset=17)


def shape_ops() -> onnx.ModelProto:
    """Identity, Dropout, Transpose, Squeeze/Unsqueeze, Reshape into MatMul, Gather, Expand."""
    b = GraphBuilder(10)
    x = b.input("x", [2, 3, 4, 4])
    h = b.node("Relu", [_conv(b, x, 3, 6)])
    h = b.node("Dropout", [b.node("Identity", [h])])
    t = b.node("Transpose", [h], perm=[0, 2, 3, 1])  # NHWC: channels last
    t = b.node("MatMul", [t, b.weight((6, 5))])  # per-pixel linear over channels
    t = b.node("Transpose", [b.node("Relu", [t])], perm=[0, 3, 1, 2])
    flat = b.node("Reshape", [t, b.constant(np.array([2, 80], np.int64))])
    a = b.node("MatMul", [flat, b.weight((80, 4))])
    p = b.node("GlobalAveragePool", [t])
    p = b.node("Squeeze", [p, b.constant(np.array([2, 3], np.int64))])
    p = b.node("Unsqueeze", [p, b.constant(np.array([1], np.int64))])
    p = b.node("Expand", [p, b.constant(np.array([2, 3, 5], np.int64))])
    p = b.node("Gather", [p, b.constant(np.array(1, np.int64))], axis=1)
    pick = b.node("Gather", [p, b.constant(np.array([4, 0, 2], np.int64))], axis=1)
    c = b.node("MatMul", [p, b.weight((5, 4))])
    c = b.node("Add", [c, b.node("MatMul", [pick, b.weight((3, 4))])])
    b.node("Add", [a, c], out="y")
    b.output("y", shape=[2, 4])
    return b.model()


def squeeze_excite() -> onnx.ModelProto:
    """Squeeze-and-excitation: pooled, squeezed, expanded, Sigmoid gate multiplied back in."""
    b = GraphBuilder(11)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 6, 6]), 3, 8)])
    s = b.node("GlobalAveragePool", [h])
    s = b.node("Relu", [_conv(b, s, 8, 4, k=1)])
    s = b.node("Sigmoid", [_conv(b, s, 4, 8, k=1)])
    h = b.node("Mul", [h, s])
    _head(b, _conv(b, h, 8, 4), 4)
    return b.model()


def combined() -> onnx.ModelProto:
    """Residual Add, Concat and a Flatten head in one CNN."""
    b = GraphBuilder(12)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Relu", [_bn(b, _conv(b, x, 3, 8), 8)])
    r = b.node("Relu", [_conv(b, h, 8, 8)])
    h = b.node("Add", [h, _conv(b, r, 8, 8)])
    cat = b.node("Concat", [_conv(b, h, 8, 4, k=1), _conv(b, h, 8, 6)], axis=1)
    h = b.node("MaxPool", [b.node("Relu", [_bn(b, cat, 10)])], kernel_shape=[2, 2], strides=[2, 2])
    flat = b.node("Flatten", [h])
    b.node("Gemm", [flat, b.weight((5, 160)), b.weight((5,))], out="y", transB=1)
    b.output("y", shape=["N", 5])
    return b.model()


def channel_shuffle() -> onnx.ModelProto:
    """ShuffleNet's channel shuffle: Reshape (groups, C/groups), Transpose, Reshape back."""
    b = GraphBuilder(14)
    x = b.input("x", ["N", 3, 4, 4])
    h = b.node("Relu", [_conv(b, x, 3, 8)])
    h = b.node("Reshape", [h, b.constant(np.array([-1, 2, 4, 4, 4], np.int64))])
    h = b.node("Transpose", [h], perm=[0, 2, 1, 3, 4])
    h = b.node("Reshape", [h, b.constant(np.array([-1, 8, 4, 4], np.int64))])
    _head(b, _conv(b, h, 8, 4), 4)
    return b.model()


def einsum_attention() -> onnx.ModelProto:
    """Attention written with Einsum (as MaxViT exports): q.k contracts the projected dim."""
    b = GraphBuilder(15)
    x = b.input("x", ["N", 4, 6])
    q, k, v = (b.node("MatMul", [x, b.weight((6, 8), scale=0.4)]) for _ in range(3))
    s = b.node("Softmax", [b.node("Einsum", [q, k], equation="bid,bjd->bij")], axis=-1)
    o = b.node("Einsum", [s, v], equation="bij, bjd -> bid")
    b.node("MatMul", [o, b.weight((8, 3))], out="y")
    b.output("y", shape=["N", 4, 3])
    return b.model()


def packed_qkv() -> onnx.ModelProto:
    """One MatMul makes q, k and v (as MaxViT and ViT export it), split three ways."""
    b = GraphBuilder(17)
    x = b.input("x", ["N", 4, 6])
    qkv = b.node("MatMul", [x, b.weight((6, 24), scale=0.4)])
    q, k, v = b.node("Split", [qkv, b.constant(np.array([8, 8, 8]))], n_out=3, axis=-1)
    s = b.node("Softmax", [b.node("Einsum", [q, k], equation="bid,bjd->bij")], axis=-1)
    o = b.node("Einsum", [s, v], equation="bij,bjd->bid")
    b.node("MatMul", [o, b.weight((8, 3))], out="y")
    b.output("y", shape=["N", 4, 3])
    return b.model()


def strided_gather() -> onnx.ModelProto:
    """as_strided as exporters write it: flatten, Gather with 4-d indices, back to NCHW."""
    b = GraphBuilder(16)
    h = b.node("Relu", [_conv(b, b.input("x", [1, 3, 4, 4]), 3, 8)])
    h = b.node("Reshape", [b.node("GlobalAveragePool", [h]), b.constant(np.array([-1]))])
    index = b.constant(np.arange(8, dtype=np.int64).reshape(1, 8, 1, 1))
    h = b.node("Gather", [h, index], axis=0)
    flat = b.node("Flatten", [h])
    b.node("Gemm", [flat, b.weight((4, 8)), b.weight((4,))], out="y", transB=1)
    b.output("y", shape=[1, 4])
    return b.model()


def constant_nodes() -> onnx.ModelProto:
    """The combined CNN with every weight held in a Constant node instead of an initializer."""
    proto = combined()
    constants = [
        helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer
    ]
    del proto.graph.initializer[:]
    nodes = [*constants, *proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def shared_weight() -> onnx.ModelProto:
    """One weight read by two Convs: their output channels are one class."""
    b = GraphBuilder(18)
    x = b.input("x", ["N", 3, 6, 6])
    w = b.weight((8, 3, 3, 3))
    a = b.node("Relu", [b.node("Conv", [x, w], pads=[1] * 4)])
    c = b.node("Relu", [b.node("Conv", [b.node("Neg", [x]), w], pads=[1] * 4)])
    h = b.node("Concat", [a, c], axis=1)
    _head(b, _conv(b, h, 16, 4), 4)
    return b.model()


def old_opset() -> onnx.ModelProto:
    """Opset 11: Split sizes, Squeeze/Unsqueeze axes and ReduceMean axes are attributes."""
    b = GraphBuilder(19)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 4, 4]), 3, 10)])
    a, c = b.node("Split", [h], n_out=2, axis=1, split=[4, 6])
    h = b.node("Concat", [_conv(b, c, 6, 5), a], axis=1)
    p = b.node("ReduceMean", [h], axes=[2, 3], keepdims=1)
    p = b.node("Unsqueeze", [b.node("Squeeze", [p], axes=[2, 3])], axes=[2])
    p = b.node("Flatten", [p])
    b.node("Gemm", [p, b.weight((3, 9)), b.weight((3,))], out="y", transB=1)
    b.output("y", shape=["N", 3])
    return b.model(opset=11)


def weight_views() -> onnx.ModelProto:
    """Weights reached through Transpose, Cast and Identity (as exporters write them)."""
    b = GraphBuilder(21)
    h = b.input("x", ["N", 6])
    w = b.node("Transpose", [b.weight((10, 6))], perm=[1, 0])
    h = b.node("Relu", [b.node("MatMul", [h, w])])
    w = b.node("Cast", [b.weight((10, 8), dtype=np.float64)], to=TensorProto.FLOAT)
    h = b.node("Relu", [b.node("Gemm", [h, b.node("Identity", [w])])])
    b.node("MatMul", [h, b.weight((8, 3))], out="y")
    b.output("y", shape=["N", 3])
    return b.model()


def computed_shapes() -> onnx.ModelProto:
    """Reshape targets computed from Shape ops (the TorchScript exporter's flatten and channel
    shuffle): the rewrite writes them as constants, so the channels stay prunable."""
    b = GraphBuilder(22)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 4, 4]), 3, 8)])
    dims = b.node("Shape", [h])
    n = b.node("Gather", [dims, b.constant(np.array([0]))], axis=0)
    c = b.node("Gather", [dims, b.constant(np.array([1]))], axis=0)
    half = b.node("Div", [c, b.constant(np.array([2]))])
    spatial = b.node("Slice", [dims, b.constant(np.array([2])), b.constant(np.array([4]))])
    split = b.node("Concat", [n, b.constant(np.array([2])), half, spatial], axis=0)
    h = b.node("Transpose", [b.node("Reshape", [h, split])], perm=[0, 2, 1, 3, 4])
    h = b.node("Reshape", [h, b.node("Concat", [n, c, spatial], axis=0)])
    h = _conv(b, h, 8, 6)
    dims = b.node("Shape", [h])
    flat = b.node("Concat", [b.node("Gather", [dims, b.constant(np.array([0]))], axis=0),
                             b.constant(np.array([-1]))], axis=0)  # fmt: skip
    h = b.node("Reshape", [h, flat])
    b.node("Gemm", [h, b.weight((3, 96)), b.weight((3,))], out="y", transB=1)
    b.output("y", shape=["N", 3])
    return b.model()


def class_token() -> onnx.ModelProto:
    """ViT's stem: patches, a stored class token expanded to the batch (target computed from
    Shape), position embeddings; the embedding channels are sliced in all of them."""
    b = GraphBuilder(23)
    x = b.input("x", ["N", 3, 4, 4])
    patches = _conv(b, x, 3, 8, k=2, strides=[2, 2])  # [N, 8, 2, 2]; pads make it 3x3
    tokens = b.node("Reshape", [patches, b.constant(np.array([0, 8, -1]))])
    tokens = b.node("Transpose", [tokens], perm=[0, 2, 1])  # [N, 9, 8]
    batch = b.node("Gather", [b.node("Shape", [tokens]), b.constant(np.array([0]))], axis=0)
    target = b.node("Concat", [batch, b.constant(np.array([-1, -1]))], axis=0)
    ones = b.node("ConstantOfShape", [b.constant(np.array([3]))],
                  value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))  # fmt: skip
    target = b.node("Where", [b.node("Equal", [target, b.constant(np.array(-1))]), ones, target])
    cls = b.node("Expand", [b.weight((1, 1, 8)), target])
    h = b.node("Concat", [cls, tokens], axis=1)
    h = b.node("Add", [h, b.weight((1, 10, 8))])
    h = b.node("Relu", [b.node("MatMul", [h, b.weight((8, 6))])])
    first = b.node("Gather", [h, b.constant(np.array(0))], axis=1)
    b.node("MatMul", [first, b.weight((6, 3))], out="y")
    b.output("y", shape=["N", 3])
    return b.model()


def unknown_op() -> onnx.ModelProto:
    """LRN mixes neighbouring channels and has no rule: its groups must be frozen and reported."""
    b = GraphBuilder(13)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [_conv(b, x, 3, 8)])
    h = b.node("LRN", [h], size=3)
    h = b.node("Relu", [_conv(b, h, 8, 8)])
    _head(b, _conv(b, h, 8, 4), 4)
    return b.model()


def elementwise_all() -> onnx.ModelProto:
    """Every element-wise op the other models leave out, between two Convs: unary float ones,
    the boolean and comparison ones, integer BitShift, variadic Sum and Mean (opset 21)."""
    b = GraphBuilder(31)
    y = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 5, 5]), 3, 6)])
    s = b.node("Softplus", [y])  # positive: Log, Sqrt and Reciprocal stay finite
    zero, two = b.constant(np.array(0, np.float32)), b.constant(np.array(2, np.float32))
    floats = [b.node(op, [y]) for op in ("HardSigmoid", "Celu", "Gelu", "Erf", "Mish", "Exp")]
    floats += [b.node("ThresholdedRelu", [y], alpha=0.1), b.node("CastLike", [y, s])]
    floats += [b.node(op, [s]) for op in ("Log", "Sqrt", "Reciprocal")]
    floats += [b.node(op, [y]) for op in ("Sign", "Floor", "Ceil", "Round", "Sin", "Cos")]
    floats += [b.node("Pow", [s, two]), b.node("Mod", [y, two], fmod=1)]
    finite = b.node("Not", [b.node("Or", [b.node("IsNaN", [y]), b.node("IsInf", [y])])])
    low = b.node("And", [finite, b.node("Less", [y, zero])])
    mid = b.node("Xor", [b.node("GreaterOrEqual", [y, zero]), b.node("LessOrEqual", [y, zero])])
    picked = b.node("Where", [b.node("Or", [low, mid]), y, s])
    clipped = b.node("Floor", [b.node("Clip", [s, zero, two])])
    small = b.node("Cast", [clipped], to=TensorProto.UINT8)
    shifted = b.node("BitShift", [small, b.constant(np.array(1, np.uint8))], direction="LEFT")
    mean = b.node("Mean", [*floats, picked])
    total = b.node("Sum", [mean, b.node("Cast", [shifted], to=TensorProto.FLOAT)])
    _head(b, _conv(b, total, 6, 4), 4)
    return b.model(opset=21)


def swish() -> onnx.ModelProto:
    """Swish (opset 24) between two Convs."""
    b = GraphBuilder(32)
    y = b.node("Swish", [_conv(b, b.input("x", ["N", 3, 5, 5]), 3, 6)])
    _head(b, _conv(b, y, 6, 4), 4)
    return b.model(opset=24)


def qdq_between() -> onnx.ModelProto:
    """QuantizeLinear -> DequantizeLinear between layers (QDQ activations), per tensor and per
    channel (zero points 0: a dead channel stays zero)."""
    b = GraphBuilder(33)
    y = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 5, 5]), 3, 6)])
    scale, point = b.constant(np.array(0.05, np.float32)), b.constant(np.array(0, np.uint8))
    y = b.node("DequantizeLinear", [b.node("QuantizeLinear", [y, scale, point]), scale, point])
    y = _conv(b, y, 6, 5)
    scales = b.weight((5,), array=np.full(5, 0.1, np.float32))
    points = b.weight((5,), array=np.zeros(5, np.int8))
    q = b.node("QuantizeLinear", [y, scales, points], axis=1)
    y = b.node("DequantizeLinear", [q, scales, points], axis=1)
    _head(b, _conv(b, y, 5, 4), 4)
    return b.model(opset=21)


def pools_and_reductions() -> onnx.ModelProto:
    """LpPool, GlobalLpPool, the reductions over space the other models leave out, and
    LogSoftmax over the width (ReduceLogSumExp and LogSoftmax do not keep a dead channel at
    zero)."""
    b = GraphBuilder(34)
    y = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 6, 6]), 3, 6)])
    y = b.node("LogSoftmax", [y], axis=-1)
    y = b.node("LpPool", [y], kernel_shape=[2, 2], p=2)
    axes = b.constant(np.array([2, 3], np.int64))
    ops = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceMin", "ReduceProd")
    parts = [b.node(op, [y, axes]) for op in ops]
    parts += [b.node("ReduceLogSumExp", [y, axes]), b.node("GlobalLpPool", [y])]
    _head(b, b.node("Sum", parts), 6)
    return b.model(opset=18)


def upsample() -> onnx.ModelProto:
    """Upsample (opset 9, scales as an input) between two Convs."""
    b = GraphBuilder(35)
    y = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 4, 4]), 3, 6)])
    y = b.node("Upsample", [y, b.constant(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    _head(b, _conv(b, y, 6, 4), 4)
    return b.model(opset=9)


def random_cnn(seed: int) -> onnx.ModelProto:
    """A random stack of the blocks real CNNs are made of, to shake out rule interactions."""
    b = GraphBuilder(100 + seed)
    rng = np.random.default_rng(seed)
    h = b.node("Relu", [_conv(b, b.input("x", ["N", 3, 8, 8]), 3, 8)])
    c = 8
    for _ in range(int(rng.integers(3, 7))):
        kind = rng.choice(["conv", "depthwise", "residual", "concat", "split", "se", "shuffle"])
        if kind == "conv":
            out = int(rng.integers(4, 12))
            h, c = b.node("Relu", [_bn(b, _conv(b, h, c, out), out)]), out
        elif kind == "depthwise":
            w = b.weight((c, 1, 3, 3))
            h = b.node("Relu", [b.node("Conv", [h, w], pads=[1] * 4, group=c)])
        elif kind == "residual":
            h = b.node("Add", [h, _conv(b, b.node("Relu", [_conv(b, h, c, c)]), c, c)])
        elif kind == "concat":
            extra = int(rng.integers(2, 6))
            h, c = b.node("Concat", [h, b.node("Relu", [_conv(b, h, c, extra)])], axis=1), c + extra
        elif kind == "split" and c >= 4:
            first = int(rng.integers(1, c))
            parts = b.node("Split", [h, b.constant(np.array([first, c - first]))], n_out=2, axis=1)
            h = b.node("Concat", [_conv(b, parts[1], c - first, 4), parts[0]], axis=1)
            c = 4 + first
        elif kind == "se":
            s = b.node("Relu", [_conv(b, b.node("GlobalAveragePool", [h]), c, 2, k=1)])
            h = b.node("Mul", [h, b.node("Sigmoid", [_conv(b, s, 2, c, k=1)])])
        elif kind == "shuffle" and c % 2 == 0:
            h = b.node("Reshape", [h, b.constant(np.array([-1, 2, c // 2, 8, 8]))])
            h = b.node("Transpose", [h], perm=[0, 2, 1, 3, 4])
            h = b.node("Reshape", [h, b.constant(np.array([-1, c, 8, 8]))])
    if rng.random() < 0.5:
        _head(b, h, c)
    else:
        pooled = b.node("MaxPool", [h], kernel_shape=[4, 4], strides=[4, 4])
        flat = b.node("Flatten", [pooled])
        b.node("Gemm", [flat, b.weight((3, 4 * c)), b.weight((3,))], out="y", transB=1)
        b.output("y", shape=["N", 3])
    return b.model()


def random_transformer(seed: int) -> onnx.ModelProto:
    """Random MLP and attention blocks (single-head, or split into heads by Reshape/Transpose)
    on a residual stream; no LayerNorm, which renormalises and so is not exact by nature."""
    b = GraphBuilder(200 + seed)
    rng = np.random.default_rng(seed)
    t, e = 4, 12
    h = b.node("MatMul", [b.input("x", ["N", t, 6]), b.weight((6, e), scale=0.4)])

    def proj(x: str, d_in: int, d_out: int) -> str:
        return b.node("MatMul", [x, b.weight((d_in, d_out), scale=1 / np.sqrt(d_in))])

    for _ in range(int(rng.integers(2, 5))):
        kind = rng.choice(["mlp", "attention", "heads"])
        if kind == "mlp":
            hidden = int(rng.integers(8, 24))
            inner = b.node("Relu", [b.node("Add", [proj(h, e, hidden), b.weight((hidden,))])])
            h = b.node("Add", [h, b.node("Add", [proj(inner, hidden, e), b.weight((e,))])])
        elif kind == "attention":
            d = int(rng.integers(4, 10))
            q, k, v = proj(h, e, d), proj(h, e, d), proj(h, e, d)
            scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 2, 1])])
            mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
            h = b.node("Add", [h, proj(mixed, d, e)])
        else:
            heads, dh = 2, int(rng.integers(2, 5))
            split = b.constant(np.array([-1, t, heads, dh]))

            def to_heads(x: str, split: str = split) -> str:
                return b.node("Transpose", [b.node("Reshape", [x, split])], perm=[0, 2, 1, 3])

            q, k, v = (to_heads(proj(h, e, heads * dh)) for _ in range(3))
            scores = b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])])
            mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
            merged = b.node("Transpose", [mixed], perm=[0, 2, 1, 3])
            merged = b.node("Reshape", [merged, b.constant(np.array([-1, t, heads * dh]))])
            h = b.node("Add", [h, proj(merged, heads * dh, e)])
    b.node("MatMul", [h, b.weight((e, 3))], out="y")
    b.output("y", shape=["N", t, 3])
    return b.model()


def embedding_lookup() -> onnx.ModelProto:
    """Token and position embeddings looked up by Gather (BERT's stem), a residual MLP, mean over
    the tokens, a classifier: the embedding columns are sliced with the residual channels."""
    b = GraphBuilder(24)
    ids = b.input("ids", ["N", 4], TensorProto.INT64)
    h = b.node("Gather", [b.weight((7, 8)), ids], axis=0)
    h = b.node("Add", [h, b.node("Gather", [b.weight((4, 8)), b.constant(np.arange(4))])])
    inner = b.node("Relu", [b.node("MatMul", [h, b.weight((8, 16), scale=0.4)])])
    h = b.node("Add", [h, b.node("MatMul", [inner, b.weight((16, 8), scale=0.4)])])
    pooled = b.node("ReduceMean", [h], axes=[1], keepdims=0)
    b.node("Gemm", [pooled, b.weight((3, 8)), b.weight((3,))], out="y", transB=1)
    b.output("y", shape=["N", 3])
    return b.model()


# -- attention, as exporters write it: the fixtures of heads as channel classes -----------------
E, HEADS = 12, 3  # hidden width and heads (head_dim 4) of the attention fixtures
_INT64 = TensorProto.INT64


def _linear(b: GraphBuilder, x: str, d_in: int, d_out: int, bias_first: bool = False) -> str:
    """MatMul and bias Add, the bias first as the TorchScript exporter writes it."""
    y = b.node("MatMul", [x, b.weight((d_in, d_out), scale=1 / np.sqrt(d_in))])
    bias = b.weight((d_out,), scale=0.3)
    return b.node("Add", [bias, y] if bias_first else [y, bias])


def _one(b: GraphBuilder, v: int) -> str:
    return b.constant(np.array([v], np.int64))


def _attend(b: GraphBuilder, q: str, kt: str, v: str, scale: str, op: str = "Div") -> str:
    """softmax(q k^T op scale) v on [B, H, S, D] inputs (k given transposed, [B, H, D, S])."""
    scores = b.node(op, [b.node("MatMul", [q, kt]), scale])
    return b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])


def heads_torchscript() -> onnx.ModelProto:
    """Attention as torch.onnx.export(dynamo=False) writes it: q, k, v MatMul + Add, Reshape to
    [B, S, H, D] with a target computed from the Shape of the residual stream (head_dim = width
    // H), Transposes, scores divided by head_dim ** 0.5 computed from that Shape too, an
    additive mask made from a second input and Expanded by a computed target (as transformers
    builds one), Softmax, Reshape back, output projection, residual Add."""
    b = GraphBuilder(30)
    x = b.input("x", ["N", "S", 6])
    keep = b.input("keep", ["N", "S"])  # > 0 where a token may be attended to
    h = _linear(b, x, 6, E, bias_first=True)

    def entry(i: int) -> str:
        return b.node("Gather", [b.node("Shape", [h]), b.constant(np.array(i))], axis=0)

    def unsqueeze(v: str) -> str:
        return b.node("Unsqueeze", [v, b.constant(np.array([0]))])

    n, s, width = entry(0), entry(1), entry(2)
    head_dim = b.node("Cast", [b.node("Div", [width, b.constant(np.array(HEADS))])], to=_INT64)
    split = b.node(
        "Concat", [unsqueeze(n), unsqueeze(s), _one(b, HEADS), unsqueeze(head_dim)], axis=0
    )
    q, k, v = (b.node("Reshape", [_linear(b, h, E, E, True), split]) for _ in range(3))
    q = b.node("Transpose", [q], perm=[0, 2, 1, 3])
    kt = b.node("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.node("Transpose", [v], perm=[0, 2, 1, 3])
    scale = b.node(
        "Pow",
        [b.node("Cast", [head_dim], to=TensorProto.FLOAT), b.constant(np.array(0.5, np.float32))],
    )
    mask = b.node("Unsqueeze", [keep, b.constant(np.array([1, 2]))])  # [N, 1, 1, S]
    target = b.node("Concat", [unsqueeze(n), _one(b, 1), unsqueeze(s), unsqueeze(s)], axis=0)
    mask = b.node("Expand", [b.node("Greater", [mask, b.constant(np.array(0, np.float32))]),
                             target])  # fmt: skip
    mask = b.node(
        "Where", [mask, b.constant(np.array(0, np.float32)), b.constant(np.array(-1e4, np.float32))]
    )
    scores = b.node("Add", [b.node("Div", [b.node("MatMul", [q, kt]), scale]), mask])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    mixed = b.node("Transpose", [mixed], perm=[0, 2, 1, 3])
    merge = b.node("Concat", [unsqueeze(n), unsqueeze(s), unsqueeze(width)], axis=0)
    mixed = b.node("Reshape", [mixed, merge])
    h = b.node("Add", [h, _linear(b, mixed, E, E, True)])
    b.node("MatMul", [h, b.weight((E, 3))], out="y")
    b.output("y", shape=["N", "S", 3])
    return b.model()


def heads_dynamo() -> onnx.ModelProto:
    """Attention as torch.onnx.export(dynamo=True) writes scaled_dot_product_attention: the
    batch and sequence from Shape(start, end) of the input, one target [B, S, H, -1] shared by
    q, k and v (allowzero 1), k transposed by Reshape [-1, S, D] -> Transpose -> Reshape
    [B, H, D, S] computed from its Shape, q and k each scaled by head_dim ** -0.25."""
    b = GraphBuilder(31)
    x = b.input("x", ["batch", "seq", 6])
    n = b.node("Shape", [x], start=0, end=1)
    s = b.node("Shape", [x], start=1, end=2)
    h = _linear(b, x, 6, E)
    split = b.node("Concat", [n, s, _one(b, HEADS), _one(b, -1)], axis=0)
    q, k, v = (
        b.node("Transpose", [b.node("Reshape", [_linear(b, h, E, E), split], allowzero=1)],
               perm=[0, 2, 1, 3])
        for _ in range(3)
    )  # fmt: skip
    dims = b.node("Shape", [k])
    last = b.node("Slice", [dims, _one(b, -1), _one(b, np.iinfo(np.int64).max)])
    prev = b.node("Slice", [dims, _one(b, -2), _one(b, -1)])
    lead = b.node("Slice", [dims, _one(b, np.iinfo(np.int64).min), _one(b, -2)])
    kt = b.node("Reshape", [k, b.node("Concat", [_one(b, -1), prev, last], axis=0)])
    kt = b.node("Transpose", [kt], perm=[0, 2, 1])
    kt = b.node("Reshape", [kt, b.node("Concat", [lead, last, prev], axis=0)])
    scale = b.constant(np.array([(E // HEADS) ** -0.25], np.float32))
    scores = b.node("MatMul", [b.node("Mul", [q, scale]), b.node("Mul", [kt, scale])])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    mixed = b.node("Transpose", [mixed], perm=[0, 2, 1, 3])
    merge = b.node("Concat", [n, s, _one(b, E)], axis=0)
    mixed = b.node("Reshape", [mixed, merge], allowzero=1)
    h = b.node("Add", [h, _linear(b, mixed, E, E)])
    b.node("MatMul", [h, b.weight((E, 3))], out="y")
    b.output("y", shape=["batch", "seq", 3])
    return b.model(opset=18)


def heads_multihead() -> onnx.ModelProto:
    """nn.MultiheadAttention (batch_first) as torch.onnx.export(dynamo=True) writes it: tokens
    transposed to [S, B, E], one packed in-projection Reshaped to [S, B, 3, E] and picked apart
    by Unsqueeze, Transpose, Squeeze and Gather; the heads folded into the batch, [S, B*H, D],
    transposed to [B*H, S, D] and Reshaped to [B, H, S, D]; scaled_dot_product_attention; the
    output [S*B, E] through a Gemm and Reshaped back to [S, B, E] by a computed target."""
    b = GraphBuilder(35)
    x = b.input("x", ["batch", "seq", 6])
    n = b.node("Shape", [x], start=0, end=1)
    s = b.node("Shape", [x], start=1, end=2)
    h = _linear(b, x, 6, E)
    tokens = b.node("Transpose", [h], perm=[1, 0, 2])
    qkv = _linear(b, tokens, E, 3 * E)
    qkv = b.node("Reshape", [qkv, b.node("Concat", [s, n, _one(b, 3), _one(b, E)], axis=0)],
                 allowzero=1)  # fmt: skip
    qkv = b.node("Unsqueeze", [qkv, _one(b, 0)])
    qkv = b.node("Transpose", [qkv], perm=[3, 1, 2, 0, 4])
    qkv = b.node("Squeeze", [qkv, _one(b, -2)])
    bh = b.node("Mul", [b.node("Squeeze", [n]), b.constant(np.array(HEADS))])
    bh = b.node("Reshape", [bh, _one(b, -1)])
    fold = b.node("Concat", [s, bh, _one(b, E // HEADS)], axis=0)
    unfold = b.node("Concat", [n, _one(b, HEADS), s, _one(b, E // HEADS)], axis=0)
    q, k, v = (
        b.node("Reshape", [
            b.node("Transpose", [
                b.node("Reshape", [b.node("Gather", [qkv, b.constant(np.array(i))], axis=0), fold],
                       allowzero=1)], perm=[1, 0, 2]),
            unfold], allowzero=1)
        for i in range(3)
    )  # fmt: skip
    kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    scale = b.constant(np.array([(E // HEADS) ** -0.25], np.float32))
    scores = b.node("MatMul", [b.node("Mul", [q, scale]), b.node("Mul", [kt, scale])])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    mixed = b.node("Transpose", [mixed], perm=[2, 0, 1, 3])
    mixed = b.node("Reshape", [mixed, b.constant(np.array([-1, E]))], allowzero=1)
    out = b.node("Gemm", [mixed, b.weight((E, E), scale=0.3), b.weight((E,))], transB=1)
    out = b.node("Reshape", [out, b.node("Concat", [s, n, _one(b, E)], axis=0)], allowzero=1)
    h = b.node("Add", [h, b.node("Transpose", [out], perm=[1, 0, 2])])
    b.node("MatMul", [h, b.weight((E, 3))], out="y")
    b.output("y", shape=["batch", "seq", 3])
    return b.model(opset=18)


def heads_static() -> onnx.ModelProto:
    """nn.MultiheadAttention as the dynamo exporter writes it for a fixed batch of 1
    (torchvision's vit_b_16): [S, 1, E] -> [S, H, D] -> [H, S, D] -> [1, H, S, D], all targets
    stored; plus a relative position bias (Swin) as exported: a stored [S*S, H] table reshaped,
    transposed and unsqueezed to [1, H, S, S] and added to the scores."""
    b = GraphBuilder(36)
    t, d = 5, E // HEADS
    x = b.input("x", [1, t, 6])
    h = _linear(b, x, 6, E)
    tokens = b.node("Transpose", [h], perm=[1, 0, 2])
    q, k, v = (
        b.node("Reshape", [
            b.node("Transpose", [b.node("Reshape", [_linear(b, tokens, E, E),
                                                    b.constant(np.array([t, HEADS, d]))])],
                   perm=[1, 0, 2]),
            b.constant(np.array([1, HEADS, t, d]))])
        for _ in range(3)
    )  # fmt: skip
    kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    table = b.node("Reshape", [b.weight((t * t, HEADS)), b.constant(np.array([t, t, -1]))])
    bias = b.node("Unsqueeze", [b.node("Transpose", [table], perm=[2, 0, 1]), _one(b, 0)])
    scale = b.constant(np.array(d**-0.5, np.float32))
    scores = b.node("Add", [b.node("Mul", [b.node("MatMul", [q, kt]), scale]), bias])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    mixed = b.node("Transpose", [mixed], perm=[2, 0, 1, 3])
    mixed = b.node("Reshape", [mixed, b.constant(np.array([t, E]))])
    out = b.node("Gemm", [mixed, b.weight((E, E), scale=0.3), b.weight((E,))], transB=1)
    out = b.node("Reshape", [out, b.constant(np.array([t, 1, E]))])
    h = b.node("Add", [h, b.node("Transpose", [out], perm=[1, 0, 2])])
    b.node("MatMul", [h, b.weight((E, 3))], out="y")
    b.output("y", shape=[1, t, 3])
    return b.model(opset=18)


def _packed(seed: int, unpack: str) -> onnx.ModelProto:
    """One projection to 3 * hidden, cut into q, k and v by Split, Slice or Reshape
    [B, S, 3, H, D] + Transpose + Gather (timm's ViT), then attention and output projection."""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", "S", 6])
    h = _linear(b, x, 6, E)
    qkv = _linear(b, h, E, 3 * E)
    to_heads = b.constant(np.array([0, 0, HEADS, E // HEADS]))

    def heads(t: str) -> str:
        return b.node("Transpose", [b.node("Reshape", [t, to_heads])], perm=[0, 2, 1, 3])

    if unpack == "split":
        parts = b.node("Split", [qkv, b.constant(np.array([E, E, E]))], n_out=3, axis=-1)
        q, k, v = (heads(t) for t in parts)
    elif unpack == "slice":
        q, k, v = (
            heads(b.node("Slice", [qkv, _one(b, i * E), _one(b, (i + 1) * E), _one(b, 2)]))
            for i in range(3)
        )
    else:
        packed = b.node("Reshape", [qkv, b.constant(np.array([0, 0, 3, HEADS, E // HEADS]))])
        packed = b.node("Transpose", [packed], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Gather", [packed, b.constant(np.array(i))], axis=0) for i in range(3))
    kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    scale = b.constant(np.array((E // HEADS) ** -0.5, np.float32))
    mixed = b.node("Transpose", [_attend(b, q, kt, v, scale, "Mul")], perm=[0, 2, 1, 3])
    mixed = b.node("Reshape", [mixed, b.constant(np.array([0, 0, E]))])
    h = b.node("Add", [h, _linear(b, mixed, E, E)])
    b.node("MatMul", [h, b.weight((E, 3))], out="y")
    b.output("y", shape=["N", "S", 3])
    return b.model()


def heads_packed_split() -> onnx.ModelProto:
    return _packed(32, "split")


def heads_packed_slice() -> onnx.ModelProto:
    return _packed(33, "slice")


def heads_packed_gather() -> onnx.ModelProto:
    return _packed(34, "gather")


HEAD_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__: f
    for f in (heads_torchscript, heads_dynamo, heads_multihead, heads_static, heads_packed_split,
              heads_packed_slice, heads_packed_gather)
}  # fmt: skip


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__: f
    for f in (conv_bn_act, grouped, conv_transpose, grouped_conv_transpose, per_channel_constants,
              elementwise_between,
              concat_split_slice, mlp_transformer, gemm_mlp, pool_reduce_resize, shape_ops,
              squeeze_excite, combined, channel_shuffle, einsum_attention, packed_qkv,
              strided_gather, constant_nodes, shared_weight, old_opset, weight_views,
              computed_shapes, class_token, embedding_lookup, unknown_op)
}  # fmt: skip


def feeds(
    proto: onnx.ModelProto, seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Random inputs; symbolic dims are 2, or as `sizes` names them."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {}
    out = {}
    for value in proto.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 2)
            for d in value.type.tensor_type.shape.dim
        ]
        kind = value.type.tensor_type.elem_type
        if kind in (TensorProto.INT64, TensorProto.INT32):  # token ids
            dtype = np.int64 if kind == TensorProto.INT64 else np.int32
            out[value.name] = rng.integers(0, 4, dims).astype(dtype)
            continue
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def analyse(proto: onnx.ModelProto, heads: bool = False) -> tuple[ir.Model, channels.ChannelGraph]:
    model = ir.serde.deserialize_model(proto)
    channels.prepare(model)
    return model, channels.build(model, heads=heads)


# Roles whose entries are zero in a dead channel: its producers and its additive carriers.
# Divisors stay (0 / c is 0); LayerNorm is excluded (it renormalises, see ops/normalization.py).
_DEAD_ROLES = ("out", "bias", "shift", "scale")


def kill(graph: channels.ChannelGraph, removed: np.ndarray) -> None:
    """Zero every producer weight, bias and per-channel shift/scale of the removed classes
    (a quantized one at its zero point)."""
    for m in graph.members:
        if m.role not in _DEAD_ROLES or (m.role == "scale" and m.node.op_type == "Div"):
            continue
        tensor = const_tensor(m.value)
        array = channels.zeroed(m.value, m.axis, removed[m.ids])
        new = ir.Tensor(array, dtype=tensor.dtype, name=m.value.name)
        node = m.value.producer()
        if node is not None and node.op_type == "Constant":
            node.attributes["value"] = ir.AttrTensor("value", new)
        else:
            m.value.const_value = new


def choose(graph: channels.ChannelGraph, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """A random set of removable classes that leaves every layer at least one channel."""
    rng = np.random.default_rng(seed)
    candidates = rng.permutation(np.flatnonzero(graph.prunable))
    accepted = _accept(graph, [candidates[i : i + 1] for i in range(len(candidates))], None, None)
    removed = np.zeros(graph.n_classes, dtype=bool)
    take = accepted[: max(1, int(len(accepted) * fraction))] if accepted else []
    if take:
        removed[np.concatenate(take)] = True
    return removed


def check_invariant(
    proto: onnx.ModelProto,
    tmp: Path,
    seed: int = 0,
    *,
    heads: bool = False,
    sizes: dict[str, int] | None = None,
    removed: Callable[[channels.ChannelGraph], np.ndarray] | None = None,
) -> ChannelPlan:
    """Zero some channels (`removed` picks them, else `choose`), remove exactly them, and
    require the same outputs (1e-5 relative)."""
    model, graph = analyse(proto, heads=heads)
    removed = choose(graph, seed=seed) if removed is None else removed(graph)
    kill(graph, removed)
    data = feeds(proto, seed, sizes)
    expected = run(ir.serde.serialize_model(model), data)
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    apply_channel_plan(model, plan)
    path = io.save_model(model, tmp / f"pruned_{seed}.onnx", force=True, check=True)
    got = run(path, data)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        scale = max(float(np.abs(e).max()), 1e-30)
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * scale)
    return plan
