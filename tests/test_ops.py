"""The op registry (onnxprune/ops): every channel rule exercised by a test model, each op's
calibration design against the ONNX reference implementation on random shapes, each op's MAC
count against a direct count, and the channel preparation as onnx-ir passes.

ConvTranspose's design on random shapes is tests/test_design_transpose.py's; fixed design cases
of every op are tests/test_calibration.py's (whose helpers these reuse).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import ShapeInferencePass

from onnxprune import channels, ops
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan, counted_weights
from onnxprune.storage import io
from tests import builders, channel_models, decoder_models, export_builders, norm_models
from tests.builders import run
from tests.channel_models import analyse, check_invariant, choose, feeds
from tests.test_calibration import design_of_single, layer_rows, one_node, reference_per_group
from tests.test_design_transpose import reference_output

# ---------------------------------------------------------------------------------------------
# the registry


def test_registry_keys_and_derived_tables() -> None:
    for (domain, op), info in ops.REGISTRY.items():
        assert (domain, op) == (info.domain, info.op_type)
        assert bool(info.weight_inputs) == (info.weight_axes is not None), op
    assert ops.PRUNABLE_OPS == ("Conv", "ConvTranspose", "Gemm", "MatMul")
    assert ops.MAC_OPS == ops.PRUNABLE_OPS
    assert ops.RECURRENT_OPS == ("LSTM", "GRU", "RNN")
    assert set(ops.WEIGHT_INPUTS) == {*ops.PRUNABLE_OPS, *ops.RECURRENT_OPS}


def test_lookups_follow_the_domain() -> None:
    """ "ai.onnx" is the default domain; another domain's op of the same name is unknown."""
    conv = ir.Node("", "Conv", [None, None])
    assert ops.channel_rule(conv) is ops.conv.conv
    assert ops.channel_rule(ir.Node("ai.onnx", "Conv", [None, None])) is ops.conv.conv
    custom = ir.Node("com.example", "Conv", [None, None])
    assert ops.channel_rule(custom) is None
    assert ops.weight_inputs(custom) == () and ops.weight_axes(custom, 1, 4) is None
    assert ops.weight_axes(conv, 1, 4) == (0, 1) and ops.weight_axes(conv, 0, 4) is None


# ---------------------------------------------------------------------------------------------
# every channel rule exercised


def all_models() -> dict[str, onnx.ModelProto]:
    """Every model of tests/channel_models.py, tests/decoder_models.py and tests/builders.py
    (random ones at a few seeds), every normalisation of tests/norm_models.py, and the
    tf2onnx classifier that embeds by OneHot."""
    found = {f"norm_{name}": norm_models.residual_model(name) for name in norm_models.NORMS}
    found["layernorm_onehot"] = export_builders.layernorm_classifier(embed="onehot")
    for module in (channel_models, decoder_models, builders):
        for name, make in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or make.__module__ != module.__name__:
                continue
            signature = inspect.signature(make)
            if "ModelProto" not in str(signature.return_annotation):
                continue
            required = [
                p for p in signature.parameters.values() if p.default is inspect.Parameter.empty
            ]
            if not required:
                found[name] = make()
            elif [p.name for p in required] == ["seed"]:
                for seed in range(4):
                    found[f"{name}({seed})"] = make(seed)
    return found


def test_every_channel_rule_is_exercised(monkeypatch) -> None:
    """Each op type with a channel rule has a node in some test model whose rule follows its
    channels to the end (gives up on nothing)."""
    followed: set[str] = set()
    lookup = ops.channel_rule

    def spy(node: ir.Node) -> ops.Rule | None:
        rule = lookup(node)
        if rule is None:
            return None

        def watched(n: ir.Node, walk: ops.ChannelWalk) -> None:
            rule(n, walk)
            followed.add(n.op_type)

        return watched

    monkeypatch.setattr(ops, "channel_rule", spy)
    for proto in all_models().values():
        analyse(proto)
    ruled = [op for (_, op), info in ops.REGISTRY.items() if info.rule is not None]
    assert [op for op in ruled if op not in followed] == []


