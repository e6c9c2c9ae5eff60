"""Structured pruning end to end: the zero-channel invariant on every model, targets, rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import pipeline
from onnxprune.cli import main
from onnxprune.errors import InfeasibleError, InvalidArgumentError
from onnxprune.options import Selection
from tests.builders import GraphBuilder, run, save
from tests.channel_models import (
    MODELS,
    check_invariant,
    combined,
    feeds,
    random_cnn,
    random_transformer,
)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_removing_dead_channels_keeps_outputs(name: str, seed: int, tmp_path: Path) -> None:
    plan = check_invariant(MODELS[name](), tmp_path, seed)
    assert plan.removed.any(), "the model has channels to remove"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_model_is_smaller_checked_and_runs(name: str, tmp_path: Path) -> None:
    proto = MODELS[name]()
    source = save(proto, tmp_path / "in.onnx")
    _, report = pipeline.prune(source, 0.3, structured=True, output=tmp_path / "out.onnx")
    plan = report.channels
    assert plan.achieved >= 0.3
    before, after = plan.params
    assert after < before
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [o.type for o in out.graph.output] == [o.type for o in proto.graph.output]
    assert [i.type for i in out.graph.input] == [i.type for i in proto.graph.input]
    assert _stored(out) < _stored(proto)
    expected = run(proto, feeds(proto))
    got = run(tmp_path / "out.onnx", feeds(proto))
    assert [e.shape for e in expected] == [g.shape for g in got]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_high_sparsity_leaves_no_empty_tensor(name: str, tmp_path: Path) -> None:
    """Every layer and every channel space (a Split part, q and k of a packed projection) keeps a
    channel, so no tensor is ever empty, however hard the model is pruned."""
    proto = MODELS[name]()
    source = save(proto, tmp_path / "in.onnx")
    for sparsity in (0.9, 0.7, 0.5):
        try:
            pipeline.prune(
                source, sparsity, structured=True, output=tmp_path / "o.onnx", force=True
            )
            break
        except InfeasibleError:
            continue
    out = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "o.onnx")))
    constants = {n.output[0] for n in out.graph.node if n.op_type == "Constant"}
    for info in [*out.graph.value_info, *out.graph.output]:
        if info.name in constants:
            continue
        assert all(
            d.dim_value != 0 for d in info.type.tensor_type.shape.dim if d.HasField("dim_value")
        ), info.name
    run(tmp_path / "o.onnx", feeds(proto))


def _stored(proto: onnx.ModelProto) -> int:
    """Elements of all stored tensors: initializers and Constant nodes."""
    tensors = [*proto.graph.initializer]
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute]
    return sum(int(np.prod(t.dims)) for t in tensors)


def test_round_to_keeps_multiples(tmp_path: Path) -> None:
    b = GraphBuilder(21)
    h = b.input("x", ["N", 3, 6, 6])
    for c_in, c_out in ((3, 32), (32, 24), (24, 16)):
        h = b.node("Relu", [b.node("Conv", [h, b.weight((c_out, c_in, 3, 3))], pads=[1] * 4)])
    b.node("Conv", [h, b.weight((2, 16, 1, 1))], out="y")
    b.output("y", shape=["N", 2, 6, 6])
    source = save(b.model(), tmp_path / "in.onnx")
    _, report = pipeline.prune(source, 0.5, structured=onnxprune.Structured(round_to=8))
    plan = report.channels
    kept = [plan.kept_of(layer.classes) for layer in plan.graph.layers]
    assert all(k % 8 == 0 and k > 0 for k in kept[:3]), kept
    assert plan.achieved >= 0.5
    _, plain = pipeline.prune(source, 0.5, structured=True)
    assert any(plain.channels.kept_of(layer.classes) % 8 for layer in plain.channels.graph.layers)


def test_mac_target_counts_macs(tmp_path: Path) -> None:
    source = save(combined(), tmp_path / "in.onnx")
    _, by_params = pipeline.prune(source, 0.4, structured=True)
    _, by_macs = pipeline.prune(source, 0.4, structured=onnxprune.Structured(target="macs"))
    params, macs = by_macs.channels.params, by_macs.channels.macs
    assert 1 - macs[1] / macs[0] >= 0.4
    assert by_macs.channels.achieved == pytest.approx(1 - macs[1] / macs[0])
    assert by_params.channels.achieved == pytest.approx(
        1 - by_params.channels.params[1] / by_params.channels.params[0]
    )
    assert params[0] == by_params.channels.params[0]
    # the first (MAC-heavy, parameter-light) layers are hit harder when MACs count
    assert (
        by_macs.channels.removed.sum() != by_params.channels.removed.sum()
        or macs[1] != by_params.channels.macs[1]
    )


def test_min_keep_is_respected_and_infeasible_is_an_error(tmp_path: Path) -> None:
    source = save(combined(), tmp_path / "in.onnx")
    _, report = pipeline.prune(source, Selection(0.3, min_keep=0.75), structured=True)
    plan = report.channels
    for layer in plan.graph.layers:
        n = len(np.unique(layer.classes))
        assert plan.kept_of(np.unique(layer.classes)) >= min(n, int(np.ceil(0.75 * n)))
    with pytest.raises(InfeasibleError, match="whole channels"):
        pipeline.prune(source, Selection(0.95, min_keep=0.75), structured=True)
    with pytest.raises(InvalidArgumentError):
        pipeline.prune(source, Selection(0.3, pattern="2:4"), structured=True)
    with pytest.raises(InvalidArgumentError):
        pipeline.prune(source, 0.3, structured=onnxprune.Structured(target="flops"))


def test_selection_is_deterministic(tmp_path: Path) -> None:
    source = save(combined(), tmp_path / "in.onnx")
    first = pipeline.prune(source, 0.4, structured=True)[1].channels.removed
    second = pipeline.prune(source, 0.4, structured=True)[1].channels.removed
    assert np.array_equal(first, second)


def test_zero_sparsity_changes_nothing(tmp_path: Path) -> None:
    proto = combined()
    source = save(proto, tmp_path / "in.onnx")
    pipeline.prune(source, 0.0, structured=True, output=tmp_path / "out.onnx")
    np.testing.assert_array_equal(
        run(proto, feeds(proto))[0], run(tmp_path / "out.onnx", feeds(proto))[0]
    )


def test_cli_structured_prints_channels_and_frozen_groups(tmp_path: Path) -> None:
    source = save(MODELS["unknown_op"](), tmp_path / "in.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        [str(source), "--structured", "--sparsity", "0.3", "--round-to", "2", "--target", "macs",
         "-o", str(out), "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "channels" in result.output and "kept" in result.output
    assert "frozen:" in result.output and "LRN" in result.output
    data = json.loads(report.read_text())
    assert data["structured"] and data["target_metric"] == "macs" and data["round_to"] == 2
    assert any("LRN" in r for g in data["frozen_groups"] for r in g["reasons"])
    assert data["macs"]["after"] < data["macs"]["before"]
    assert out.exists()


def test_digits_model(tmp_path: Path) -> None:
    """The bundled demo model: residual, depthwise Conv, Concat, Flatten head."""
    source = Path(__file__).parent.parent / "models" / "digits_cnn.onnx"
    if not source.exists():
        pytest.skip("models/digits_cnn.onnx is not there")
    check_invariant(onnx.load(str(source)), tmp_path)
    _, report = pipeline.prune(source, 0.5, structured=True, output=tmp_path / "o.onnx")
    assert report.channels.achieved >= 0.5


def test_exclude_and_include_freeze_layers_with_the_reason(tmp_path: Path) -> None:
    source = save(combined(), tmp_path / "in.onnx")
    _, report = pipeline.prune(source, Selection(0.2, exclude=["Conv32"]), structured=True)
    plan = report.channels
    layer = next(layer for layer in plan.graph.layers if layer.name == "Conv32")
    assert plan.kept_of(layer.classes) == len(layer.classes)
    assert any("--exclude" in r for g in plan.graph.groups for r in g.reasons)
    _, report = pipeline.prune(source, Selection(0.1, include=["Conv32"]), structured=True)
    plan = report.channels
    for other in plan.graph.layers:
        if other.name != "Conv32" and not np.isin(other.classes, layer.classes).any():
            assert plan.kept_of(other.classes) == len(other.classes)


def test_cli_inspect_structured_writes_nothing(tmp_path: Path) -> None:
    source = save(MODELS["unknown_op"](), tmp_path / "in.onnx")
    result = CliRunner().invoke(main, ["inspect", str(source), "--structured", "-s", "0.2"])
    assert result.exit_code == 0, result.output
    assert "frozen:" in result.output and "LRN" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_external_data_model(tmp_path: Path) -> None:
    proto = combined()
    source = tmp_path / "in.onnx"
    onnx.save(combined(), str(source), save_as_external_data=True, location="in.onnx.data",
              size_threshold=0)  # fmt: skip
    out = tmp_path / "out.onnx"
    _, report = pipeline.prune(source, 0.4, structured=True, output=out)
    assert (tmp_path / "out.onnx.data").exists()
    assert report.channels.achieved >= 0.4
    assert run(out, feeds(proto))[0].shape == run(proto, feeds(proto))[0].shape


@pytest.mark.parametrize("seed", range(24))
def test_invariant_on_random_cnns(seed: int, tmp_path: Path) -> None:
    assert check_invariant(random_cnn(seed), tmp_path, seed).removed.any()


@pytest.mark.parametrize("seed", range(12))
def test_invariant_on_random_transformers(seed: int, tmp_path: Path) -> None:
    assert check_invariant(random_transformer(seed), tmp_path, seed).removed.any()
