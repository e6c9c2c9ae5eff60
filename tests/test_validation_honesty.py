"""Honest validation numbers: MACs at the shapes run (a partial sum never printed as a total,
never negative), generated inputs the graph can use, scalar inputs, and what agreement can mean."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import IR_VERSION, OPSET, GraphBuilder, mlp, run, save
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import inputs, runtime, validate
from onnxprune.cli import main
from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.ops.conv import conv_output
from onnxprune.report import validation as report_validation
from onnxprune.report.sweep import format_sweep
from onnxprune.sweep import sweep
from onnxprune.validate import metrics
from tests.channel_models import heads_torchscript

CPU = {"device": "cpu", "latency": False}


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- MACs: one rule per op, against hand counts ------------------------------------------------


def test_matmul_and_gemm_macs_by_hand(tmp_path) -> None:
    b = GraphBuilder()
    a = b.input("a", [2, 1, 4, 5])
    v = b.input("v", [5])
    t = b.input("t", [5, 4])
    b.node("MatMul", [a, b.weight((3, 5, 6))], out="batched")  # [2, 3, 4, 6]: batch broadcast
    b.node("MatMul", [v, b.weight((5, 6))], out="vector")  # [6]: a vector is one row
    b.node("Gemm", [t, b.weight((6, 5))], out="gemm", transA=1, transB=1)  # [4, 6]
    for name in ("batched", "vector", "gemm"):
        b.output(name)
    path = save(b.model(), tmp_path / "m.onnx")
    shapes = {"a": (2, 1, 4, 5), "v": (5,), "t": (5, 4)}
    feeds = {k: np.ones(s, np.float32) for k, s in shapes.items()}
    assert [o.shape for o in run(path, feeds)] == [(2, 3, 4, 6), (6,), (4, 6)]
    cost = metrics.model_cost(path, shapes)
    # 2*3 batches of 4x5 @ 5x6; 1x5 @ 5x6; (5x4)^T @ (6x5)^T: 4x5 @ 5x6
    assert cost.macs == 2 * 3 * 4 * 5 * 6 + 5 * 6 + 4 * 5 * 6
    assert cost.macs_complete and cost.macs_unknown == []


CONVS = [
    {},
    {"group": 2},
    {"strides": [2, 3]},
    {"dilations": [2, 1], "pads": [1, 0, 2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [3, 1], "group": 4},
    {"auto_pad": "VALID", "strides": [2, 2], "dilations": [1, 2]},
]


@pytest.mark.parametrize("attrs", CONVS, ids=lambda a: ",".join(a) or "plain")
def test_conv_macs_match_onnx_runtime_shapes(tmp_path, attrs) -> None:
    groups = attrs.get("group", 1)
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 9, 10])
    w = b.weight((8, 4 // groups, 3, 2))
    b.node("Conv", [x, w], out="y", **attrs)
    b.output("y", shape=["N", 8, "h", "w"])
    model = b.model()
    path = save(model, tmp_path / "m.onnx")
    (y,) = run(path, {"x": np.ones((1, 4, 9, 10), np.float32)})
    # the output size from the attributes alone (what counts when inference gives none)
    node = ir.from_proto(model.graph.node[0])
    assert conv_output((1, 4, 9, 10), (8, 4 // groups, 3, 2), node) == y.shape
    per_output = (4 // groups) * 3 * 2
    assert metrics.model_cost(path, {"x": (1, 4, 9, 10)}).macs == y.size * per_output


def test_conv_transpose_macs_by_hand(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 3, 3])
    # groups 2: each input element reaches 3 (C_out / groups) x 3x3 outputs, whatever the stride
    b.node("ConvTranspose", [x, b.weight((4, 3, 3, 3))], out="y", strides=[2, 2], group=2)
    b.output("y", shape=["N", 6, 7, 7])
    path = save(b.model(), tmp_path / "m.onnx")
    assert metrics.model_cost(path, {"x": (1, 4, 3, 3)}).macs == 4 * 3 * 3 * (3 * 3 * 3)


def _attention_macs(s: int, width: int) -> int:
    """heads_torchscript at sequence s with `width` channels left in q, k and v (head_dim 4)."""
    return (
        s * 6 * 12  # input projection
        + 3 * s * 12 * width  # q, k, v
        + 2 * s * s * width  # q k^T and scores @ v, over all heads
        + s * width * 12  # output projection
        + s * 12 * 3  # head
    )


def test_structured_attention_macs_at_the_shapes_run(tmp_path) -> None:
    """Reshape targets computed from Shape, an Expanded mask, heads removed: every MatMul is
    counted at the sequence length run, and the ratio is one of two whole counts."""
    src = save(heads_torchscript(), tmp_path / "a.onnx")
    out = tmp_path / "p.onnx"
    _, report = onnxprune.prune(src, 0.3, output=out, structured=onnxprune.Structured(heads=True))
    # the output projection [width, 12] reads the `width` channels q, k and v keep of 12
    stored = [list(t.dims) for t in onnx.load(str(out)).graph.initializer]
    width = next(d[0] for d in stored if len(d) == 2 and d[1] == 12 and d[0] != 6)
    data = {"x": np.ones((3, 5, 6), np.float32), "keep": np.ones((3, 5), np.float32)}
    v = validate.validate(src, out, data=data, **CPU)
    assert v.reference.cost.macs == _attention_macs(5, 12)
    assert v.candidate.cost.macs == _attention_macs(5, width) < v.reference.cost.macs
    assert v.reference.cost.macs_complete and v.candidate.cost.macs_complete
    text = report_validation.format_validation(v)
    ratio = v.candidate.cost.macs / v.reference.cost.macs
    assert f"x{ratio:.3f}" in next(line for line in text.splitlines() if "MACs (dense)" in line)
    # the planner cannot count at a sequence the model leaves open: it says so
    assert report.channels.macs_open
    from onnxprune.report.channels import channel_dict, format_channels

    assert "MACs unknown (" in format_channels(report.channels)
    assert channel_dict(report.channels)["macs"]["before"] is None
    # at --input-shape it counts the weights' MACs as validation does (the products of two
    # activations, q k^T and scores @ v, are no weight's)
    shapes = {"x": (1, 5, 6), "keep": (1, 5)}
    again = tmp_path / "again.onnx"
    _, report = onnxprune.prune(
        src, 0.3, output=again, structured=onnxprune.Structured(heads=True, input_shapes=shapes)
    )
    assert not report.channels.macs_open and report.channels.macs_at == {
        "x": [1, 5, 6],
        "keep": [1, 5],
    }
    before, after = report.channels.macs
    assert before == _attention_macs(5, 12) - 2 * 5 * 5 * 12
    assert after == metrics.model_cost(again, shapes).macs - 2 * 5 * 5 * width


@pytest.mark.parametrize("stale", [-1, 0, 5])
def test_declared_shapes_of_computed_values_are_no_sizes(stale) -> None:
    """value_info that copied the input's -1 batch (as the structured classifier's did), or any
    stale entry, would make MACs negative or wrong: shapes are inferred again at the shapes run.
    (The loader refuses such files; the counter does not rely on it.)"""
    proto = mlp(dims=(4, 8, 3))
    for node in proto.graph.node:
        for name in node.output:
            proto.graph.value_info.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [stale, 8])
            )
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = stale
    count = metrics.count_macs(ir.from_proto(proto), {"x": (1, 4)})
    assert (count.dense, count.unknown) == (4 * 8 + 8 * 3, [])
    cost = metrics.ModelCost(0, 0, 0, 0, -5, -5, {}, [])
    assert report_validation.macs_text(cost) == "unknown"  # never a negative figure


def _symbolic_cnn() -> onnx.ModelProto:
    b = GraphBuilder(3)
    x = b.input("x", ["N", 3, "H", "W"])
    c = b.node("Relu", [b.node("Conv", [x, b.weight((8, 3, 3, 3))], pads=[1, 1, 1, 1])])
    c = b.node("Conv", [c, b.weight((8, 8, 3, 3))], pads=[1, 1, 1, 1])
    f = b.node("Flatten", [b.node("GlobalAveragePool", [c])])
    b.node("Gemm", [f, b.weight((2, 8))], out="y", transB=1)
    b.output("y", shape=["N", 2])
    return b.model()


def test_symbolic_height_width(tmp_path) -> None:
    """The prune report says its MACs are unknown rather than print the parameter count, or
    counts them at --input-shape and says so; validation counts at the shapes it runs."""
    path = save(_symbolic_cnn(), tmp_path / "m.onnx")
    _, report = onnxprune.prune(path, 0.3, structured=True)
    from onnxprune.report.channels import channel_dict, format_channels

    assert "MACs unknown (2 layers depend on sizes the model leaves open" in format_channels(
        report.channels
    )
    data = channel_dict(report.channels)["macs"]
    assert data["before"] is None and not data["complete"] and len(data["open"]) == 2
    # --target macs cannot weigh layers by MACs it does not know: a warning says so
    _, report = onnxprune.prune(path, 0.3, structured=onnxprune.Structured(target="macs"))
    assert any(w.startswith("--target macs: 2 layers' MACs depend") for w in report.warnings)

    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    result = _cli(
        "prune", path, "--structured", "-s", "0.3", "-o", out, "--report", rep, "--validate",
        "--input-shape", "x=1x3x6x5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(rep.read_text())
    counted = 30 * (8 * 27 + 8 * 72) + 16  # two 3x3 Convs at 6x5, the Gemm
    assert data["macs"]["before"] == counted and data["macs"]["at"] == {"x": [1, 3, 6, 5]}
    assert f"MACs {counted / 1000:.3g}k -> " in result.output and " at x=1x3x6x5" in result.output
    before, after = data["validation"]["reference"], data["validation"]["candidate"]
    assert before["macs"] == counted and before["macs_complete"]
    assert before["macs_at"] == {"x": [1, 3, 6, 5]}
    assert after["macs"] == data["macs"]["after"]  # the planner and validation agree


# -- subgraphs: If and Loop --------------------------------------------------------------------


def _if_model(cond_from: str) -> onnx.ModelProto:
    """y = x @ A (then) or x @ B @ C (else); the condition from the data in x (known only at run
    time), an int64 scalar `sr` compared with 16000 (silero's sample rate), or the shape of x."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.NodeProto:
        array = rng.standard_normal(shape).astype(np.float32)
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    then = helper.make_graph(
        [weight("A", (4, 3)), helper.make_node("MatMul", ["x", "A"], ["t"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 3])],
    )
    other = helper.make_graph(
        [
            weight("B", (4, 3)),
            weight("C", (3, 3)),
            helper.make_node("MatMul", ["x", "B"], ["e1"], name="else_mm1"),
            helper.make_node("MatMul", ["e1", "C"], ["e"], name="else_mm2"),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 3])],
    )
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    nodes, inits = [], []
    if cond_from == "data":
        inits.append(numpy_helper.from_array(np.array(0, np.float32), "zero"))
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["cond"]),
        ]
        cond = "cond"
    elif cond_from == "sr":
        graph_inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
        inits.append(numpy_helper.from_array(np.array(16000, np.int64), "rate"))
        nodes.append(helper.make_node("Equal", ["sr", "rate"], ["cond"]))
        cond = "cond"
    else:  # the width of x: 4, so the then branch runs
        inits += [
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.array(4, np.int64), "four"),
        ]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
            helper.make_node("Equal", ["width", "four"], ["cond"]),
        ]
        cond = "cond"
    nodes.append(
        helper.make_node("If", [cond], ["y"], name="branch", then_branch=then, else_branch=other)
    )
    graph = helper.make_graph(
        nodes, "m", graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits,
    )  # fmt: skip
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def test_weights_inside_if_are_a_lower_bound_said_so(tmp_path) -> None:
    path = save(_if_model("data"), tmp_path / "m.onnx")
    cost = metrics.model_cost(path, {"x": (1, 4)})
    # which branch runs is known only at run time: the smaller one counts, the If is unknown
    assert cost.macs == 12 and not cost.macs_complete and cost.macs_unknown == ["branch"]
    assert "run time" in cost.macs_unknown_why["branch"]
    assert report_validation.macs_text(cost) == "≥ 12 (1 node unknown)"
    v = validate.validate(path, path, data={"x": np.ones((2, 4), np.float32)}, **CPU)
    text = report_validation.format_validation(v)
    row = next(line for line in text.splitlines() if line.startswith("MACs (dense)"))
    assert "≥ 12 (1 node unknown)" in row and "x1.000" not in row  # no ratio on a partial sum
    assert "MACs of 1 node is not known (e.g. 'branch': If: which branch" in text
    assert v.to_dict()["reference"]["macs_complete"] is False


