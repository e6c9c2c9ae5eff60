"""Decoder graphs as LLM exporters write them (tests/decoder_models.py; the tiny LLaMA exports in
models/decoder are tested in test_decoder_exports.py): grouped-query attention with the key/value
heads repeated by Expand or Tile, RoPE, RMSNorm, SwiGLU, a KV cache. Channels and heads go
through all of them, and removing zeroed ones keeps the outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxprune import channels
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan, counted_weights, plan_channels
from onnxprune.storage import io
from tests.builders import run
from tests.channel_models import analyse, choose, kill
from tests.decoder_models import DECODERS, HD, KVH, QH, REP, VOCAB, decoder, kill_read

SIZES = {"N": 2, "S": 5, "P": 0}


def _feeds(proto: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """x random, positions 0..S-1, an empty past (the first step of generation)."""
    rng = np.random.default_rng(seed)
    if proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64:  # token ids
        data = {"x": rng.integers(0, VOCAB, (SIZES["N"], SIZES["S"])).astype(np.int64)}
    else:
        data = {"x": rng.standard_normal((SIZES["N"], SIZES["S"], 6)).astype(np.float32)}
    names = {i.name for i in proto.graph.input}
    if "position_ids" in names:
        data["position_ids"] = np.tile(np.arange(SIZES["S"], dtype=np.int64), (SIZES["N"], 1))
    for value in proto.graph.input:  # the pasts, empty
        if value.name not in data:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            data[value.name] = np.zeros((SIZES["N"], dims[1], 0, dims[3]), np.float32)
    return data


def _fit(path: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The empty pasts in the shape the (pruned) model declares."""
    model = onnx.load(str(path), load_external_data=False)
    out = dict(data)
    for value in model.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else None
            for d in value.type.tensor_type.shape.dim
        ]
        if value.name in out and out[value.name].size == 0:
            shape = [
                n if d is None else d for d, n in zip(dims, out[value.name].shape, strict=True)
            ]
            out[value.name] = out[value.name].reshape(shape)
    return out


def _invariant(proto: onnx.ModelProto, tmp: Path, seed: int, heads: bool) -> ChannelPlan:
    model, graph = analyse(proto, heads=heads)
    removed = choose(graph, seed=seed)
    removed = graph.settle(removed)  # GQA: a key/value head goes with its group
    kill(graph, removed)
    kill_read(graph, removed)
    data = _feeds(proto, seed)
    expected = run(ir.serde.serialize_model(model), data)
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    apply_channel_plan(model, plan)
    path = io.save_model(model, tmp / f"pruned_{seed}.onnx", force=True, check=True)
    got = run(path, _fit(path, data))
    for e, g in zip(expected, got, strict=True):
        if e.size == 0:
            continue
        width = [d for d in g.shape]
        if e.shape != g.shape:  # a present narrowed with the heads or head_dim removed
            assert e.ndim == 4 and e.shape[2] == g.shape[2], (e.shape, g.shape)
            continue
        scale = max(float(np.abs(e).max()), 1e-30)
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * scale, err_msg=str(width))
    return plan


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_zeroed_channels_keeps_outputs(
    name: str, heads: bool, seed: int, tmp_path: Path
) -> None:
    """Attention (heads, or head_dim through RoPE), the residual stream through RMSNorm and the
    SwiGLU channels: all prunable; removing zeroed ones keeps the outputs."""
    proto = DECODERS[name]()
    _, graph = analyse(proto, heads=heads)
    frozen = [g for g in graph.groups if g.frozen]
    assert len(frozen) == 1 and frozen[0].reasons == [
        "reaches model output 'y', which keeps its shape"
    ]
    plan = _invariant(proto, tmp_path, seed, heads)
    assert plan.removed.any()


