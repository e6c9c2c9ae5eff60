"""Normalisation over channels stays exact when channels go: every form exporters write (fused
LayerNormalization, RMSNormalization, ONNX Runtime's simplified and skip forms, RMSNorm and
LayerNorm spelt out as TorchScript, torch.export, tf2onnx and jax2tf write them) keeps the
zero-channel invariant: removing channels that are zero changes no output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan, counted_weights, plan_channels
from tests import export_builders as eb
from tests.builders import GraphBuilder, run
from tests.channel_models import analyse, check_invariant, choose, feeds, kill
from tests.norm_models import NORMS, E, fused, residual_model


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("seed", [0, 1])
def test_zero_channels_removed_through_norm(name: str, seed: int, tmp_path: Path) -> None:
    """The residual stream's channels go through the norm: none frozen, and removing zeroed
    ones (with the MLPs') keeps the outputs."""
    proto = residual_model(name, seed)
    _, graph = analyse(proto)
    assert graph.prunable.sum() >= E + 32 - 1, graph.reasons  # stream and both MLPs
    stream = next(g for g in graph.groups if 0 in g.layers)
    assert stream.frozen == 0, stream.reasons
    if name == "simplified":  # onnx.checker does not know it: the invariant without the check
        model, graph = analyse(proto)
        removed = choose(graph, seed=seed)
        kill(graph, removed)
        data = feeds(proto, seed)
        expected = run(ir.serde.serialize_model(model), data)
        apply_channel_plan(model, ChannelPlan(graph, removed, counted_weights(model, graph)))
        got = run(ir.serde.serialize_model(model), data)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))
    else:
        removed = check_invariant(proto, tmp_path, seed).removed
    assert removed[graph.layers[0].classes].any()


@pytest.mark.parametrize("name", ["fused", "mean_spelt", "sum_spelt", "rms_dynamo"])
def test_kept_channels_see_the_original_statistics(name: str, tmp_path: Path) -> None:
    """Channels removed that are not zero: the norm of the channels kept is what it was in the
    dense model with those channels at zero (statistics over the original width), not a
    renormalisation over the channels left."""
    b = GraphBuilder(20)
    x = b.input("x", ["N", 6])
    w1, w2 = b.weight((6, E)), b.weight((E, 3))
    h = b.node("MatMul", [x, w1])
    normed, _ = NORMS[name](b, h, None)
    b.node("MatMul", [normed, w2], out="y")
    b.output("y", shape=["N", 3])
    proto = b.model(18)
    model, graph = analyse(proto)
    plan = plan_channels(model, graph, 0.3)
    kept = ~plan.removed[graph.layers[0].classes]
    assert 0 < kept.sum() < E
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dense = dict(arrays)
    dense[w1] = arrays[w1] * kept  # the removed channels at zero, in the dense model,
    dense[w2] = arrays[w2] * kept[:, None]  # and nothing read from them after the norm
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(proto)
    for tensor in zeroed.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(dense[tensor.name], tensor.name))
    data = feeds(proto)
    expected = run(zeroed, data)[0]
    apply_channel_plan(model, plan)
    got = run(ir.serde.serialize_model(model), data)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("approximation" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("spelling", "embed"), [("sum", "onehot"), ("sum", "gather"), ("mean", "gather")]
)
def test_tf2onnx_layernorm_is_pruned_exactly(spelling: str, embed: str, tmp_path: Path) -> None:
    """jax2tf / tf2onnx's LayerNorm, spelt out with an Expand of a computed shape (issue 23):
    the embedding, the Conv and the dense layer it feeds are prunable, and exact."""
    proto = eb.layernorm_classifier(spelling=spelling, embed=embed)
    _, graph = analyse(proto)
    conv = next(g for g in graph.groups if any(graph.layers[i].op_type == "Conv" for i in g.layers))
    assert conv.frozen == 0, conv.reasons
    plan = check_invariant(proto, tmp_path, 0, sizes={"unk__0": 3})
    assert plan.removed[conv.classes].any()


def test_norm_of_a_channel_that_is_not_zero_is_approximate() -> None:
    """A removed channel that holds a constant at the norm's input (a Sigmoid between): the
    statistics cover the channels left, and the plan warns."""
    b = GraphBuilder(5)
    h = b.node("Sigmoid", [b.node("MatMul", [b.input("x", ["N", 6]), b.weight((6, E))])])
    normed, _ = fused(b, h)
    b.node("MatMul", [normed, b.weight((E, 3))], out="y")
    b.output("y", shape=["N", 3])
    model, graph = analyse(b.model(18))
    plan = plan_channels(model, graph, 0.3)
    assert plan.removed.any()
    assert any("approximation" in w for w in plan.warnings)


def test_counted_weights_reach_the_norm_members() -> None:
    """The plan of a fused norm model is the usual one: scale and bias are members."""
    model, graph = analyse(residual_model("fused"))
    roles = {m.role for m in graph.members if m.node.op_type == "LayerNormalization"}
    assert roles == {"scale", "shift"}
    assert ChannelPlan(graph, graph.frozen.copy(), counted_weights(model, graph)).params