def test_if_decided_by_shapes_counts_its_branch(tmp_path) -> None:
    path = save(_if_model("shape"), tmp_path / "m.onnx")
    cost = metrics.model_cost(path, {"x": (1, 4)})
    assert cost.macs == 12 and cost.macs_complete


def _loop_model(trips: int | None) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "W"], ["v_out"], name="step"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4]),
        ],
    )
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    inits = [w]
    if trips is None:
        graph_inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
        count = "n"
    else:
        inits.append(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
        count = "trips"
    loop = helper.make_node("Loop", [count, "", "x"], ["y"], name="loop", body=body)
    graph = helper.make_graph(
        [loop], "m", graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def test_loop_counts_its_body_per_trip(tmp_path) -> None:
    fixed = save(_loop_model(3), tmp_path / "fixed.onnx")
    assert run(fixed, {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 4)
    cost = metrics.model_cost(fixed, {"x": (1, 4)})
    assert cost.macs == 3 * 16 and cost.macs_complete
    free = save(_loop_model(None), tmp_path / "free.onnx")
    cost = metrics.model_cost(free, {"x": (1, 4), "n": ()})
    assert cost.macs is None and cost.macs_unknown == ["loop"]
    assert report_validation.macs_text(cost) == "unknown"


# -- generated inputs the graph can use --------------------------------------------------------


def _minilm_like(vocab: int = 50, positions: int = 16) -> onnx.ModelProto:
    """Word, token-type (2 rows) and position embeddings (position ids from Range over the
    sequence), an int64 attention mask made additive (1 - mask) * -1e4, one attention."""
    b = GraphBuilder(7)
    ids = b.input("input_ids", ["batch", "sequence"], TensorProto.INT64)
    mask = b.input("attention_mask", ["batch", "sequence"], TensorProto.INT64)
    types = b.input("token_type_ids", ["batch", "sequence"], TensorProto.INT64)
    h = b.node("Gather", [b.weight((vocab, 8)), ids])
    h = b.node("Add", [h, b.node("Gather", [b.weight((2, 8)), types])])
    seq = b.node("Gather", [b.node("Shape", [ids]), b.constant(np.array(1, np.int64))], axis=0)
    pos = b.node("Range", [b.constant(np.array(0, np.int64)), seq, b.constant(np.array(1))])
    h = b.node("Add", [h, b.node("Gather", [b.weight((positions, 8)), pos])])
    m = b.node("Cast", [mask], to=TensorProto.FLOAT)
    m = b.node("Sub", [b.constant(np.array(1.0, np.float32)), m])
    m = b.node("Mul", [m, b.constant(np.array(-1e4, np.float32))])
    m = b.node("Unsqueeze", [m, b.constant(np.array([1], np.int64))])  # [batch, 1, sequence]
    scores = b.node("MatMul", [h, b.node("Transpose", [h], perm=[0, 2, 1])])
    attn = b.node("Softmax", [b.node("Add", [scores, m])], axis=-1)
    b.node("MatMul", [b.node("MatMul", [attn, h]), b.weight((8, 4))], out="hidden")
    b.output("hidden", shape=["batch", "sequence", 4])
    return b.model()


def test_minilm_like_generated_inputs_are_in_range(tmp_path) -> None:
    path = save(_minilm_like(), tmp_path / "m.onnx")
    model = ir.load(str(path))
    specs = validate.prepare_inputs(
        runtime.open_session(path, runtime.select_runtime("cpu")),
        input_shapes={"input_ids": (1, 6)},
    )[0]
    usable = inputs.usable_values(model, specs)
    assert (usable["input_ids"].low, usable["input_ids"].high) == (0, 50)
    assert (usable["token_type_ids"].low, usable["token_type_ids"].high) == (0, 2)
    assert usable["attention_mask"].fill == 1
    # without --data: runs (token types drawn from the 2-row table, not [0, 10)), the sequence
    # of the other inputs bound to the one --input-shape gave
    v = validate.validate(path, path, input_shapes={"input_ids": (1, 6)}, **CPU)
    assert v.outputs[0].cosine == 1.0 and v.generated
    assert v.reference.cost.macs_at == {
        "input_ids": [1, 6], "attention_mask": [1, 6], "token_type_ids": [1, 6]
    }  # fmt: skip
    # h h^T, attn h, and the projection: 6x8x6 + 6x6x8 + 6x8x4
    assert v.reference.cost.macs == 288 + 288 + 192 and v.reference.cost.macs_complete
    assert any("'token_type_ids': integers drawn from [0, 2)" in n for n in v.notices)
    assert any("'attention_mask': all 1 (a mask" in n for n in v.notices)
    specs = [inputs.InputSpec(s.name, s.dtype, s.shape) for s in specs]
    got = inputs.generate(specs, shapes={"input_ids": (2, 6)}, usable=usable)
    for batch in got.batches:
        assert batch["token_type_ids"].max() < 2 and batch["input_ids"].max() < 50
        assert (batch["attention_mask"] == 1).all() and batch["attention_mask"].shape == (2, 6)


def test_integer_ranges_follow_offsets_and_say_when_unknown(tmp_path) -> None:
    b = GraphBuilder()
    pos = b.input("position_ids", ["N", 4], TensorProto.INT64)
    steps = b.input("steps", ["N", 4], TensorProto.INT64)
    shifted = b.node("Add", [b.node("Cast", [pos], to=TensorProto.INT64), b.constant(np.array(2))])
    h = b.node("Gather", [b.weight((10, 3)), shifted])  # roberta: ids + padding_idx + 1
    s = b.node("Cast", [steps], to=TensorProto.FLOAT)
    b.node("Mul", [h, b.node("Unsqueeze", [s, b.constant(np.array([2]))])], out="y")
    b.output("y", shape=["N", 4, 3])
    path = save(b.model(), tmp_path / "m.onnx")
    v = validate.validate(path, path, **CPU)
    usable = inputs.usable_values(ir.load(str(path)), inputs.model_signature(path).specs)
    assert (usable["position_ids"].low, usable["position_ids"].high) == (0, 8)
    assert "steps" not in usable
    assert any(
        n.startswith("input 'steps': integers drawn from [0, 10): the graph does not say")
        for n in v.notices
    )


def test_scalar_input_generated_and_from_data(tmp_path) -> None:
    """silero's sample rate: a 0-d int64 the graph compares with 16000."""
    path = save(_if_model("sr"), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    generated = validate.validate(path, path, **CPU)
    assert any(
        "input 'sr' is a scalar: set to 16000 for every batch (the graph compares it with "
        "16000); give another with --data, e.g. np.savez(..., sr=np.int64(16000))" in n
        for n in generated.notices
    )
    # the value fed decides the If: its branch is counted, x @ A or x @ B @ C
    assert generated.reference.cost.macs == 12 and generated.reference.cost.macs_complete
    assert generated.reference.cost.macs_values == {"sr": 16000}
    assert "MACs per inference at x=1x4, sr=16000" in report_validation.format_validation(generated)
    # from --data: one 0-d value, fed as is with every batch
    for rate, expected_macs in ((16000, 12), (8000, 12 + 9)):
        v = validate.validate(path, path, data={"x": x, "sr": np.int64(rate)}, batch_size=4, **CPU)
        assert v.samples == 6 and v.batch_size == 4
        assert v.reference.cost.macs == expected_macs and v.reference.cost.macs_complete
    npz = tmp_path / "val.npz"
    np.savez(npz, x=x, sr=np.int64(8000))
    result = _cli("validate", path, path, "--data", npz, "--device", "cpu")
    assert result.exit_code == 0, result.output
    np.savez(npz, x=x, sr=np.full(6, 8000, np.int64))
    result = _cli("validate", path, path, "--data", npz, "--device", "cpu")
    assert result.exit_code == 2 and "is a scalar (0-d, the same for every sample)" in result.output


def test_generated_float_and_bool_scalars(tmp_path) -> None:
    """A scale and a switch: one value each for every batch, said in a notice; a scalar read as
    Where's condition is a switch, not a mask."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    scale = b.input("scale", [])
    switch = b.input("switch", [], TensorProto.BOOL)
    b.node("Where", [switch, b.node("Mul", [x, scale]), x], out="y")
    b.output("y", shape=["N", 3])
    path = save(b.model(), tmp_path / "m.onnx")
    v = validate.validate(path, path, **CPU)
    assert v.outputs[0].cosine == 1.0 and v.samples == 8
    notices = [n for n in v.notices if "is a scalar" in n]
    assert len(notices) == 2 and "e.g. np.savez(..., switch=np.bool_(" in notices[1]
    assert "mask" not in notices[1]
    assert set(v.reference.cost.macs_values) == {"scale", "switch"}


def test_several_input_shapes_at_once(tmp_path) -> None:
    assert inputs.parse_input_shapes(["a=1x6,b=1x6", "c=2"]) == {
        "a": (1, 6), "b": (1, 6), "c": (2,)
    }  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="several: input_ids=1x128,attention_mask"):
        inputs.parse_input_shapes(["a=1x6,b"])
    path = save(_minilm_like(), tmp_path / "m.onnx")
    rep = tmp_path / "r.json"
    result = _cli(
        "validate", path, path, "--device", "cpu", "--report", rep,
        "--input-shape", "input_ids=2x5,attention_mask=2x5", "--input-shape", "token_type_ids=2x5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(rep.read_text())
    assert data["batch_size"] == 2 and data["reference"]["macs_at"]["token_type_ids"] == [1, 5]


# -- what agreement and generated inputs can say -----------------------------------------------


def _one_output(shape: list) -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    y = b.node("MatMul", [x, b.weight((3, 1))])
    if len(shape) == 1:
        b.node("Squeeze", [y, b.constant(np.array([1]))], out="y")
    else:
        b.node("Identity", [y], out="y")
    b.output("y", shape=shape)
    return b.model()


@pytest.mark.parametrize("shape", [["N", 1], ["N"]])
def test_one_value_output_has_no_agreement(tmp_path, shape) -> None:
    path = save(_one_output(shape), tmp_path / "m.onnx")
    v = validate.validate(path, path, **CPU)
    assert v.agreement is None
    d = v.to_dict()
    assert d["top1_agreement"] is None and "no top-1" in d["top1_agreement_note"]
    text = report_validation.format_validation(v)
    assert next(line for line in text.splitlines() if "agreement" in line).split()[-1] == "-"
    if len(shape) == 2:
        assert "1 entry on its class axis" in d["top1_agreement_note"]
        assert "one value always agrees" in text
    with pytest.raises(DataError, match="at least 2 classes"):
        validate.check_gates(v, min_agreement=0.9)
    with pytest.raises(DataError, match="at least 2 classes"):
        validate.preflight(path, min_agreement=0.9)


def test_caveat_only_with_generated_inputs(tmp_path) -> None:
    path = save(mlp(dims=(4, 6, 3)), tmp_path / "m.onnx")
    generated = report_validation.format_validation(validate.validate(path, path, **CPU))
    assert report_validation.GENERATED_CAVEAT in generated
    assert "measure output drift only, not task accuracy" in generated
    data = {"x": np.ones((4, 4), np.float32), "labels": np.zeros(4, np.int64)}
    given = report_validation.format_validation(validate.validate(path, path, data=data, **CPU))
    assert "output drift only" not in given
    result = _cli("validate", path, path, "--device", "cpu")
    assert result.exit_code == 0 and "--data val.npz (with 'labels') does" in result.output


def test_sweep_says_the_same(tmp_path) -> None:
    path = save(_one_output(["N", 1]), tmp_path / "m.onnx")
    result = sweep(path, [0.5], device="cpu", min_keep=None)
    text = format_sweep(result)
    assert report_validation.GENERATED_CAVEAT in text and "one value always agrees" in text
    assert result.rows[0].agreement is None and result.to_dict()["generated_inputs"]
    assert result.rows[0].macs_complete and not math.isnan(result.rows[0].macs or 0)
