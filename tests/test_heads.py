"""Attention heads as channel classes (channels.build(heads=True)): one class per head, removed
whole, the head count rewritten in the shapes; on every exporter's way of writing attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune import channels
from onnxprune.report.channels import channel_dict, format_channels
from onnxprune.selection.channels import ChannelPlan, counted_weights, plan_channels
from tests.builders import run
from tests.channel_models import (
    HEAD_MODELS,
    HEADS,
    E,
    analyse,
    check_invariant,
    feeds,
    random_transformer,
)

HEAD_DIM = E // HEADS
# batch and sequence differ, so a Reshape that mixed them up would fail
SIZES = {"N": 2, "S": 5, "batch": 2, "seq": 5}


def _projections(graph: channels.ChannelGraph) -> tuple[list[channels.Layer], channels.Member]:
    """The layers whose output channels are the heads (Q, K, V or the packed QKV), and the
    output projection's input rows."""
    (entry,) = graph.heads
    classes = np.unique(entry.classes)
    makers = [layer for layer in graph.layers if np.isin(layer.classes, classes).all()]
    (reader,) = [
        m for m in graph.members if m.role == "in" and np.isin(m.ids, classes).all() and len(m.ids)
    ]
    return makers, reader


def _some_heads(graph: channels.ChannelGraph, seed: int) -> np.ndarray:
    """A random non-empty subset of the heads of every attention, never all of them."""
    rng = np.random.default_rng(seed)
    removed = np.zeros(graph.n_classes, dtype=bool)
    for entry in graph.heads:
        n = len(entry.classes)
        removed[rng.choice(entry.classes, size=int(rng.integers(1, n)), replace=False)] = True
    return removed