@pytest.mark.parametrize("make", [channel_models.swish, channel_models.upsample])
def test_added_zero_preserving_models_prune_exactly(make, tmp_path: Path) -> None:
    check_invariant(make(), tmp_path, sizes={"N": 2})


@pytest.mark.parametrize(
    "make",
    [
        channel_models.elementwise_all,
        channel_models.qdq_between,
        channel_models.pools_and_reductions,
    ],
)
def test_added_models_prune_into_valid_models(make, tmp_path: Path) -> None:
    """Ops that do not keep a dead channel at zero (Exp, ReduceLogSumExp), or round it (QDQ),
    have no exact invariant: the pruned model is checked, runs, and keeps its output shapes."""
    proto = make()
    model, graph = analyse(proto)
    removed = choose(graph)
    assert removed.any()
    data = feeds(proto, 0, {"N": 2})
    expected = run(proto, data)
    apply_channel_plan(model, ChannelPlan(graph, removed, counted_weights(model, graph)))
    path = io.save_model(model, tmp_path / "pruned.onnx", force=True, check=True)
    assert [a.shape for a in run(path, data)] == [a.shape for a in expected]


# ---------------------------------------------------------------------------------------------
# designs on random shapes: rows X with X @ W^T (per group) the output less the bias


def random_conv(rng: np.random.Generator) -> dict:
    """A valid Conv: 1 or 2 spatial axes, groups, strides, dilations, explicit pads or auto_pad."""
    dims = int(rng.integers(1, 3))
    groups = int(rng.integers(1, 4))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    kernel = [int(k) for k in rng.integers(1, 4, dims)]
    dilations = [int(d) for d in rng.integers(1, 3, dims)]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    spatial = [s + int(rng.integers(0, 5)) for s in spans]
    attrs: dict = {
        "strides": [int(s) for s in rng.integers(1, 4, dims)],
        "dilations": dilations,
        "group": groups,
    }
    mode = str(rng.choice(["pads", "pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if mode == "pads":
        attrs["pads"] = [int(p) for p in rng.integers(0, 3, 2 * dims)]
    elif mode != "none":
        attrs["auto_pad"] = mode
    n = int(rng.integers(1, 3))
    return {
        "op": "Conv",
        "x_shape": (n, c_in, *spatial),
        "w_shape": (c_out, c_in // groups, *kernel),
        "bias": c_out if rng.random() < 0.5 else None,
        **attrs,
    }


def random_gemm(rng: np.random.Generator) -> dict:
    """A Gemm with random transA/transB/alpha/beta, its stored weight as B or as A."""
    m, k, n = (int(v) for v in rng.integers(1, 7, 3))
    trans_a, trans_b = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    a_shape, b_shape = ((k, m) if trans_a else (m, k)), ((n, k) if trans_b else (k, n))
    weight_first = bool(rng.random() < 0.3)
    return {
        "op": "Gemm",
        "x_shape": b_shape if weight_first else a_shape,
        "w_shape": a_shape if weight_first else b_shape,
        "weight_first": weight_first,
        "bias": None if weight_first else n,  # C broadcasts along the output features of B
        "transA": trans_a,
        "transB": trans_b,
        "alpha": float(rng.choice([0.5, 1.0, 2.5])),
        "beta": float(rng.choice([1.0, 3.0])),
    }


def random_matmul(rng: np.random.Generator) -> dict:
    """x @ W with x batched over 0 to 2 leading axes, or W @ x."""
    batch = tuple(int(v) for v in rng.integers(1, 4, int(rng.integers(0, 3))))
    m, k, n = (int(v) for v in rng.integers(1, 7, 3))
    if rng.random() < 0.3:
        return {"op": "MatMul", "x_shape": (*batch, k, n), "w_shape": (m, k), "weight_first": True}
    return {"op": "MatMul", "x_shape": (*batch, m, k), "w_shape": (k, n)}


@pytest.mark.parametrize("make", [random_conv, random_gemm, random_matmul])
@pytest.mark.parametrize("seed", range(6))
def test_random_designs_match_the_reference(make: Callable, seed: int) -> None:
    spec = make(np.random.default_rng(seed))
    beta = spec.get("beta", 1.0)
    proto, x, bias = one_node(
        spec.pop("op"), spec.pop("x_shape"), spec.pop("w_shape"), seed=seed, **spec
    )
    d, w = design_of_single(proto)
    y = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    expected = reference_per_group(d, y, None if bias is None else beta * bias)
    got = np.matmul(layer_rows(d, x).astype(np.float64), d.to_matrix(w).transpose(0, 2, 1))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y).max()))
    np.testing.assert_array_equal(d.from_matrix(d.to_matrix(w)), w)


# ---------------------------------------------------------------------------------------------
# MACs against a direct count


def single(op: str, shapes: dict[str, tuple[int, ...]], **attrs) -> onnx.ModelProto:
    """One node reading x (and y) with a stored all-ones W (or two activations for MatMul)."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    stored = []
    names = list(shapes)
    if "W" in shapes:
        inputs = [i for i in inputs if i.name != "W"]
        stored = [numpy_helper.from_array(np.ones(shapes["W"], np.float32), "W")]
    node = helper.make_node(op, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        stored,
    )
    return helper.make_model(
        graph, ir_version=builders.IR_VERSION, opset_imports=[helper.make_opsetid("", 17)]
    )


def counted(proto: onnx.ModelProto, shapes: dict, out: tuple[int, ...] | None) -> int | None:
    """ops.node_macs of the model's node at `shapes` (and the output's, when given)."""
    node = ir.serde.deserialize_model(proto).graph.node(0)
    known = {**shapes, "out": out}
    return ops.node_macs(node, lambda v: None if v is None else known.get(v.name))


def ones_output(proto: onnx.ModelProto, shapes: dict) -> np.ndarray:
    feeds = {n: np.ones(s, np.float32) for n, s in shapes.items() if n != "W"}
    return ReferenceEvaluator(proto).run(None, feeds)[0]


@pytest.mark.parametrize("seed", range(8))
def test_conv_macs(seed: int) -> None:
    """Every output element is a dot product over (C_in / groups) x kernel, padding included;
    without padding, all-ones inputs and weights sum to that count. The count from the output's
    dims and from the attributes alone (no output dims: conv_output) agree."""
    spec = random_conv(np.random.default_rng(100 + seed))
    x_shape, w_shape = spec.pop("x_shape"), spec.pop("w_shape")
    attrs = {k: v for k, v in spec.items() if k not in ("op", "bias")}
    shapes = {"x": x_shape, "W": w_shape}
    proto = single("Conv", shapes, **attrs)
    out = ones_output(proto, shapes)
    direct = out.size * math.prod(w_shape[1:])
    assert counted(proto, shapes, out.shape) == direct
    assert counted(proto, shapes, None) == direct
    if not attrs.get("pads") and "auto_pad" not in attrs:
        assert int(out.sum()) == direct


@pytest.mark.parametrize("seed", range(8))
def test_conv_transpose_macs(seed: int) -> None:
    """Every input element is scattered into (C_out / groups) x kernel outputs: with nothing
    cropped, all-ones inputs and weights sum to the count."""
    rng = np.random.default_rng(200 + seed)
    dims, groups = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    c_in, o_group = groups * int(rng.integers(1, 3)), int(rng.integers(1, 3))
    strides = [int(s) for s in rng.integers(1, 4, dims)]
    attrs = {
        "strides": strides,
        "dilations": [int(d) for d in rng.integers(1, 3, dims)],
        "output_padding": [int(rng.integers(0, s)) for s in strides],
        "group": groups,
    }
    shapes = {
        "x": (int(rng.integers(1, 3)), c_in, *(int(v) for v in rng.integers(1, 5, dims))),
        "W": (c_in, o_group, *(int(v) for v in rng.integers(1, 4, dims))),
    }
    proto = single("ConvTranspose", shapes, **attrs)
    ones = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    out = reference_output(ones["x"], ones["W"], attrs)  # one group at a time
    assert counted(proto, shapes, out.shape) == int(out.sum())


@pytest.mark.parametrize("seed", range(8))
def test_gemm_and_matmul_macs(seed: int) -> None:
    """All-ones operands: each output element sums K ones, so the outputs sum to the count
    (Gemm's C is an addition, no MAC; MatMul with vectors and broadcast batch axes)."""
    rng = np.random.default_rng(300 + seed)
    m, k, n = (int(v) for v in rng.integers(1, 6, 3))
    trans_a, trans_b = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    shapes = {"x": (k, m) if trans_a else (m, k), "W": (n, k) if trans_b else (k, n)}
    proto = single("Gemm", shapes, transA=trans_a, transB=trans_b)
    out = ones_output(proto, shapes)
    assert counted(proto, shapes, out.shape) == int(out.sum()) == m * k * n
    left = [int(v) for v in rng.integers(1, 4, int(rng.integers(0, 3)))]
    right = [1 if rng.random() < 0.5 else d for d in left]  # broadcast against the left
    a = (*left, m, k) if rng.random() < 0.8 else (k,)
    b = (*right[len(right) - int(rng.integers(0, len(right) + 1)) :], k, n)
    b = b if rng.random() < 0.8 else (k,)
    shapes = {"x": a, "y": b}
    proto = single("MatMul", shapes)
    out = ones_output(proto, shapes)
    assert counted(proto, shapes, out.shape) == int(out.sum())


def test_unknown_dims_count_nothing() -> None:
    proto = single("Gemm", {"x": (3, 4), "W": (4, 5)})
    assert counted(proto, {"W": (4, 5)}, None) is None
    relu = ir.Node("", "Relu", [None])
    assert ops.node_macs(relu, lambda v: (1, 2)) is None


# ---------------------------------------------------------------------------------------------
# the preparation as passes


def test_prepare_is_the_composed_passes() -> None:
    """PrepareChannelsPass infers shapes, then repeats its five passes until a round changes
    nothing; prepare() is it, byte for byte, and a second run finds nothing to do."""
    proto = channel_models.computed_shapes()
    by_function = channels.prepare(ir.serde.deserialize_model(proto))
    by_pass = ir.serde.deserialize_model(proto)
    result = channels.PrepareChannelsPass()(by_pass)
    assert result.model is by_pass and result.modified
    assert ir.serde.serialize_model(by_pass) == ir.serde.serialize_model(by_function)
    assert not channels.PrepareChannelsPass()(by_pass).modified
    repeat = channels.PrepareChannelsPass().passes[1]
    assert isinstance(repeat, ir.passes.PassManager) and repeat.early_stop
    (refresh,) = repeat.passes
    assert [type(p).__name__ for p in refresh.inner.passes] == [
        "FoldConstantsPass",
        "FoldShapeArithmeticPass",
        "SkipShapeGuardsPass",
        "StoreWeightViewsPass",
        "RegroupReshapesPass",
        "SetStaticDimsPass",
    ]


def test_each_pass_reports_what_it_changed() -> None:
    proto = channel_models.computed_shapes()
    model = ir.serde.deserialize_model(proto)
    ShapeInferencePass()(model)
    assert channels.FoldShapeArithmeticPass()(model).modified
    assert not channels.FoldShapeArithmeticPass()(model).modified
    plain = ir.serde.deserialize_model(builders.small_cnn())
    for step in (
        channels.FoldShapeArithmeticPass,
        channels.StoreWeightViewsPass,
        channels.RegroupReshapesPass,
        channels.SetStaticDimsPass,
    ):
        assert not step()(plain).modified


def test_an_error_inside_a_pass_is_raised_as_itself(monkeypatch) -> None:
    def broken(self, model):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(channels.StoreWeightViewsPass, "call", broken)
    with pytest.raises(ValueError, match="broken on purpose"):
        channels.prepare(ir.serde.deserialize_model(builders.small_cnn()))
