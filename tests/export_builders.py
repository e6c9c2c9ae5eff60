"""Graph shapes of real exporters' output, built with onnx.helper and numpy only (no torch).

Each builder imitates one kind of held-out export (Silero VAD, Magika, PaddleOCR, CREPE,
YOLOv8) closely enough that a test can make the shape on the fly, at any size: the models in
models/exports/ are the real exports, these are their skeletons. Every builder is seeded, sets
the IR version and opset itself and returns a model that passes onnx.checker's full check and
runs in ONNX Runtime; `feeds(model)` makes inputs for any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # ONNX Runtime 1.20 and later load IR 8 to 10; older exporters write 6 to 8


class _Graph:
    """Nodes, initializers and a seeded generator; unique names; a model with a fixed IR."""

    def __init__(self, seed: int, prefix: str = "") -> None:
        self.rng = np.random.default_rng(seed)
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}{stem}_{self._count}"

    def input(self, name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str, shape: Sequence[int | str | None] | None = None,
               dtype: int = TensorProto.FLOAT) -> str:  # fmt: skip
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def init(self, array: np.ndarray, name: str | None = None) -> str:
        name = name or self.fresh("w")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: Sequence[int], name: str | None = None, scale: float | None = None):
        """He-scaled random float32 weight, so activations keep their size through depth."""
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        std = scale if scale is not None else float(np.sqrt(2.0 / max(fan_in, 1)))
        return self.init((self.rng.standard_normal(shape) * std).astype(np.float32), name)

    def const(self, array: np.ndarray | float | int | Sequence[int], dtype=None) -> str:
        """A Constant node (what tf2onnx, paddle2onnx and torch in subgraphs write)."""
        value = np.asarray(array, dtype=dtype)
        name = self.fresh("c")
        self.nodes.append(
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
        )
        return name

    def ints(self, values: Sequence[int] | int) -> str:
        return self.const(np.asarray(values, np.int64))

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1,
           out: str | Sequence[str] | None = None, name: str | None = None, **attrs):  # fmt: skip
        if out is None:
            outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        node = helper.make_node(op_type, list(inputs), outs, name=name or self.fresh(op_type),
                                **attrs)  # fmt: skip
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def graph(self, name: str) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)

    def model(self, name: str, opset: int, producer: str) -> onnx.ModelProto:
        model = helper.make_model(
            self.graph(name),
            ir_version=IR_VERSION,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name=producer,
        )
        _shape_outputs(model)
        return model


def _shape_outputs(model: onnx.ModelProto) -> None:
    """Outputs declared without a shape get the inferred one (the full check wants a type)."""
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)


def _silu(g: _Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


# -- (a) Silero-VAD: LSTM weights stored once, reached through If branches -----------------------
def vad_lstm(
    *,
    samples: int = 64,
    features: int = 16,
    hidden: int = 32,
    hop: int = 8,
    seed: int = 0,
    opset: int = 16,
) -> onnx.ModelProto:
    """Silero VAD v5 as torch.jit.script + the legacy exporter write it: the sample rate `sr`
    (int64 scalar) is compared with 16000 and 8000 and chooses an If branch; both branches run
    one LSTM whose weights are stored once, in torch's gate order (i, f, g, o), as main-graph
    initializers that the branches read from the outer scope and reorder to ONNX's (i, o, f, c)
    with Slice and Concat right before the LSTM node. The recurrent state is one input `state`
    [2, N, hidden] with the batch on axis 1 (h and c stacked on axis 0), returned as `stateN`.

    Inputs: input [N, samples] float, sr int64 [], state [2, N, hidden].
    Outputs: output [N, 1] (speech probability), stateN [2, N, hidden].
    """
    g = _Graph(seed)
    x = g.input("input", ["N", samples])
    sr = g.input("sr", [], TensorProto.INT64)
    state = g.input("state", [2, "N", hidden])
    # encoder in the main graph: Conv1d over the waveform, stride = hop
    h = g.op("Unsqueeze", [x, g.ints([1])])
    h = g.op("Conv", [h, g.weight((features, 1, 2 * hop), "encoder.0.weight"),
                      g.weight((features,), "encoder.0.bias", 0.1)],
             strides=[hop], pads=[hop // 2, hop // 2])  # fmt: skip
    h = g.op("Relu", [h])
    h = g.op("Conv", [h, g.weight((features, features, 3), "encoder.1.weight"),
                      g.weight((features,), "encoder.1.bias", 0.1)], pads=[1, 1])  # fmt: skip
    feats = g.op("Relu", [h])  # [N, F, T]
    # the LSTM's weights, stored once in torch's layout
    scale = float(1 / np.sqrt(hidden))
    g.weight((4 * hidden, features), "decoder.rnn.weight_ih", scale)
    g.weight((4 * hidden, hidden), "decoder.rnn.weight_hh", scale)
    g.weight((4 * hidden,), "decoder.rnn.bias_ih", scale)
    g.weight((4 * hidden,), "decoder.rnn.bias_hh", scale)
    decoder_w = g.weight((1, hidden, 1), "decoder.out.weight")
    decoder_b = g.weight((1,), "decoder.out.bias", 0.1)

    def branch(tag: str, step: int) -> onnx.GraphProto:
        b = _Graph(seed + 1, prefix=f"{tag}/")
        f = feats
        if step > 1:  # 8 kHz: every other frame, as the slower rate sees half the hops
            f = b.op("Slice", [f, b.ints([0]), b.ints([1 << 30]), b.ints([2]), b.ints([step])])
        seq = b.op("Transpose", [f], perm=[2, 0, 1])  # [T, N, F]

        def reorder(name: str) -> str:
            parts = [
                b.op("Slice", [name, b.ints([i * hidden]), b.ints([(i + 1) * hidden]), b.ints([0])])
                for i in range(4)
            ]
            i, f_, c, o = parts  # torch: input, forget, cell, output
            return b.op("Concat", [i, o, f_, c], axis=0)

        w = b.op("Unsqueeze", [reorder("decoder.rnn.weight_ih"), b.ints([0])])
        r = b.op("Unsqueeze", [reorder("decoder.rnn.weight_hh"), b.ints([0])])
        bias = b.op("Concat", [reorder("decoder.rnn.bias_ih"), reorder("decoder.rnn.bias_hh")],
                    axis=0)  # fmt: skip
        bias = b.op("Unsqueeze", [bias, b.ints([0])])
        h0 = b.op("Slice", [state, b.ints([0]), b.ints([1]), b.ints([0])])
        c0 = b.op("Slice", [state, b.ints([1]), b.ints([2]), b.ints([0])])
        y, yh, yc = b.op("LSTM", [seq, w, r, bias, "", h0, c0], n_out=3, hidden_size=hidden,
                         name=f"{tag}/decoder.rnn")  # fmt: skip
        y = b.op("Squeeze", [y, b.ints([1])])  # [T, N, H]
        y = b.op("Transpose", [b.op("Relu", [y])], perm=[1, 2, 0])  # [N, H, T]
        y = b.op("Sigmoid", [b.op("Conv", [y, decoder_w, decoder_b])])  # [N, 1, T]
        prob = b.op("ReduceMean", [y], axes=[2], keepdims=0, out=f"{tag}_output")
        new_state = b.op("Concat", [yh, yc], axis=0, out=f"{tag}_stateN")
        b.output(prob, ["N", 1])
        b.output(new_state, [2, "N", hidden])
        return b.graph(f"{tag}_branch")

    def raise_branch() -> onnx.GraphProto:
        """Any other rate: silero raises; a graph can only give something, so zeros of the
        same shapes (what a scripted `else` with a fallback value exports to)."""
        b = _Graph(seed + 2, prefix="other/")
        zero = b.op("Mul", [state, b.const(np.float32(0))], out="other_stateN")
        first = b.op("Slice", [zero, b.ints([0]), b.ints([1]), b.ints([2])])  # [2, N, 1]
        prob = b.op("ReduceSum", [first, b.ints([0, 2])], keepdims=0)
        prob = b.op("Unsqueeze", [prob, b.ints([1])], out="other_output")
        b.output(prob, ["N", 1])
        b.output(zero, [2, "N", hidden])
        return b.graph("other_branch")

    is16 = g.op("Equal", [sr, g.const(np.int64(16000))])
    is8 = g.op("Equal", [sr, g.const(np.int64(8000))])
    if8 = helper.make_node("If", [is8], ["else_output", "else_stateN"], name="if_8k",
                           then_branch=branch("sr8k", 2), else_branch=raise_branch())  # fmt: skip
    nested = helper.make_graph([if8], "else16", [], [
        helper.make_tensor_value_info("else_output", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("else_stateN", TensorProto.FLOAT, [2, "N", hidden]),
    ])  # fmt: skip
    g.op("If", [is16], out=["output", "stateN"], name="if_16k",
         then_branch=branch("sr16k", 1), else_branch=nested)  # fmt: skip
    g.output("output", ["N", 1])
    g.output("stateN", [2, "N", hidden])
    return g.model("vad_lstm", opset, "pytorch")


# -- (b) Magika-like: decomposed LayerNorm with an Expand of a computed shape --------------------
def layernorm_classifier(
    *,
    spelling: str = "sum",
    embed: str = "onehot",
    length: int = 64,
    vocab: int = 257,
    width: int = 32,
    dense: int = 64,
    classes: int = 8,
    seed: int = 0,
    opset: int = 13,
) -> onnx.ModelProto:
    """Magika as jax2tf + tf2onnx write it: byte values embedded by OneHot x MatMul (or a Gather
    of the table), a Conv1D written as Unsqueeze/Transpose -> Conv -> Transpose/Squeeze, then a
    LayerNorm spelt out, its mean broadcast back by Expand to a shape computed as
    Shape -> Gather -> Concat, then Dense layers, a max over positions and a softmax.

    spelling "sum": ReduceSum / Div / Sub / Mul / Sqrt (jax's mean as sum over count);
    spelling "mean": ReduceMean / Sub / Pow / Add / Sqrt / Div (tf's moments).
    Input: bytes int32 [N, length] in [0, vocab). Output: probs [N, classes].
    """
    if spelling not in ("sum", "mean"):
        raise ValueError(f"spelling is 'sum' or 'mean', not {spelling!r}")
    if embed not in ("onehot", "gather"):
        raise ValueError(f"embed is 'onehot' or 'gather', not {embed!r}")
    g = _Graph(seed)
    x = g.input("bytes", ["unk__0", length], TensorProto.INT32)
    table = g.weight((vocab, width), "embedding/kernel", 0.5)
    if embed == "onehot":
        onehot = g.op("OneHot", [x, g.const(np.array([vocab], np.int32)),
                                 g.const(np.array([0, 1], np.float32))], axis=-1)  # fmt: skip
        h = g.op("MatMul", [onehot, table])  # [N, L, E]
    else:
        h = g.op("Gather", [table, x], axis=0)
    # Conv1D as tf2onnx writes it (NWC -> NCHW with a unit height)
    h = g.op("Transpose", [g.op("Unsqueeze", [h, g.ints([1])])], perm=[0, 3, 1, 2])
    h = g.op("Conv", [h, g.weight((width, width, 1, 5), "conv1d/kernel"),
                      g.weight((width,), "conv1d/bias", 0.1)],
             kernel_shape=[1, 5], pads=[0, 2, 0, 2])  # fmt: skip
    h = g.op("Squeeze", [g.op("Transpose", [h], perm=[0, 2, 3, 1]), g.ints([1])])  # [N, L, C]
    h = g.op("Relu", [h])

    def reduce(op: str, t: str, axis: int = -1, keepdims: int = 1) -> str:
        if op == "ReduceSum" or opset >= 18:  # ReduceSum takes axes as an input from opset 13
            return g.op(op, [t, g.ints([axis])], keepdims=keepdims)
        return g.op(op, [t], axes=[axis], keepdims=keepdims)

    # Expand target computed from the activation's own shape: [N, L] + [width]
    shape = g.op("Shape", [h])
    lead = g.op("Gather", [shape, g.ints([0, 1])], axis=0)
    target = g.op("Concat", [lead, g.ints([width])], axis=0)
    eps = g.const(np.float32(1e-5))
    if spelling == "sum":
        count = g.const(np.float32(width))
        mean = g.op("Div", [reduce("ReduceSum", h), count])
        centred = g.op("Sub", [h, g.op("Expand", [mean, target])])
        var = g.op("Div", [reduce("ReduceSum", g.op("Mul", [centred, centred])), count])
        std = g.op("Sqrt", [g.op("Add", [var, eps])])
        normed = g.op("Div", [centred, g.op("Expand", [std, target])])
    else:
        mean = reduce("ReduceMean", h)
        centred = g.op("Sub", [h, g.op("Expand", [mean, target])])
        var = reduce("ReduceMean", g.op("Pow", [centred, g.const(np.float32(2))]))
        std = g.op("Sqrt", [g.op("Add", [var, eps])])
        normed = g.op("Div", [centred, std])
    gamma = g.init(np.ones(width, np.float32) + 0.1 * g.rng.standard_normal(width).astype(
        np.float32), "layer_norm/scale")  # fmt: skip
    beta = g.init(0.1 * g.rng.standard_normal(width).astype(np.float32), "layer_norm/bias")
    h = g.op("Add", [g.op("Mul", [normed, gamma]), beta])
    h = g.op("Add", [g.op("MatMul", [h, g.weight((width, dense), "dense/kernel")]),
                     g.weight((dense,), "dense/bias", 0.1)])  # fmt: skip
    h = g.op("Relu", [h])
    h = reduce("ReduceMax", h, axis=1, keepdims=0)  # [N, dense]
    h = g.op("Add", [g.op("MatMul", [h, g.weight((dense, classes), "dense_1/kernel")]),
                     g.weight((classes,), "dense_1/bias", 0.1)])  # fmt: skip
    g.op("Softmax", [h], axis=-1, out="probs")
    g.output("probs", ["unk__0", classes])
    return g.model(f"magika_{spelling}_{embed}", opset, "tf2onnx")


# -- (c) Paddle, opset below 14: Reshape chains, -1 dim_value inputs ----------------------------
def _hardswish_written_out(g: _Graph, x: str) -> str:
    """paddle2onnx below opset 14: x * Clip(x + 3, 0, 6) / 6 (Clip's bounds as inputs)."""
    gate = g.op("Clip", [g.op("Add", [x, g.const(np.float32(3))]), g.const(np.float32(0)),
                         g.const(np.float32(6))])  # fmt: skip
    return g.op("Div", [g.op("Mul", [x, gate]), g.const(np.float32(6))])


def _paddle_conv(g: _Graph, x: str, c_in: int, c_out: int, k: int, stride=(1, 1), group=1):
    """Conv (no bias) + BatchNormalization + hardswish, every parameter a Constant node."""
    w = g.const((g.rng.standard_normal((c_out, c_in // group, k, k)) *
                 np.sqrt(2 / (c_in // group * k * k))).astype(np.float32))  # fmt: skip
    h = g.op("Conv", [x, w], kernel_shape=[k, k], pads=[k // 2] * 4, strides=list(stride),
             group=group)  # fmt: skip
    scale = (1 + 0.1 * g.rng.standard_normal(c_out)).astype(np.float32)
    shift = (0.1 * g.rng.standard_normal(c_out)).astype(np.float32)
    mean = (0.1 * g.rng.standard_normal(c_out)).astype(np.float32)
    var = (1 + 0.1 * np.abs(g.rng.standard_normal(c_out))).astype(np.float32)
    h = g.op("BatchNormalization", [h, g.const(scale), g.const(shift), g.const(mean),
                                    g.const(var)], epsilon=1e-5)  # fmt: skip
    return _hardswish_written_out(g, h)


def paddle_opset11(
    *,
    head: str = "ctc",
    opset: int = 11,
    height: int = 16,
    width: int = 64,
    channels: int = 16,
    classes: int = 12,
    heads: int = 2,
    seed: int = 0,
) -> onnx.ModelProto:
    """PP-OCR recogniser (head "ctc") or PP-LCNet classifier (head "cls") as older paddle2onnx
    writes it at opset 11 or 13: dynamic dims declared as dim_value -1 (not dim_param), every
    weight a Constant node, hardswish written out, Reshape targets with 0 (copy) and -1 (infer)
    entries and no allowzero attribute (a chain: [0, C, -1] -> Transpose -> [0, -1, heads, d]
    -> ... -> [0, -1, C]), a one-block attention neck with fused QKV, a MatMul CTC head with
    Softmax over classes.

    Inputs: x float [-1, 3, height, -1] (ctc) or [-1, 3, height, width] (cls), -1 literally.
    Outputs: softmax_0.tmp_0 [-1, ?, classes] (ctc) or [-1, classes] (cls).
    """
    if head not in ("ctc", "cls"):
        raise ValueError(f"head is 'ctc' or 'cls', not {head!r}")
    if opset >= 14:
        raise ValueError("this shape is the one written below opset 14")
    g = _Graph(seed)
    dims = [-1, 3, height, -1] if head == "ctc" else [-1, 3, height, width]
    x = g.input("x", dims)
    h = _paddle_conv(g, x, 3, channels, 3, stride=(2, 2))
    h = _paddle_conv(g, h, channels, channels, 3, group=channels)  # depthwise
    h = _paddle_conv(g, h, channels, 2 * channels, 1)
    h = _paddle_conv(g, h, 2 * channels, 2 * channels, 3, stride=(2, 1), group=2 * channels)
    c = 2 * channels
    h = _paddle_conv(g, h, c, c, 1)
    if head == "cls":
        h = g.op("GlobalAveragePool", [h])
        h = g.op("Reshape", [h, g.ints([0, -1])])  # flatten as paddle writes it
        h = g.op("MatMul", [h, g.const(g.rng.standard_normal((c, classes)).astype(np.float32)
                                       * np.float32(0.2))])  # fmt: skip
        h = g.op("Add", [h, g.const((0.1 * g.rng.standard_normal(classes)).astype(np.float32))])
        g.op("Softmax", [h], axis=1, out="softmax_0.tmp_0")
        g.output("softmax_0.tmp_0", [-1, classes])
        return g.model("paddle_cls", opset, "PaddlePaddle")
    # collapse the height: average-pool it away, then the Reshape chain into a sequence
    h = g.op("ReduceMean", [h], axes=[2], keepdims=1)  # [N, C, 1, W/2]
    h = g.op("Reshape", [h, g.ints([0, c, -1])])  # [N, C, T]
    seq = g.op("Transpose", [h], perm=[0, 2, 1])  # [N, T, C]

    def linear(t: str, d_in: int, d_out: int) -> str:
        w = (g.rng.standard_normal((d_in, d_out)) * np.sqrt(1 / d_in)).astype(np.float32)
        b = (0.05 * g.rng.standard_normal(d_out)).astype(np.float32)
        return g.op("Add", [g.op("MatMul", [t, g.const(w)]), g.const(b)])

    d = c // heads
    qkv = linear(seq, c, 3 * c)
    qkv = g.op("Reshape", [qkv, g.ints([0, -1, 3, heads, d])])
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3, N, heads, T, d]
    if opset >= 13:
        parts = g.op("Split", [qkv], n_out=3, axis=0)
        q, k, v = (g.op("Squeeze", [p, g.ints([0])]) for p in parts)
    else:  # opset 11: split sizes and squeeze axes are attributes
        parts = g.op("Split", [qkv], n_out=3, axis=0, split=[1, 1, 1])
        q, k, v = (g.op("Squeeze", [p], axes=[0]) for p in parts)
    att = g.op("MatMul", [g.op("Mul", [q, g.const(np.float32(d**-0.5))]),
                          g.op("Transpose", [k], perm=[0, 1, 3, 2])])  # fmt: skip
    att = g.op("Softmax", [att], axis=3)
    mixed = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])  # [N, T, heads, d]
    mixed = g.op("Reshape", [mixed, g.ints([0, -1, c])])
    seq = g.op("Add", [seq, linear(mixed, c, c)])
    seq = g.op("Add", [seq, linear(_hardswish_written_out(g, linear(seq, c, 2 * c)), 2 * c, c)])
    logits = linear(seq, c, classes)
    g.op("Softmax", [logits], axis=2, out="softmax_0.tmp_0")
    # the time axis is left unnamed: ONNX shape inference turns the -1 input width into a time
    # length of 0 (a real hazard of these files), which a declared -1 would contradict
    g.output("softmax_0.tmp_0", [-1, None, classes])
    return g.model("paddle_ocr_rec", opset, "PaddlePaddle")


# -- (d) fixed DFT front end (cos/sin basis) followed by learned convs ---------------------------
def dft_basis(n_fft: int) -> np.ndarray:
    """[2 * (n_fft // 2 + 1), 1, n_fft]: the real (cos) rows then the imaginary (-sin) rows of a
    Hann-windowed DFT, the fixed weight of an STFT done as Conv1d (Silero's forward_basis)."""
    bins = n_fft // 2 + 1
    t = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / n_fft)
    angle = 2 * np.pi * np.outer(np.arange(bins), t) / n_fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window
    return basis[:, None, :].astype(np.float32)


def stft_frontend(
    *,
    samples: int = 256,
    n_fft: int = 32,
    hop: int = 16,
    channels: int = 16,
    layers: int = 2,
    seed: int = 0,
    opset: int = 16,
) -> onnx.ModelProto:
    """Silero VAD's front end: reflect Pad, a Conv1d whose weight `stft.forward_basis_buffer` is
    a fixed cos/sin DFT basis with stride = hop, real and imaginary halves sliced apart, the
    magnitude sqrt(re^2 + im^2), then learned Conv1d + Relu layers and a sigmoid output.
    The basis is signal processing, not a learned weight: pruning it changes the transform.

    Input: input float [N, samples]. Output: output float [N, 1, frames].
    """
    g = _Graph(seed)
    x = g.op("Unsqueeze", [g.input("input", ["N", samples]), g.ints([1])])
    pad = n_fft // 2
    x = g.op("Pad", [x, g.ints([0, 0, pad, 0, 0, pad])], mode="reflect")
    basis = g.init(dft_basis(n_fft), "stft.forward_basis_buffer")
    spec = g.op("Conv", [x, basis], strides=[hop])
    bins = n_fft // 2 + 1
    re = g.op("Slice", [spec, g.ints([0]), g.ints([bins]), g.ints([1])])
    im = g.op("Slice", [spec, g.ints([bins]), g.ints([2 * bins]), g.ints([1])])
    mag = g.op("Sqrt", [g.op("Add", [g.op("Mul", [re, re]), g.op("Mul", [im, im])])])
    h, c_in = mag, bins
    for i in range(layers):
        h = g.op("Conv", [h, g.weight((channels, c_in, 3), f"encoder.{i}.weight"),
                          g.weight((channels,), f"encoder.{i}.bias", 0.1)], pads=[1, 1])
        h = g.op("Relu", [h])
        c_in = channels
    h = g.op("Conv", [h, g.weight((1, c_in, 1), "decoder.weight"),
                      g.weight((1,), "decoder.bias", 0.1)])  # fmt: skip
    g.op("Sigmoid", [h], out="output")
    g.output("output", ["N", 1, samples // hop + 1])
    return g.model("stft_frontend", opset, "pytorch")


# -- (e) CREPE: constant-only computed Pads, a wide long-kernel conv -----------------------------
def crepe_like(
    *,
    channels: int = 128,
    taps: int = 64,
    out_channels: int = 16,
    frame: int = 1024,
    first_kernel: int = 128,
    first_stride: int = 4,
    classes: int = 36,
    pad_chain: str = "torch",
    seed: int = 0,
    opset: int = 13,
) -> onnx.ModelProto:
    """CREPE as torch exports it: the frame reshaped to [N, 1, frame, 1], each conv preceded by a
    Pad whose amounts come from a chain fed by constants only; `pad_chain="torch"` is the one
    torch's opset-11+ F.pad lowering writes without constant folding (Shape of the torch-order
    pads constant -> Gather -> Sub from 2 x rank -> ConstantOfShape -> Concat -> Reshape [-1, 2]
    -> reversing Slice -> Transpose -> Reshape [-1] -> Cast -> Pad), `"simple"` a shorter one
    (Shape of a constant -> Gather -> Sub -> Div -> Concat with zeros -> Pad); conv1 with
    `channels` filters, then the
    wide layer: conv2 reads `channels` channels through a `taps`-tap kernel (an input design of
    channels x taps columns: 1024 x 64 = 65536 in the full model), BatchNorm, MaxPool, a Dense
    head and a Sigmoid. `crepe_like(channels=1024)` is the full-width layer (about 33 MB of
    weights with out_channels=128), built on the fly for tests that lower the memory budget.

    Input: frames float [N, frame]. Output: pitch float [N, classes].
    """
    g = _Graph(seed)
    h = g.op("Reshape", [g.input("frames", ["N", frame]), g.ints([-1, 1, frame, 1])])

    if pad_chain not in ("torch", "simple"):
        raise ValueError(f"pad_chain is 'torch' or 'simple', not {pad_chain!r}")

    def torch_pad(t: str, kernel: int) -> str:
        """F.pad(t, (0, 0, (k - 1) // 2, k // 2)) as the legacy exporter lowers it."""
        torch_order = g.ints([0, 0, (kernel - 1) // 2, kernel // 2])
        length = g.op("Gather", [g.op("Shape", [torch_order]), g.ints([0])], axis=0)
        missing = g.op("Sub", [g.op("Mul", [g.const(np.int64(4)), g.const(np.int64(2))]), length])
        zeros = g.op("ConstantOfShape", [missing],
                     value=numpy_helper.from_array(np.array([0], np.int64)))  # fmt: skip
        pairs = g.op("Reshape", [g.op("Concat", [g.op("Cast", [torch_order], to=7), zeros],
                                      axis=0), g.ints([-1, 2])])  # fmt: skip
        flipped = g.op("Slice", [pairs, g.ints([-1]), g.ints([-(2**63) + 1]), g.ints([0]),
                                 g.ints([-1])])  # fmt: skip
        onnx_order = g.op("Reshape", [g.op("Transpose", [flipped], perm=[1, 0]), g.ints([-1])])
        return g.op("Pad", [t, g.op("Cast", [onnx_order], to=7)], mode="constant")

    def computed_pad(t: str, kernel: int) -> str:
        """'same' padding for a kernel of that height, from constants through shape ops."""
        if pad_chain == "torch":
            return torch_pad(t, kernel)
        k = g.const(np.zeros((kernel, 1), np.float32))  # a constant the exporter kept
        size = g.op("Gather", [g.op("Shape", [k]), g.ints([0])], axis=0)
        total = g.op("Sub", [size, g.ints([1])])
        before = g.op("Div", [total, g.ints([2])])
        after = g.op("Sub", [total, before])
        zero = g.ints([0])
        pads = g.op("Concat", [zero, zero, before, zero, zero, zero, after, zero], axis=0)
        return g.op("Pad", [t, pads], mode="constant")

    def block(t: str, c_in: int, c_out: int, kernel: int, stride: int, tag: str) -> str:
        t = computed_pad(t, kernel)
        t = g.op("Conv", [t, g.weight((c_out, c_in, kernel, 1), f"{tag}.weight"),
                          g.weight((c_out,), f"{tag}.bias", 0.1)],
                 strides=[stride, 1], name=tag)  # fmt: skip
        t = g.op("Relu", [t])
        scale = (1 + 0.1 * g.rng.standard_normal(c_out)).astype(np.float32)
        zeros = np.zeros(c_out, np.float32)
        t = g.op("BatchNormalization", [t, g.init(scale, f"{tag}_bn.weight"),
                                        g.init(zeros, f"{tag}_bn.bias"),
                                        g.init(zeros, f"{tag}_bn.running_mean"),
                                        g.init(np.ones(c_out, np.float32),
                                               f"{tag}_bn.running_var")])  # fmt: skip
        return g.op("MaxPool", [t], kernel_shape=[2, 1], strides=[2, 1])

    h = block(h, 1, channels, first_kernel, first_stride, "conv1")
    h = block(h, channels, out_channels, taps, 1, "conv2")  # the wide long-kernel layer
    length = frame // first_stride // 2 // 2
    h = g.op("Flatten", [g.op("Transpose", [h], perm=[0, 2, 1, 3])], axis=1)
    h = g.op("Gemm", [h, g.weight((classes, length * out_channels), "classifier.weight"),
                      g.weight((classes,), "classifier.bias", 0.1)], transB=1)  # fmt: skip
    g.op("Sigmoid", [h], out="pitch")
    g.output("pitch", ["N", classes])
    return g.model("crepe_like", opset, "pytorch")


# -- (f) YOLOv8 C2f: Split in half, bottlenecks with residual, Concat, 1x1 conv ------------------
def _conv_silu(g: _Graph, x: str, c_in: int, c_out: int, k: int, stride: int = 1,
               tag: str | None = None) -> str:  # fmt: skip
    """Conv with the BatchNorm folded in (as ultralytics exports), then SiLU as x * sigmoid(x)."""
    tag = tag or g.fresh("conv")
    h = g.op("Conv", [x, g.weight((c_out, c_in, k, k), f"{tag}.weight"),
                      g.weight((c_out,), f"{tag}.bias", 0.1)],
             kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride], name=tag)
    return _silu(g, h)


def _c2f(g: _Graph, x: str, c_in: int, c_out: int, n: int, shortcut: bool, tag: str) -> str:
    half = c_out // 2
    h = _conv_silu(g, x, c_in, 2 * half, 1, tag=f"{tag}.cv1")
    parts = list(g.op("Split", [h, g.ints([half, half])], n_out=2, axis=1))
    for i in range(n):
        y = _conv_silu(g, parts[-1], half, half, 3, tag=f"{tag}.m.{i}.cv1")
        y = _conv_silu(g, y, half, half, 3, tag=f"{tag}.m.{i}.cv2")
        parts.append(g.op("Add", [parts[-1], y]) if shortcut else y)
    h = g.op("Concat", parts, axis=1)
    return _conv_silu(g, h, (2 + n) * half, c_out, 1, tag=f"{tag}.cv2")


def c2f_block(
    *,
    channels: int = 16,
    n: int = 1,
    shortcut: bool = True,
    size: int = 16,
    seed: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """YOLOv8's C2f as the legacy torch exporter writes it: a stride-2 stem Conv, then C2f: a 1x1
    conv whose output is Split in two halves, the second half through `n` bottlenecks (two 3x3
    convs) each added back to its input (residual Add), every half and bottleneck output
    Concat-ed, and a 1x1 conv; then SPPF (1x1 conv, three chained 5x5 MaxPools, Concat, 1x1
    conv) and a 1x1 conv to the output. SiLU is Mul(x, Sigmoid(x)).

    Input: images float [N, 3, size, size]. Output: features float [N, channels, size/2, size/2].
    """
    g = _Graph(seed)
    h = _conv_silu(g, g.input("images", ["N", 3, size, size]), 3, channels, 3, 2, "model.0")
    h = _c2f(g, h, channels, channels, n, shortcut, "model.1")
    # SPPF
    half = channels // 2
    h = _conv_silu(g, h, channels, half, 1, tag="model.2.cv1")
    pools = [h]
    for _ in range(3):
        pools.append(g.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2] * 4))
    h = _conv_silu(g, g.op("Concat", pools, axis=1), 4 * half, channels, 1, tag="model.2.cv2")
    g.op("Conv", [h, g.weight((channels, channels, 1, 1), "out.weight")], out="features")
    g.output("features", ["N", channels, size // 2, size // 2])
    return g.model("c2f_block", opset, "pytorch")


# -- (g) YOLOv8 detection head: box/class Concat feeding the decoding and the output -------------
def yolo_head(
    *,
    classes: int = 4,
    reg_max: int = 8,
    width: int = 16,
    size: int = 32,
    seed: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """YOLOv8's Detect head as exported: two levels (strides 8 and 16); per level a box branch
    (3x3, 3x3, 1x1 to 4 * reg_max) and a class branch (to `classes`) Concat-ed on channels,
    Reshape-d to [N, 4 * reg_max + classes, -1] and Concat-ed over levels; then Split into box
    and class parts: DFL (Reshape [N, 4, reg_max, A], Transpose, Softmax, a 1x1 Conv with the
    fixed weight 0..reg_max-1), distances to boxes with constant anchors and strides, Sigmoid
    on the classes, and the two Concat-ed into the output [N, 4 + classes, A].

    Input: images float [N, 3, size, size]. Output: output0 float [N, 4 + classes, anchors].
    """
    g = _Graph(seed)
    x = g.input("images", ["N", 3, size, size])
    h = _conv_silu(g, x, 3, width, 3, 2, "model.0")
    p3 = _conv_silu(g, _conv_silu(g, h, width, width, 3, 2, "model.1"), width, width, 3, 2,
                    "model.2")  # stride 8  # fmt: skip
    p4 = _conv_silu(g, p3, width, 2 * width, 3, 2, "model.3")
    no = 4 * reg_max + classes
    levels, anchors, strides = [], [], []
    for i, (feat, c_in, stride) in enumerate(((p3, width, 8), (p4, 2 * width, 16))):
        side = size // stride
        box = _conv_silu(g, feat, c_in, 16, 3, tag=f"model.4.cv2.{i}.0")
        box = _conv_silu(g, box, 16, 16, 3, tag=f"model.4.cv2.{i}.1")
        box = g.op("Conv", [box, g.weight((4 * reg_max, 16, 1, 1), f"model.4.cv2.{i}.2.weight"),
                            g.weight((4 * reg_max,), f"model.4.cv2.{i}.2.bias", 0.1)])
        cls = _conv_silu(g, feat, c_in, 16, 3, tag=f"model.4.cv3.{i}.0")
        cls = _conv_silu(g, cls, 16, 16, 3, tag=f"model.4.cv3.{i}.1")
        cls = g.op("Conv", [cls, g.weight((classes, 16, 1, 1), f"model.4.cv3.{i}.2.weight"),
                            g.weight((classes,), f"model.4.cv3.{i}.2.bias", 0.1)])
        both = g.op("Concat", [box, cls], axis=1)
        levels.append(g.op("Reshape", [both, g.ints([0, no, -1])]))
        ys, xs = np.meshgrid(np.arange(side) + 0.5, np.arange(side) + 0.5, indexing="ij")
        anchors.append(np.stack([xs.ravel(), ys.ravel()]))
        strides.append(np.full(side * side, stride))
    preds = g.op("Concat", levels, axis=2)  # [N, no, A]
    box, cls = g.op("Split", [preds, g.ints([4 * reg_max, classes])], n_out=2, axis=1)
    # DFL: softmax over reg_max bins, expectation by a fixed 1x1 conv
    dfl = g.op("Reshape", [box, g.ints([0, 4, reg_max, -1])])
    dfl = g.op("Softmax", [g.op("Transpose", [dfl], perm=[0, 2, 1, 3])], axis=1)
    project = np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1)
    dist = g.op("Conv", [dfl, g.init(project, "model.4.dfl.conv.weight")])
    dist = g.op("Reshape", [dist, g.ints([0, 4, -1])])  # [N, 4, A]
    lt, rb = g.op("Split", [dist, g.ints([2, 2])], n_out=2, axis=1)
    anchor = g.init(np.concatenate(anchors, axis=1)[None].astype(np.float32), "anchors")
    x1y1 = g.op("Sub", [anchor, lt])
    x2y2 = g.op("Add", [anchor, rb])
    centre = g.op("Div", [g.op("Add", [x1y1, x2y2]), g.const(np.float32(2))])
    wh = g.op("Sub", [x2y2, x1y1])
    stride_row = g.init(np.concatenate(strides)[None, None].astype(np.float32), "strides")
    boxes = g.op("Mul", [g.op("Concat", [centre, wh], axis=1), stride_row])
    g.op("Concat", [boxes, g.op("Sigmoid", [cls])], axis=1, out="output0")
    total = sum(a.shape[1] for a in anchors)
    g.output("output0", ["N", 4 + classes, total])
    return g.model("yolo_head", opset, "pytorch")


# -- inputs for any of them ---------------------------------------------------------------------
def feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a builder's model: symbolic and -1 dims get `batch` (the first) or the sizes a
    builder documents; `sr` is 16000, integer inputs are byte values, `state` is small noise."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        dims = []
        for i, d in enumerate(tensor.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if i == 0 or value.name == "state" else 64)
        if value.name == "state":
            dims = [2, batch, *dims[2:]]
        if value.name == "sr":
            out[value.name] = np.array(16000, np.int64)
        elif tensor.elem_type in (TensorProto.INT32, TensorProto.INT64):
            dtype = np.int32 if tensor.elem_type == TensorProto.INT32 else np.int64
            out[value.name] = rng.integers(0, 256, dims).astype(dtype)
        else:
            scale = 0.1 if value.name == "state" else 1.0
            out[value.name] = (rng.standard_normal(dims) * scale).astype(np.float32)
    return out


def all_builders() -> dict[str, onnx.ModelProto]:
    """Every builder at its default size, plus the variants a diagnostic should see, by name."""
    return {
        "vad_lstm": vad_lstm(),
        "layernorm_sum_onehot": layernorm_classifier(spelling="sum", embed="onehot"),
        "layernorm_mean_gather": layernorm_classifier(spelling="mean", embed="gather"),
        "paddle_ocr_opset11": paddle_opset11(head="ctc", opset=11),
        "paddle_cls_opset13": paddle_opset11(head="cls", opset=13),
        "stft_frontend": stft_frontend(),
        "crepe_like": crepe_like(),
        "crepe_like_simple_pads": crepe_like(pad_chain="simple"),
        "c2f_block": c2f_block(),
        "yolo_head": yolo_head(),
    }