@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
def test_prepare_keeps_the_function(name: str) -> None:
    """Folding the shape arithmetic (batch and sequence as 0 entries), the scale, and the
    dynamo exporter's Reshape-Transpose-Reshape into one Transpose change no output, for any
    batch and sequence."""
    proto = HEAD_MODELS[name]()
    model = ir.serde.deserialize_model(proto)
    channels.prepare(model)
    prepared = ir.serde.serialize_model(model)
    for sizes in ({"N": 1, "S": 7, "batch": 1, "seq": 7}, SIZES):
        data = feeds(proto, 1, sizes)
        for e, g in zip(run(proto, data), run(prepared, data), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    for node in model.graph:  # Shapes left make only targets that hold the batch or sequence
        if node.op_type == "Shape":
            assert _consumers(node) <= {"Gather", "Unsqueeze", "Concat", "Expand", "Reshape"}


def _consumers(node: ir.Node) -> set[str]:
    found, stack = set(), [node]
    while stack:
        for use in stack.pop().outputs[0].uses():
            found.add(use.node.op_type)
            if use.node.op_type not in ("Expand", "Reshape") or use.idx == 0:
                stack.append(use.node)
    return found


@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
def test_one_class_per_head(name: str) -> None:
    _, graph = analyse(HEAD_MODELS[name](), heads=True)
    (entry,) = graph.heads
    assert len(entry.classes) == HEADS and len(np.unique(entry.classes)) == HEADS
    assert graph.prunable[entry.classes].all()
    makers, reader = _projections(graph)
    packed = name.startswith("heads_packed") or name == "heads_multihead"
    assert len(makers) == (1 if packed else 3)
    for layer in makers:  # every head owns head_dim outputs of each of q, k and v
        counts = np.unique(layer.classes, return_counts=True)[1]
        assert counts.tolist() == [(3 if packed else 1) * HEAD_DIM] * HEADS
    assert np.unique(reader.ids, return_counts=True)[1].tolist() == [HEAD_DIM] * HEADS
    assert entry.name == reader.node.name
    assert entry.head_dim == HEAD_DIM
    # the residual stream is prunable too: the Shape reading its width was folded away
    (stem,) = [g for g in graph.groups if 0 in g.layers]
    assert stem.frozen == 0 and len(stem.classes) == E


@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
def test_without_heads_head_dim_is_the_channel(name: str) -> None:
    """heads=False, as before: class d is index d of head_dim in every head."""
    _, graph = analyse(HEAD_MODELS[name](), heads=False)
    assert graph.heads == []
    split = [
        layer for layer in graph.layers if np.unique(layer.classes, return_counts=True)[1].min() > 1
    ]
    assert split  # q, k, v (or the packed projection): every class is in every head
    for layer in split:
        classes, counts = np.unique(layer.classes, return_counts=True)
        assert (counts % HEADS == 0).all() and len(classes) % HEAD_DIM == 0
        assert graph.prunable[classes].all()


@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_zeroed_heads_keeps_outputs(name: str, seed: int, tmp_path: Path) -> None:
    """Zero the weights and biases of some heads, remove those heads: same outputs, a model the
    checker passes, and Reshapes that split out fewer heads of the same head_dim."""
    plan = check_invariant(
        HEAD_MODELS[name](), tmp_path, seed, heads=True, sizes=SIZES,
        removed=lambda graph: _some_heads(graph, seed),
    )  # fmt: skip
    (entry,) = plan.graph.heads
    kept = entry.kept(plan.removed)
    assert 0 < kept < HEADS
    pruned = onnx.load(str(tmp_path / f"pruned_{seed}.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    stored |= {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in pruned.graph.node
        if n.op_type == "Constant"
    }
    targets = {
        n.name: stored[n.input[1]].tolist()
        for n in pruned.graph.node
        if n.op_type == "Reshape" and n.input[1] in stored
    }
    splits = [targets[n.name] for n in entry.reshapes]
    assert splits and all(t[-2:] == [kept, HEAD_DIM] for t in splits), targets
    assert any(t[-1] == kept * HEAD_DIM for t in targets.values()), targets


@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
@pytest.mark.parametrize("heads", [True, False])
def test_removing_any_zeroed_channels(name: str, heads: bool, tmp_path: Path) -> None:
    """Heads (or head_dim indices) and residual channels together, as the ranking may pick
    them."""
    plan = check_invariant(HEAD_MODELS[name](), tmp_path, 3, heads=heads, sizes=SIZES)
    assert plan.removed.any()


@pytest.mark.parametrize("seed", range(12))
def test_invariant_on_random_transformers_with_heads(seed: int, tmp_path: Path) -> None:
    proto = random_transformer(seed)
    assert check_invariant(proto, tmp_path, seed, heads=True).removed.any()
    _, graph = analyse(proto, heads=True)
    splits = sum(1 for n in proto.graph.node if n.op_type == "Reshape") // 4
    assert len(graph.heads) == splits  # one entry per multi-head block (3 splits, 1 merge)
    for entry in graph.heads:
        assert len(np.unique(entry.classes)) == len(entry.classes) == 2


def test_selection_keeps_a_head_in_every_attention() -> None:
    model, graph = analyse(HEAD_MODELS["heads_torchscript"](), heads=True)
    plan = plan_channels(model, graph, 0.6)
    (entry,) = graph.heads
    assert entry.kept(plan.removed) >= 1


def test_report_lists_heads_kept_per_attention() -> None:
    model, graph = analyse(HEAD_MODELS["heads_packed_gather"](), heads=True)
    removed = _some_heads(graph, 0)
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    (entry,) = graph.heads
    kept = entry.kept(removed)
    data = channel_dict(plan)
    assert data["attention_heads"] == [
        {"name": entry.name, "heads": HEADS, "kept": kept, "head_dim": HEAD_DIM, "frozen": 0}
    ]
    text = format_channels(plan)
    assert "attention" in text and f"heads {HEADS} -> {kept} in 1 attention blocks" in text
    _, plain = analyse(HEAD_MODELS["heads_packed_gather"](), heads=False)
    flat = ChannelPlan(plain, np.zeros(plain.n_classes, dtype=bool), [])
    assert channel_dict(flat)["attention_heads"] == []
    assert "heads" not in format_channels(flat)


def test_relative_position_bias_is_sliced_with_the_heads() -> None:
    """Swin's bias table, stored [S*S, H] and rearranged to [1, H, S, S] before it is added to
    the scores, is stored rearranged by prepare and loses the removed heads' entries."""
    _, graph = analyse(HEAD_MODELS["heads_static"](), heads=True)
    (entry,) = graph.heads
    (bias,) = [m for m in graph.members if m.node.op_type == "Add" and len(m.ids) == HEADS]
    assert bias.role == "shift" and bias.axis == 1
    assert np.array_equal(bias.ids, entry.classes)


def test_pipeline_removes_the_weakest_head_whole(tmp_path: Path) -> None:
    """prune(structured=True, heads=True): a head whose Q, K, V and output weights are small
    ranks first and goes whole; the file is checked, runs, and splits out one head fewer."""
    from onnxprune import pipeline
    from tests.builders import save

    proto = HEAD_MODELS["heads_torchscript"]()
    weights = {t.name: t for t in proto.graph.initializer}
    _, graph = analyse(proto, heads=True)
    (entry,) = graph.heads
    weak = entry.classes[1]
    for m in graph.members:  # head 1 of every projection, and its rows of the output one
        if m.role in ("out", "in") and weak in m.ids:
            array = onnx.numpy_helper.to_array(weights[m.value.name]).copy()
            index = [slice(None)] * array.ndim
            index[m.axis] = m.ids == weak
            array[tuple(index)] *= 1e-3
            weights[m.value.name].CopyFrom(onnx.numpy_helper.from_array(array, m.value.name))
    source = save(proto, tmp_path / "in.onnx")
    _, report = pipeline.prune(
        source, 0.05, output=tmp_path / "o.onnx", structured=onnxprune.Structured(heads=True)
    )
    plan = report.channels
    (entry,) = plan.graph.heads
    assert entry.kept(plan.removed) == HEADS - 1 and plan.removed[entry.classes[1]]
    pruned = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    stored = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer}
    targets = [stored.get(n.input[1]) for n in pruned.graph.node if n.op_type == "Reshape"]
    assert [0, 0, HEADS - 1, HEAD_DIM] in targets
    assert run(tmp_path / "o.onnx", feeds(proto, 0, SIZES))[0].shape == (2, 5, 3)


def test_round_to_lets_heads_go_one_by_one() -> None:
    """--round-to counts channels, and a head is head_dim of them in every projection: with
    head_dim a multiple of N, single heads keep every count a multiple of N."""
    model, graph = analyse(HEAD_MODELS["heads_torchscript"](), heads=True)
    (entry,) = graph.heads
    plan = plan_channels(model, graph, 0.3, round_to=HEAD_DIM)
    assert 1 <= entry.kept(plan.removed) < HEADS
    projections = [layer for layer in graph.layers if np.isin(layer.classes, entry.classes).all()]
    assert len(projections) == 3  # Q, K and V
    # rounding units in classes: N channels are N / gcd(head_dim, N) heads
    from onnxprune.selection.channels import _class_step

    assert _class_step([projections[0].classes], 8) == 8 // np.gcd(HEAD_DIM, 8)
    assert _class_step([projections[0].classes], 3 * HEAD_DIM) == 3
    assert _class_step([np.arange(16)], 8) == 8
    for layer in projections:
        kept = int(np.count_nonzero(~plan.removed[layer.classes]))  # channels, not heads
        assert kept == HEAD_DIM * entry.kept(plan.removed) and kept % HEAD_DIM == 0