def _stored(proto: onnx.ModelProto) -> dict[str, list]:
    return {t.name: onnx.numpy_helper.to_array(t).tolist() for t in proto.graph.initializer}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_query_heads_go_one_by_one(name: str) -> None:
    """--heads on grouped-query attention: each query head is a class of its own; removing one
    inside a group keeps both key/value heads (a Gather after the repeat picks the copies of
    the query heads kept)."""
    model, graph = analyse(DECODERS[name](), heads=True)
    (entry,) = graph.heads
    assert len(np.unique(entry.classes)) == QH
    kv = graph.derived.sum() // 2  # the key and the value heads, derived
    assert kv == (1 if name.startswith("mqa") else KVH)
    removed = np.zeros(graph.n_classes, dtype=bool)
    removed[entry.classes[0]] = True
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    assert not plan.removed[graph.derived].any()
    apply_channel_plan(model, plan)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    targets = [_stored(proto).get(n.input[1]) for n in proto.graph.node if n.op_type == "Reshape"]
    assert [0, 0, QH - 1, HD] in targets and [0, QH, -1, HD] in targets
    picks = [n for n in proto.graph.node if n.op_type == "Gather" and "query_heads" in n.name]
    assert len(picks) == 2 and all(_stored(proto)[n.input[1]] == [1, 2, 3] for n in picks)
    splits = [0, 0, kv, HD]
    assert splits in targets  # the key/value heads all kept


@pytest.mark.parametrize("name", sorted(n for n in DECODERS if not n.startswith("mqa")))
def test_a_kv_head_goes_with_its_query_heads(name: str) -> None:
    """The query heads of one group removed: their key/value head goes too (settled), and the
    repeat and the key/value splits count one key/value head fewer."""
    model, graph = analyse(DECODERS[name](), heads=True)
    (entry,) = graph.heads
    removed = np.zeros(graph.n_classes, dtype=bool)
    removed[entry.classes[:REP]] = True
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    assert plan.removed[graph.derived].sum() == 2  # the first group's key and value heads
    apply_channel_plan(model, plan)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    targets = [_stored(proto).get(n.input[1]) for n in proto.graph.node if n.op_type == "Reshape"]
    assert [0, QH - REP, -1, HD] in targets and [0, 0, KVH - 1, HD] in targets
    assert not [n for n in proto.graph.node if n.op_type == "Gather" and "query_heads" in n.name]


def test_kv_cache_narrows_with_the_heads(tmp_path: Path) -> None:
    """The past/present tensors are the model's own state: with a key/value head removed they
    narrow, the plan says so, and the model runs on an empty past of the new shape."""
    proto = decoder("expand", cache=True)
    model, graph = analyse(proto, heads=True)
    (entry,) = graph.heads
    removed = np.zeros(graph.n_classes, dtype=bool)
    removed[entry.classes[-REP:]] = True  # the last group's query heads, and so its kv head
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    apply_channel_plan(model, plan)
    path = io.save_model(model, tmp_path / "cache.onnx", force=True, check=True)
    pruned = onnx.load(str(path))
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*pruned.graph.input, *pruned.graph.output]
    }
    assert shapes["past_key_values.0.key"] == ["N", KVH - 1, "P", HD]
    assert shapes["present.0.value"] == ["N", KVH - 1, "T", HD]
    out = run(path, _fit(path, _feeds(proto, 0)))
    assert out[1].shape == (SIZES["N"], KVH - 1, SIZES["S"], HD)


def test_plan_warns_when_the_cache_narrows() -> None:
    model, graph = analyse(decoder("expand", cache=True), heads=True)
    plan = plan_channels(model, graph, 0.4)
    assert plan.removed.any()
    cache = [w for w in plan.warnings if "KV cache" in w]
    narrowed = any(
        plan.removed[ids].any()
        for v, spaces in graph.spaces.items()
        if v.is_graph_input()
        for ids in spaces.values()
    )
    assert bool(cache) == narrowed


def test_cache_inputs_are_found() -> None:
    model = ir.serde.deserialize_model(decoder("expand", cache=True))
    found = channels.cache_inputs(model)
    names = sorted(v.name for v in found if v.is_graph_input())
    assert names == ["past_key_values.0.key", "past_key_values.0.value"]
    assert sorted(o.name for outs in found.values() for o in outs) == [
        "present.0.key",
        "present.0.value",
    ]


def test_tied_head_is_pruned_once() -> None:
    """An LM head that reads the embedding table transposed: the table is one tensor, sliced
    once along the residual channels (its columns), for the lookup and the head alike; its
    rows (the vocabulary: the logits, a model output) stay."""
    _, graph = analyse(decoder("tile", tied=True))
    members = [m for m in graph.members if m.value.name == "w1"]
    columns = [m for m in members if m.axis == 1]
    assert len({m.ids.tobytes() for m in columns}) == 1
    assert not graph.frozen[columns[0].ids].any()
    assert all(graph.frozen[m.ids].all() for m in members if m.axis == 0)
