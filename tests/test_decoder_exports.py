"""The tiny LLaMA-architecture decoder as people ship it (models/decoder: TorchScript and
torch.export, with and without a KV cache, and Optimum's export) and a transformers BERT
(models/exports/bert_tiny.onnx): structured pruning reaches every layer but the LM head, keeps
the zero-channel invariant with and without --heads, and writes models that check and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune import channels
from onnxprune.calibration import model_input_specs
from onnxprune.inputs import fit_empty
from onnxprune.inputs.sequence import fill_missing
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan, counted_weights
from onnxprune.storage import io
from tests.builders import run
from tests.channel_models import analyse, choose, kill
from tests.decoder_models import kill_read

DECODER = Path(__file__).resolve().parent.parent / "models" / "decoder"
BERT = Path(__file__).resolve().parent.parent / "models" / "exports" / "bert_tiny.onnx"
EXPORTS = ["legacy", "dynamo", "kv.legacy", "kv.dynamo", "optimum"]


def _path(name: str) -> Path:
    return DECODER / f"tiny.{name}.onnx"


def _feeds(model: ir.Model, rows: int = 2, length: int = 12) -> dict[str, np.ndarray]:
    """Held-out tokens, and what else the model takes made for them (inputs.sequence)."""
    with np.load(DECODER / "heldout.npz") as data:
        ids = data["input_ids"][:rows, :length]
    specs = model_input_specs(model)
    made, _ = fill_missing({"input_ids": ids}, specs)
    return {s.name: made[s.name] for s in specs}


def _declared(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in proto.graph.input
    }


@pytest.mark.parametrize("name", [*EXPORTS, "bert"])
def test_prepare_keeps_the_function(name: str) -> None:
    """Folding the exporters' shape arithmetic changes no output."""
    path = BERT if name == "bert" else _path(name)
    model = io.load_model(path)
    if name == "bert":
        with np.load(BERT.parent / "bert_tiny_val.npz") as data:
            feeds = {k: data[k][:4] for k in ("input_ids", "attention_mask", "token_type_ids")}
    else:
        feeds = _feeds(model)
    expected = run(onnx.load(str(path)), feeds)
    channels.prepare(model)
    for e, g in zip(expected, run(ir.serde.serialize_model(model), feeds), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("heads", [False, True])
def test_every_layer_but_the_head_is_prunable(name: str, heads: bool) -> None:
    """RoPE (Range or position_ids, cos and sin of inv_freq), RMSNorm, the GQA repeat and the
    KV cache freeze nothing: only the LM head, which writes the logits, keeps its width."""
    _, graph = analyse(onnx.load(str(_path(name))), heads=heads)
    frozen = [g for g in graph.groups if g.frozen]
    assert len(frozen) == 1 and len(frozen[0].layers) == 1, [g.reasons for g in frozen]
    assert frozen[0].reasons == ["reaches model output 'logits', which keeps its shape"]
    assert not graph.unreached
    if heads:  # 4 query heads, each a class; the 2 key and 2 value heads go with them
        assert len(graph.heads) == 2
        assert all(len(np.unique(h.classes)) == 4 for h in graph.heads)
        assert graph.derived.sum() == 2 * 2 * 2


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("heads", [False, True])
def test_removing_zeroed_channels_keeps_the_logits(name: str, heads: bool, tmp_path: Path) -> None:
    model, graph = analyse(onnx.load(str(_path(name))), heads=heads)
    removed = choose(graph, seed=1)
    removed = graph.settle(removed)  # GQA: a key/value head goes with its group
    kill(graph, removed)
    kill_read(graph, removed)
    feeds = _feeds(model)
    expected = run(ir.serde.serialize_model(model), feeds)[0]
    apply_channel_plan(model, ChannelPlan(graph, removed, counted_weights(model, graph)))
    path = io.save_model(model, tmp_path / "pruned.onnx", force=True, check=True)
    got = run(path, fit_empty(feeds, _declared(path)))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", EXPORTS)
def test_heads_at_a_fifth_of_the_macs(name: str, tmp_path: Path) -> None:
    """--structured --heads --target macs 0.2, as the command line runs it without data: the
    model checks (full), runs on held-out tokens, and gives logits of the same shape."""
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(
        _path(name),
        0.2,
        structured=onnxprune.Structured(heads=True, target="macs"),
        output=out,
    )
    assert report.channels.achieved >= 0.2
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    model = io.load_model(_path(name))
    feeds = _feeds(model)
    dense = run(onnx.load(str(_path(name))), feeds)[0]
    got = run(out, fit_empty(feeds, _declared(out)))[0]
    assert got.shape == dense.shape and np.isfinite(got).all()


@pytest.mark.parametrize("name", ["kv.dynamo", "optimum"])
def test_calibrated_with_token_ids_only(name: str, tmp_path: Path) -> None:
    """--calibration tokens.npz (input_ids and attention_mask only) on a KV-cache export: the
    positions and empty pasts are made, the heads ranked on the samples, and enough removed
    that a key/value head goes; the narrowed cache is said."""
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(
        _path(name),
        0.5,
        structured=onnxprune.Structured(heads=True, target="macs"),
        calibration=onnxprune.Calibration(DECODER / "tokens.npz"),
        output=out,
    )
    plan = report.channels
    kept = [h.kept(plan.removed) for h in plan.graph.heads]
    model = io.load_model(_path(name))
    feeds = _feeds(model)
    got = run(out, fit_empty(feeds, _declared(out)))[0]
    assert np.isfinite(got).all()
    if min(kept) < 4:
        assert any("KV cache narrows" in w for w in plan.warnings)


def test_kv_inputs_with_empty_pasts_are_accepted() -> None:
    """tokens.kv.npz holds every input of the KV exports, the pasts of length 0."""
    from onnxprune.inputs import from_arrays, load_npz

    specs = model_input_specs(io.load_model(_path("optimum")))
    batches = from_arrays(load_npz(DECODER / "tokens.kv.npz"), specs).batches
    assert batches[0]["past_key_values.0.key"].shape == (8, 2, 0, 16)


def test_bert_heads_are_prunable_and_go(tmp_path: Path) -> None:
    """transformers' BERT as the TorchScript exporter writes it shares one zero bias between
    every layer through Identity nodes: each gets its own, so the heads are classes of their
    own (not tied to the residual stream, a model output) and --heads removes some."""
    _, graph = analyse(onnx.load(str(BERT)), heads=True)
    assert len(graph.heads) == 2
    assert all(not graph.frozen[h.classes].any() for h in graph.heads)
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(
        BERT,
        0.6,
        structured=onnxprune.Structured(heads=True, target="macs"),
        calibration=onnxprune.Calibration(BERT.parent / "bert_tiny_calib.npz"),
        output=out,
    )
    plan = report.channels
    assert sum(h.kept(plan.removed) for h in plan.graph.heads) < 8
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("heads", [False, True])
def test_bert_invariant(heads: bool, tmp_path: Path) -> None:
    model, graph = analyse(onnx.load(str(BERT)), heads=heads)
    removed = choose(graph, seed=2)
    assert removed.any()
    kill(graph, removed)
    with np.load(BERT.parent / "bert_tiny_val.npz") as data:
        feeds = {k: data[k][:4] for k in ("input_ids", "attention_mask", "token_type_ids")}
    expected = run(ir.serde.serialize_model(model), feeds)
    apply_channel_plan(model, ChannelPlan(graph, removed, counted_weights(model, graph)))
    path = io.save_model(model, tmp_path / "pruned.onnx", force=True, check=True)
    for e, g in zip(expected, run(path, feeds), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


def test_positions_follow_the_mask() -> None:
    """transformers' positions: counted along the mask, 1 where it is 0 (left padding)."""
    from onnxprune.inputs.sequence import positions_of

    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_of(mask, np.dtype(np.int64)).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_made_inputs_are_said_and_empty_tokens_refused() -> None:
    from onnxprune.errors import DataError
    from onnxprune.inputs import from_arrays

    specs = model_input_specs(io.load_model(_path("kv.legacy")))
    ids = np.zeros((2, 5), np.int64)
    made = from_arrays({"input_ids": ids, "attention_mask": np.ones((2, 5), np.int64)}, specs)
    assert made.batches[0]["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert any("made position_ids" in n and "4 empty past" in n for n in made.notices)
    with pytest.raises(DataError, match="is empty"):
        from_arrays({"input_ids": np.zeros((2, 0), np.int64)}, specs)


def test_calibrated_channels_on_the_dynamo_export(tmp_path: Path) -> None:
    """torch.export's decoder: preparing the graph makes later nodes read values (its shape
    guards read past) that the dense model's names never carry across a segment's cut; the
    sequential walk keeps them (it failed with KeyError 'val_1')."""
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(
        _path("dynamo"),
        0.2,
        structured=onnxprune.Structured(target="macs"),
        calibration=onnxprune.Calibration(DECODER / "tokens.npz", device="cpu"),
        output=out,
    )
    assert report.channels is not None and report.channels.achieved == pytest.approx(0.2, abs=0.01)
    assert np.isfinite(run(out, _feeds(io.load_model(_path("dynamo"))))[0]).all()
