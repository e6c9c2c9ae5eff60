"""Models built like real exports (issue 13, points 3, 4 and 8): nothing skipped in silence,
nothing frozen for no good reason, one line for the layers an N:M pattern leaves dense.

- Paddle-style: every weight a Constant node, biases added through a Reshape (or Unsqueeze) of a
  constant, hardswish written out, a constant added after an activation.
- Weights inside an If (silero-vad): channel removal refuses, unstructured pruning prunes them.
- LSTM, GRU and RNN: W and R pruned unstructured, listed (not reached) by channel removal.
- A recogniser-like model whose head writes the model output, a Conv that reads the height as
  channels and a MatMul with a stored left operand: every weight in the structured table.
- MiniLM-like attention: Reshape targets computed from the Shape of [batch, seq, width].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune import channels, pipeline, weights
from onnxprune.calibration import Calibration
from onnxprune.cli import main
from onnxprune.errors import NothingToPruneError
from onnxprune.options import Selection
from onnxprune.report.weights import format_report
from tests.builders import GraphBuilder, initializers, run, save
from tests.channel_models import analyse, check_invariant, feeds


def _const(b: GraphBuilder, shape: tuple[int, ...], scale: float = 0.3) -> str:
    return b.constant((b.rng.standard_normal(shape) * scale).astype(np.float32))


def _scalar(b: GraphBuilder, v: float) -> str:
    return b.constant(np.array(v, np.float32))


# -- Paddle-style exports (point 4) ------------------------------------------------------------
def paddle_style(scalar_add: bool = False) -> onnx.ModelProto:
    """A PP-LCNet-style classifier as paddle2onnx writes it: every weight a Constant node, each
    Conv's bias added through Reshape(Constant, [1, C, 1, 1]) (elementwise_add with axis 1; the SE
    block's through Unsqueeze), BatchNorm, hardswish written out as x * Clip(x + 3, 0, 6) / 6, a
    constant added after an activation (per channel, or a scalar), a depthwise Conv, an SE block,
    and a MatMul head with its bias, then Softmax."""
    b = GraphBuilder(40)

    def conv(h: str, c_in: int, c_out: int, k: int = 1, group: int = 1, how: str = "reshape"):
        h = b.node("Conv", [h, _const(b, (c_out, c_in // group, k, k))], pads=[k // 2] * 4,
                   group=group)  # fmt: skip
        bias = _const(b, (c_out,))
        if how == "reshape":
            bias = b.node("Reshape", [bias, b.constant(np.array([1, c_out, 1, 1], np.int64))])
        else:
            bias = b.node("Unsqueeze", [bias, b.constant(np.array([0, 2, 3], np.int64))])
        return b.node("Add", [h, bias])

    def hardswish(h: str) -> str:
        gate = b.node("Clip", [b.node("Add", [h, _scalar(b, 3)]), _scalar(b, 0), _scalar(b, 6)])
        return b.node("Div", [b.node("Mul", [h, gate]), _scalar(b, 6)])

    h = b.node("Conv", [b.input("x", ["N", 3, 8, 8]), _const(b, (8, 3, 3, 3))], pads=[1] * 4)
    scale = np.abs(b.rng.standard_normal(8)).astype(np.float32) + 0.5
    h = b.node("BatchNormalization", [h, b.constant(scale), _const(b, (8,)), _const(b, (8,)),
                                      b.constant(scale)])  # fmt: skip
    h = hardswish(h)
    if scalar_add:
        h = b.node("Add", [b.node("Relu", [h]), _scalar(b, 0.5)])
    else:
        shift = b.node("Reshape", [_const(b, (8,)), b.constant(np.array([1, 8, 1, 1], np.int64))])
        h = b.node("Add", [b.node("Relu", [h]), shift])
    h = hardswish(conv(h, 8, 8, k=3, group=8))
    gate = conv(b.node("GlobalAveragePool", [h]), 8, 4, how="unsqueeze")
    gate = conv(b.node("Relu", [gate]), 4, 8, how="unsqueeze")
    h = b.node("Mul", [h, b.node("HardSigmoid", [gate], alpha=1 / 6, beta=0.5)])
    h = hardswish(conv(h, 8, 16))
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    h = b.node("Add", [b.node("MatMul", [h, _const(b, (16, 5))]), _const(b, (5,))])
    b.node("Softmax", [h], out="y", axis=-1)
    b.output("y", shape=["N", 5])
    return b.model()


@pytest.mark.parametrize("scalar_add", [False, True])
def test_paddle_biases_through_reshape_freeze_nothing(scalar_add: bool) -> None:
    proto = paddle_style(scalar_add)
    _, graph = analyse(proto)
    assert [layer.op_type for layer in graph.layers] == ["Conv"] * 5 + ["MatMul"]
    for layer in graph.layers[:-1]:
        assert not graph.frozen[layer.classes].any(), (layer.name, graph.reasons)
    assert graph.frozen[graph.layers[-1].classes].all()  # the head: Softmax, model output
    assert not any("Reshape" in r or "Unsqueeze" in r for r in graph.reasons), graph.reasons
    assert graph.unreached == []


def test_paddle_style_invariant(tmp_path: Path) -> None:
    for seed in (0, 1):
        plan = check_invariant(paddle_style(), tmp_path, seed)
        assert plan.removed.any()


def test_paddle_style_prunes_end_to_end(tmp_path: Path) -> None:
    proto = paddle_style(scalar_add=True)
    source = save(proto, tmp_path / "m.onnx")
    _, report = pipeline.prune(source, 0.3, structured=True, output=tmp_path / "o.onnx")
    assert report.channels.achieved >= 0.3
    assert report.compensation.layers >= 1  # the constant added after the Relu
    out = run(tmp_path / "o.onnx", feeds(proto))[0]
    assert out.shape == run(proto, feeds(proto))[0].shape


# -- weights inside an If (point 3) ------------------------------------------------------------
def _branch(name: str, seed: int) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), f"{name}_w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), f"{name}_w2")
    nodes = [
        helper.make_node("MatMul", ["x", w1.name], [f"{name}_h"], name=f"{name}_mm1"),
        helper.make_node("Relu", [f"{name}_h"], [f"{name}_r"]),
        helper.make_node("MatMul", [f"{name}_r", w2.name], [f"{name}_y"], name=f"{name}_mm2"),
    ]
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])
    return helper.make_graph(nodes, name, [], [out], [w1, w2])


def weights_in_if() -> onnx.ModelProto:
    """silero-vad: the sample rate chooses a branch, and every weight sits in the branches."""
    b = GraphBuilder(0)
    b.input("x", ["N", 16])
    rate = b.input("sr", [], TensorProto.INT64)
    cond = b.node("Equal", [rate, b.constant(np.array(16000, np.int64))])
    b.nodes.append(
        helper.make_node("If", [cond], ["y"], name="choose_rate",
                         then_branch=_branch("a", 1), else_branch=_branch("b", 2))
    )  # fmt: skip
    b.output("y", shape=["N", 4])
    return b.model()


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_structured_refuses_weights_inside_if(command: list[str], tmp_path: Path) -> None:
    source = save(weights_in_if(), tmp_path / "in.onnx")
    result = CliRunner().invoke(
        main, [*command, str(source), "--structured", "-s", "0.5", "--report", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, result.output
    assert "no channel can be removed" in result.output
    assert "If 'choose_rate'" in result.output and "main graph" in result.output
    assert "without --structured" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_unstructured_prunes_weights_inside_if(tmp_path: Path) -> None:
    proto = weights_in_if()
    source = save(proto, tmp_path / "in.onnx")
    _, report = pipeline.prune(source, 0.5, output=tmp_path / "out.onnx")
    assert (
        report.plan.total == 2 * (16 * 32 + 32 * 4) and report.plan.pruned == report.plan.total // 2
    )
    pruned = onnx.load(str(tmp_path / "out.onnx"))
    branches = [a.g for a in pruned.graph.node[-1].attribute]
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for g in branches for t in g.initializer)
    assert zeros == report.plan.pruned
    data = {"x": np.ones((2, 16), np.float32), "sr": np.array(16000, np.int64)}
    assert run(tmp_path / "out.onnx", data)[0].shape == (2, 4)


def test_structured_lists_if_weights_beside_main_graph_layers() -> None:
    """Weights in a subgraph next to prunable main-graph layers: listed, the rest pruned."""
    proto = weights_in_if()
    b = GraphBuilder(3)
    b.nodes, b.inputs, b.outputs = list(proto.graph.node), list(proto.graph.input), []
    h = b.node("Relu", [b.node("MatMul", ["y", b.weight((4, 8))])])
    b.node("MatMul", [h, b.weight((8, 3))], out="z")
    b.output("z", shape=["N", 3])
    _, graph = analyse(b.model())
    assert len(graph.layers) == 2 and graph.prunable.any()
    channels.check_removable(graph)  # something is removable: no refusal
    assert sorted(u.weight for u in graph.unreached) == ["a_w1", "a_w2", "b_w1", "b_w2"]
    assert all("If 'choose_rate'" in u.reason for u in graph.unreached)


# -- LSTM, GRU, RNN (point 3) ------------------------------------------------------------------
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
HIDDEN, FEATURES = 16, 8


def recurrent(op: str) -> onnx.ModelProto:
    """x [N, T, 8] -> Transpose to [T, N, 8] (as torch writes batch_first) -> op -> last hidden
    state -> MatMul, Relu, MatMul."""
    b = GraphBuilder(7)
    x = b.node("Transpose", [b.input("x", ["N", 5, FEATURES])], perm=[1, 0, 2])
    g = GATES[op]
    w = b.weight((1, g * HIDDEN, FEATURES), name=f"{op}_W", scale=0.3)
    r = b.weight((1, g * HIDDEN, HIDDEN), name=f"{op}_R", scale=0.3)
    bias = b.weight((1, 2 * g * HIDDEN), name=f"{op}_B", scale=0.1)
    _, last = b.node(op, [x, w, r, bias], n_out=2, hidden_size=HIDDEN)
    h = b.node("Squeeze", [last, b.constant(np.array([0], np.int64))])
    h = b.node("Relu", [b.node("MatMul", [h, b.weight((HIDDEN, 12), name="fc1")])])
    b.node("MatMul", [h, b.weight((12, 4), name="fc2")], out="y")
    b.output("y", shape=["N", 4])
    return b.model()


@pytest.mark.parametrize("op", sorted(GATES))
def test_recurrent_weights_are_found_per_gate(op: str) -> None:
    found = weights.find_weights(ir.serde.deserialize_model(recurrent(op)))
    by_name = {w.name: w for w in found.weights}
    assert sorted(by_name) == sorted([f"{op}_W", f"{op}_R", "fc1", "fc2"])
    for name in (f"{op}_W", f"{op}_R"):
        weight = by_name[name]
        assert weight.op_type == op and (weight.out_axis, weight.in_axis) == (1, 2)
    assert all(name != f"{op}_B" for name, _ in found.skipped)  # biases are not weights


@pytest.mark.parametrize("op", sorted(GATES))
def test_recurrent_weights_pruned_exactly(op: str, tmp_path: Path) -> None:
    proto = recurrent(op)
    source = save(proto, tmp_path / "in.onnx")
    _, report = pipeline.prune(source, 0.6, output=tmp_path / "out.onnx")
    g = GATES[op]
    total = g * HIDDEN * (FEATURES + HIDDEN) + HIDDEN * 12 + 12 * 4
    assert report.plan.total == total and report.plan.pruned == round(0.6 * total)
    stored = initializers(tmp_path / "out.onnx")
    names = (f"{op}_W", f"{op}_R", "fc1", "fc2")
    assert sum(int((stored[n] == 0).sum()) for n in names) == round(0.6 * total)
    assert (stored[f"{op}_W"] == 0).any() and (stored[f"{op}_R"] == 0).any()
    assert not (stored[f"{op}_B"] == 0).any()  # biases stay
    out = run(tmp_path / "out.onnx", feeds(proto))[0]
    assert out.shape == (2, 4) and np.isfinite(out).all()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_two_four_along_the_input_axis(op: str, tmp_path: Path) -> None:
    source = save(recurrent(op), tmp_path / "in.onnx")
    pipeline.prune(source, Selection(pattern="2:4"), output=tmp_path / "out.onnx")
    stored = initializers(tmp_path / "out.onnx")
    for name in (f"{op}_W", f"{op}_R"):
        groups = (stored[name] == 0).reshape(*stored[name].shape[:2], -1, 4)
        assert (groups.sum(axis=-1) == 2).all(), name


def test_recurrent_weights_listed_by_inspect_and_channel_removal(tmp_path: Path) -> None:
    source = save(recurrent("LSTM"), tmp_path / "in.onnx")
    result = CliRunner().invoke(main, ["inspect", str(source)])
    assert result.exit_code == 0, result.output
    assert "LSTM_W" in result.output and "LSTM_R" in result.output
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        main, ["inspect", str(source), "--structured", "-s", "0.1", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "not reached: 2 layer(s)" in result.output and "recurrent hidden size" in result.output
    data = json.loads(report.read_text())
    assert sorted(u["weight"] for u in data["unreached"]) == ["LSTM_R", "LSTM_W"]
    assert all(u["op_type"] == "LSTM" and u["channels"] == 4 * HIDDEN for u in data["unreached"])


def test_recurrent_weights_fall_back_to_magnitude_under_calibration(tmp_path: Path) -> None:
    proto = recurrent("GRU")
    data = {"x": np.random.default_rng(0).standard_normal((32, 5, FEATURES)).astype(np.float32)}
    _, report = pipeline.prune(
        ir.serde.deserialize_model(proto), 0.5, calibration=Calibration(data=data, device="cpu")
    )
    fallback = dict(report.calibration.fallback)
    assert sorted(fallback) == ["GRU_R", "GRU_W"]
    assert all("not calibrated" in why for why in fallback.values())
    assert report.plan.pruned == round(0.5 * report.plan.total)
    assert "ranked by magnitude, not repaired: GRU_W" in format_report(report)


# -- a recogniser: every weight in the structured table (point 3) ------------------------------
def recogniser() -> onnx.ModelProto:
    """Convs, a Conv that reads the height as its channels (its rule gives up), the feature map
    turned into a sequence, a MatMul that mixes time steps with a stored left operand, an MLP,
    and a head MatMul that writes the model output."""
    b = GraphBuilder(50)

    def layer(name: str, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        y = b.node(op, inputs, out=out, **attrs)
        b.nodes[-1].name = name
        return y

    x = b.input("x", ["N", 1, 8, 32])
    h = layer("stem", "Conv", [x, b.weight((8, 1, 3, 3), name="stem.w")], pads=[1] * 4,
              strides=[2, 2])  # fmt: skip
    h = layer("pw", "Conv", [b.node("Relu", [h]), b.weight((8, 8, 1, 1), name="pw.w")])
    h = b.node("Transpose", [b.node("Relu", [h])], perm=[0, 2, 1, 3])  # [N, 4, 8, 16]
    h = layer("height", "Conv", [h, b.weight((6, 4, 1, 1), name="height.w")])
    h = b.node("ReduceMean", [h], axes=[2], keepdims=0)
    h = b.node("Transpose", [h], perm=[0, 2, 1])  # [N, 16, 6]
    h = layer("fc1", "MatMul", [h, b.weight((6, 12), name="fc1.w")])
    h = layer("mix", "MatMul", [b.weight((16, 16), name="mix.w", scale=0.2), b.node("Relu", [h])])
    h = layer("fc2", "MatMul", [h, b.weight((12, 12), name="fc2.w")])
    layer("head", "MatMul", [b.node("Relu", [h]), b.weight((12, 5), name="head.w")], out="y")
    b.output("y", shape=["N", 16, 5])
    return b.model()


def test_every_weight_appears_in_the_structured_table(tmp_path: Path) -> None:
    source = save(recogniser(), tmp_path / "in.onnx")
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        main, ["inspect", str(source), "--structured", "-s", "0.1", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    listed = [layer["weight"] for layer in data["layers"]] + [
        u["weight"] for u in data["unreached"]
    ]
    found = weights.find_weights(ir.serde.deserialize_model(recogniser()))
    everything = {w.name for w in found.weights}
    assert sorted(listed) == sorted(everything) and len(everything) == 7
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert sorted(layers) == ["fc1", "fc2", "head", "pw", "stem"]
    for name in ("fc1", "pw", "head"):  # every channel frozen: kept whole, with the reason
        assert layers[name]["frozen"] == layers[name]["channels"] == layers[name]["kept"]
        assert layers[name]["reasons"], name
    assert any("model output 'y'" in r for r in layers["head"]["reasons"])
    assert layers["stem"]["frozen"] == layers["fc2"]["frozen"] == 0
    unreached = {u["name"]: u for u in data["unreached"]}
    assert sorted(unreached) == ["height", "mix"]
    assert "other than 1 would be mixed by a convolution" in unreached["height"]["reason"]
    assert "stored left operand" in unreached["mix"]["reason"]
    assert unreached["height"]["channels"] == 6 and unreached["mix"]["params"] == 256
    # the table: a row for each of the seven, in graph order, and a line per reason
    rows = [line.split()[0] for line in result.output.splitlines()[2:9]]
    assert rows == ["stem", "pw", "height", "fc1", "mix", "fc2", "head"]
    assert result.output.count("not reached: 1 layer(s)") == 2
    assert "frozen" in next(line for line in result.output.splitlines() if line.startswith("head"))


# -- MiniLM-like attention (point 4) -----------------------------------------------------------
WIDTH, HEADS = 16, 4


def minilm_like(seq_from_shape: bool = True) -> onnx.ModelProto:
    """BERT self-attention as torch.onnx.export writes it: Q/K/V MatMul + Add, Reshape to
    [batch, seq, heads, head_dim] with batch and seq taken from the Shape of the hidden states
    (or seq written -1, as view(batch, -1, heads, head_dim)) and heads, head_dim literal
    constants, back to [batch, seq, width] the same way."""
    b = GraphBuilder(60)
    x = b.input("x", ["batch", "seq", WIDTH])

    def linear(h: str, d_in: int, d_out: int) -> str:
        return b.node("Add", [b.node("MatMul", [h, b.weight((d_in, d_out), scale=0.3)]),
                              b.weight((d_out,), scale=0.1)])  # fmt: skip

    def dim(h: str, i: int) -> str:
        entry = b.node("Gather", [b.node("Shape", [h]), b.constant(np.array(i, np.int64))], axis=0)
        return b.node("Unsqueeze", [entry, b.constant(np.array([0], np.int64))])

    def literal(v: int) -> str:
        return b.constant(np.array([v], np.int64))

    h = b.node("Relu", [linear(x, WIDTH, WIDTH)])
    seq = dim(h, 1) if seq_from_shape else literal(-1)
    split = b.node("Concat", [dim(h, 0), seq, literal(HEADS), literal(WIDTH // HEADS)], axis=0)
    q, k, v = (b.node("Reshape", [linear(h, WIDTH, WIDTH), split]) for _ in range(3))
    q = b.node("Transpose", [q], perm=[0, 2, 1, 3])
    kt = b.node("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.node("Transpose", [v], perm=[0, 2, 1, 3])
    scores = b.node("Div", [b.node("MatMul", [q, kt]), _scalar(b, 2.0)])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    mixed = b.node("Transpose", [mixed], perm=[0, 2, 1, 3])
    merge = b.node("Concat", [dim(mixed, 0), dim(mixed, 1), literal(WIDTH)], axis=0)
    h = b.node("Add", [h, linear(b.node("Reshape", [mixed, merge]), WIDTH, WIDTH)])
    b.node("MatMul", [h, b.weight((WIDTH, 3))], out="y")
    b.output("y", shape=["batch", "seq", 3])
    return b.model()


@pytest.mark.parametrize("seq_from_shape", [True, False])
@pytest.mark.parametrize("heads", [False, True])
def test_computed_batch_and_sequence_do_not_freeze_qkv(
    heads: bool, seq_from_shape: bool, tmp_path: Path
) -> None:
    proto = minilm_like(seq_from_shape)
    _, graph = analyse(proto, heads=heads)
    qkv = graph.layers[1:4]
    assert all(layer.op_type == "MatMul" for layer in qkv)
    for layer in qkv:
        assert not graph.frozen[layer.classes].any(), (layer.name, graph.reasons)
    assert not any("computed target" in r for r in graph.reasons), graph.reasons
    if heads:
        assert len(graph.heads) == 1 and len(graph.heads[0].classes) == HEADS
    plan = check_invariant(proto, tmp_path, heads=heads, sizes={"batch": 2, "seq": 3})
    assert plan.removed.any()


# -- N:M: one line for the layers left dense (point 8) -----------------------------------------
def test_pattern_says_once_which_layers_stay_dense(tmp_path: Path) -> None:
    b = GraphBuilder(70)
    h = b.node("Conv", [b.input("x", ["N", 8, 6, 6]), b.weight((8, 8, 1, 1))])
    for _ in range(3):  # depthwise: one weight per input channel
        h = b.node("Conv", [b.node("Relu", [h]), b.weight((8, 1, 3, 3))], pads=[1] * 4, group=8)
    h = b.node("Conv", [h, b.weight((6, 8, 1, 1))])
    b.node("Conv", [h, b.weight((4, 6, 1, 1))], out="y")
    b.output("y")
    source = save(b.model(), tmp_path / "in.onnx")
    result = CliRunner().invoke(main, [str(source), "--pattern", "2:4"])
    assert result.exit_code == 0, result.output
    dense = [line for line in result.output.splitlines() if "left dense" in line]
    assert len(dense) == 2, dense
    assert dense[0].startswith("warning: 3 layers left dense: their input axis has fewer than 4")
    assert dense[1].startswith("warning: 1 layer left dense: its input axis is not a multiple")


def test_nothing_removable_names_the_frozen_reasons() -> None:
    """A model whose only layer writes the model output: refused, with why."""
    b = GraphBuilder(80)
    b.node("MatMul", [b.input("x", ["N", 4]), b.weight((4, 3))], out="y")
    b.output("y", shape=["N", 3])
    _, graph = analyse(b.model())
    with pytest.raises(NothingToPruneError, match="model output 'y'"):
        channels.check_removable(graph)
