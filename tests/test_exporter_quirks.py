"""What real exporters do that onnxprune must handle without silence or damage (issue 23):

- LSTM weights stored once and read in pieces (Slice/Concat, in If branches) are pruned in the
  stored constant; every float constant of 1024 elements or more is in the report;
- fixed transforms (a DFT basis, YOLOv8's DFL arange, identities, averaging kernels) are skipped
  or frozen, never pruned; If branches the run's inputs never take are reported;
- a state input batched on axis 1 is read, calibrated and validated;
- rewrites never write what the model's opset lacks, and the output loads in ONNX Runtime;
- -1 input dims are dynamic; constant-only Pad chains are folded before the channel walk;
- --round-to holds across split-coupled groups (C2f), or says where it could not.

Models: tests/export_builders.py (small, on the fly) and models/exports/ (real exporters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune import channels, inputs, pipeline, weights
from onnxprune.cli import main
from onnxprune.core.graphs import opset_problems
from onnxprune.core.patterns import fixed_transform
from onnxprune.options import Calibration, Selection, Structured, Validation
from onnxprune.report.weights import untaken_line
from onnxprune.storage import io
from tests import builders, channel_models
from tests import export_builders as eb
from tests.builders import run, save

EXPORTS = Path(__file__).resolve().parent.parent / "models" / "exports"
BIG = 1024


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def big_floats(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float initializers and Constant values of BIG elements or more, in every graph."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    found = {}
    for graph in _graphs(model.graph):
        tensors = [(t.name, t) for t in graph.initializer]
        tensors += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value"]  # fmt: skip
        for name, tensor in tensors:
            if tensor.data_type in floats and int(np.prod(tensor.dims)) >= BIG:
                found[name] = numpy_helper.to_array(tensor)
    return found


def named_in(report: dict) -> set[str]:
    """Every tensor name a JSON report accounts for: layers, skipped, not reached."""
    names = set()
    for layer in report.get("layers") or []:
        names |= {layer.get("name"), layer.get("weight")}
    names |= {x["name"] for x in report.get("skipped") or []}
    for x in report.get("unreached") or []:
        names |= {x["weight"], x["name"]}
    return names


def _test_models() -> dict[str, onnx.ModelProto]:
    found = {f"builder:{k}": v for k, v in eb.all_builders().items()}
    for path in sorted(EXPORTS.glob("*.onnx")):
        found[path.stem] = onnx.load(str(path))
    found["small_cnn"] = builders.small_cnn()
    found["combined"] = channel_models.combined()
    found["random_transformer"] = channel_models.random_transformer(1)
    return found


MODELS = _test_models()


# -- every big float constant is accounted for (item 1) ----------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("structured", [False, True], ids=["weights", "channels"])
def test_every_big_float_constant_is_in_the_report(name: str, structured: bool) -> None:
    proto = MODELS[name]
    model = ir.serde.deserialize_model(proto)
    try:
        _, report = pipeline.prune(
            model, 0.3, structured=Structured(compensate=False) if structured else False
        )
    except Exception as exc:  # structured refuses models it cannot touch: that says why
        assert structured and "no channel can be removed" in str(exc), exc
        return
    missing = set(big_floats(proto)) - named_in(report.to_dict())
    assert not missing, f"{name}: passed over in silence: {sorted(missing)}"


def test_lstm_pieces_are_pruned_in_the_stored_constant(tmp_path: Path) -> None:
    proto = eb.vad_lstm(hidden=32, features=16)
    src = save(proto, tmp_path / "vad.onnx")
    found = weights.find_weights(ir.load(str(src)))
    by_name = {w.name: w for w in found.weights}
    for name in ("decoder.rnn.weight_ih", "decoder.rnn.weight_hh"):
        weight = by_name[name]
        assert weight.op_type == "LSTM"
        # gate rows (the stored axis 0) are the output axis, the inputs axis 1
        assert {(u.out_axis, u.in_axis) for u in weight.uses} == {(0, 1)}
        assert all("Slice" in u.via and "Concat" in u.via for u in weight.uses)
        assert len(weight.uses) == 2  # the 16 kHz and the 8 kHz branch's LSTM
    out = tmp_path / "out.onnx"
    _, report = pipeline.prune(src, 0.5, output=out)
    layers = {x["name"]: x for x in report.to_dict()["layers"]}
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for name in ("decoder.rnn.weight_ih", "decoder.rnn.weight_hh"):
        zeros = int((written[name] == 0).sum())
        assert zeros == layers[name]["params"] - layers[name]["kept"] > 0
    data = eb.feeds(proto)
    assert [o.shape for o in run(out, data)] == [o.shape for o in run(proto, data)]


def test_pieces_read_by_other_ops_are_skipped_with_the_reason() -> None:
    """A constant whose piece also feeds a non-weight input is not a weight: skipped, said."""
    g = eb._Graph(0)
    x = g.input("x", ["N", 8])
    w = g.weight((8, 8), "packed")
    top = g.op("Slice", [w, g.ints([0]), g.ints([4]), g.ints([0])])
    rest = g.op("Slice", [w, g.ints([4]), g.ints([8]), g.ints([0])])
    h = g.op("MatMul", [x, g.op("Concat", [top, rest], axis=0)])
    g.op("Add", [h, g.op("ReduceSum", [rest, g.ints([0])], keepdims=0)], out="y")
    g.output("y", ["N", 8])
    found = weights.find_weights(ir.serde.deserialize_model(g.model("m", 17, "t")))
    assert not found.weights
    assert found.skipped[0][0] == "packed" and "ReduceSum" in found.skipped[0][1]


def test_structured_lists_lstm_pieces_as_not_reached() -> None:
    model = ir.serde.deserialize_model(eb.vad_lstm())
    channels.prepare(model)
    graph = channels.build(model)
    unreached = {u.weight: u for u in graph.unreached}
    assert {"decoder.rnn.weight_ih", "decoder.rnn.weight_hh"} <= set(unreached)
    assert "If 'if_16k'" in unreached["decoder.rnn.weight_ih"].reason


# -- fixed transforms (item 2) --------------------------------------------------------------------
def _dct(n: int) -> np.ndarray:
    k, t = np.arange(n)[:, None], np.arange(n)
    return np.cos(np.pi * k * (t + 0.5) / n).astype(np.float32)


@pytest.mark.parametrize(
    ("array", "kind"),
    [
        (eb.dft_basis(32), "windowed Fourier"),
        (eb.dft_basis(64)[:, 0, :] / np.maximum(eb.dft_basis(64)[:1, 0, :], 1e-9), None),
        (_dct(32), "Fourier/cosine"),
        (np.eye(12, dtype=np.float32), "identity"),
        (np.eye(12, dtype=np.float32)[::-1].copy(), "selection"),
        (np.full((8, 1, 3, 3), 1 / 9, np.float32), "averaging"),
        (np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1), "arithmetic"),
    ],
)
def test_fixed_transforms_are_recognised_by_value(array: np.ndarray, kind: str | None) -> None:
    found = fixed_transform(array)
    if kind is None:  # a DFT with its window divided out badly: not a clean basis, any verdict
        return
    assert found is not None and kind in found, found


@pytest.mark.parametrize("seed", range(5))
def test_learned_weights_are_not_fixed_transforms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for shape in [(64, 64, 3), (512, 128), (130, 1, 128), (8, 8), (1, 8, 1, 1), (16, 3, 3, 3)]:
        assert fixed_transform(rng.standard_normal(shape).astype(np.float32)) is None
    assert fixed_transform(np.ones((16, 16), np.float32)) is None  # a sum, not a mean
    trained = eb.dft_basis(32) + 0.05 * rng.standard_normal((34, 1, 32)).astype(np.float32)
    assert fixed_transform(trained) is None  # a basis that training moved is learned


def test_stft_basis_is_never_pruned(tmp_path: Path) -> None:
    proto = eb.stft_frontend()
    src = save(proto, tmp_path / "stft.onnx")
    basis = numpy_helper.to_array(proto.graph.initializer[0])
    for mode, kwargs in (
        ("weights", {}),
        ("nm", {}),
        ("channels", {"structured": Structured(compensate=False)}),
    ):
        out = tmp_path / f"{mode}.onnx"
        options = Selection(pattern="2:4") if mode == "nm" else Selection(0.3)
        _, report = pipeline.prune(src, options, output=out, **kwargs)
        written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        np.testing.assert_array_equal(written["stft.forward_basis_buffer"], basis)
        data = report.to_dict()
        if mode == "channels":
            (layer,) = [x for x in data["layers"] if x["weight"] == "stft.forward_basis_buffer"]
            assert layer["frozen"] == layer["channels"] and "Fourier" in layer["reasons"][0]
        else:
            (skip,) = [x for x in data["skipped"] if x["name"] == "stft.forward_basis_buffer"]
            assert "fixed transform" in skip["reason"]


def test_yolo_dfl_projection_is_never_pruned(tmp_path: Path) -> None:
    src = save(eb.yolo_head(), tmp_path / "yolo.onnx")
    _, report = pipeline.prune(src, Selection(pattern="2:4"), output=tmp_path / "o.onnx")
    skipped = dict(report.skipped)
    assert "arithmetic sequence" in skipped["model.4.dfl.conv.weight"]
    written = {t.name: t for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer}
    np.testing.assert_array_equal(
        numpy_helper.to_array(written["model.4.dfl.conv.weight"]).reshape(-1), np.arange(8)
    )


def test_untaken_if_branches_are_reported(tmp_path: Path) -> None:
    """sr = 16000 in the data: the 8 kHz branch (inside the outer else) never runs; weights
    read only there are named."""
    proto = eb.vad_lstm()
    # a weight only the 8 kHz branch reads: the else branch's If holds it
    src = save(proto, tmp_path / "vad.onnx")
    data = tmp_path / "val.npz"
    np.savez(data, **eb.feeds(proto, batch=4))
    _, report = pipeline.prune(
        src, 0.5, output=tmp_path / "o.onnx", validation=Validation(data=data)
    )
    (branch,) = report.untaken
    assert (branch.node, branch.branch, branch.inputs) == ("if_16k", "else_branch", {"sr": 16000})
    assert "else_branch of If 'if_16k' for sr=16000" in untaken_line(branch)
    model = ir.serde.deserialize_model(_branch_local_weights())
    found = weights.find_weights(model).weights
    (only,) = weights.untaken(model, found, {"sr": np.array(16000)})
    assert only.branch == "else_branch" and only.weights == ["b_w"]


def _branch_local_weights() -> onnx.ModelProto:
    def branch(tag: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 4)).astype(
            np.float32), f"{tag}_w")  # fmt: skip
        node = helper.make_node("MatMul", ["x", w.name], [f"{tag}_y"], name=f"{tag}_mm")
        out = helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, ["N", 4])
        return helper.make_graph([node], tag, [], [out], [w])

    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate")
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16"]),
        helper.make_node("If", ["is16"], ["y"], name="choose", then_branch=branch("a"),
                         else_branch=branch("b")),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [rate],
    )  # fmt: skip
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 16)])


# -- batch axes (item 3) ---------------------------------------------------------------------------
def test_batch_axis_comes_from_the_shared_symbolic_dim() -> None:
    axes = inputs.batch_axes_of({"input": ["N", 512], "sr": [], "state": [2, "N", 128]})
    assert axes == {"input": 0, "sr": None, "state": 1}
    # BERT: batch and sequence shared; batch is first in every input
    assert inputs.batch_axes_of({"ids": ["B", "S"], "mask": ["B", "S"]}) == {"ids": 0, "mask": 0}
    # a name shared off axis 0 only (a fixed batch of 1 and a sequence) decides nothing
    assert inputs.batch_axes_of({"a": [1, "S"], "b": [1, "S"]}) == {"a": 0, "b": 0}
    assert inputs.batch_axes_of({"a": ["N", 3], "b": [2, 5]}, {"b": 1}) == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    ("override", "message"),
    [({"nope": 1}, "has no such input"), ({"b": 2}, "has 2 axes")],
)
def test_batch_axis_override_is_checked(override: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        inputs.batch_axes_of({"a": ["N", 3], "b": [2, 5]}, override)


def test_state_batched_on_axis_1_calibrates_and_validates(tmp_path: Path) -> None:
    proto = eb.vad_lstm()
    src = save(proto, tmp_path / "vad.onnx")
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, **eb.feeds(proto, batch=6, seed=1))
    np.savez(val, **eb.feeds(proto, batch=5, seed=2))
    _, report = pipeline.prune(
        src, 0.5, calibration=Calibration(calib, batch_size=4), output=tmp_path / "o.onnx",
        validation=Validation(data=val, batch_size=2),
    )  # fmt: skip
    assert report.calibration.samples == 6 and report.validation.samples == 5
    got = inputs.from_arrays(
        dict(np.load(val)), inputs.with_batch_axes(_specs(proto)), batch_size=2
    )
    assert [b["state"].shape for b in got.batches] == [(2, 2, 32), (2, 2, 32), (2, 1, 32)]
    assert got.samples == 5


def _specs(proto: onnx.ModelProto) -> list[inputs.InputSpec]:
    from onnxprune.calibration import model_input_specs

    return model_input_specs(ir.serde.deserialize_model(proto))


def test_batch_axis_flag(tmp_path: Path) -> None:
    """--batch-axis names the axis where the model's dims do not (a state [2, 1, H] with a
    fixed batch of 1 in the file, stacked on axis 1 in the data)."""
    proto = eb.vad_lstm()
    src = save(proto, tmp_path / "vad.onnx")
    data = eb.feeds(proto, batch=3)
    np.savez(tmp_path / "val.npz", **data)
    argv = [str(src), "-s", "0.5", "--data", str(tmp_path / "val.npz"), "-q"]
    ok = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "a.onnx"), "--batch-axis",
                                   "state=1"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "b.onnx"), "--batch-axis",
                                    "state=0"])  # fmt: skip
    assert bad.exit_code == 2 and "different numbers of samples" in bad.output
    wrong = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "c.onnx"), "--batch-axis",
                                      "state=x"])  # fmt: skip
    assert wrong.exit_code == 2 and "NAME=AXIS" in wrong.output


# -- opset (item 5) -
def test_structured_below_opset_14_writes_no_allowzero(tmp_path: Path) -> None:
    for head, opset in (("cls", 13), ("ctc", 11)):
        src = save(eb.paddle_opset11(head=head, opset=opset), tmp_path / f"{head}.onnx")
        out = tmp_path / f"{head}.out.onnx"
        pipeline.prune(src, 0.1, structured=Structured(compensate=False), output=out)
        written = onnx.load(str(out))
        assert not any(a.name == "allowzero" for n in written.graph.node for a in n.attribute)
        assert opset_problems(ir.load(str(out))) == []
        assert run(out, {"x": np.zeros((2, 3, 16, 64), np.float32)})


def test_opset_problems_and_save_refuses_them(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(builders.small_cnn())
    model.opset_imports[""] = 11
    node = next(n for n in model.graph if n.op_type == "Conv")
    node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    (problem,) = opset_problems(model)
    assert "'allowzero' does not exist at opset 11" in problem
    with pytest.raises(io.OpsetError, match="allowzero"):
        io.save_model(model, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_split_sizes_below_opset_13_stay_an_attribute(tmp_path: Path) -> None:
    """An equal Split at opset 11 has no sizes: after removal they are an attribute, never the
    input that opset lacks."""
    g = eb._Graph(3)
    h = g.op("Conv", [g.input("x", ["N", 4, 6, 6]), g.weight((8, 4, 1, 1))])
    a, b = g.op("Split", [h], n_out=2, axis=1)
    y = g.op("Add", [g.op("Conv", [a, g.weight((4, 4, 1, 1))]),
                     g.op("Conv", [b, g.weight((4, 4, 1, 1))])])  # fmt: skip
    g.op("Identity", [y], out="y")
    g.output("y", ["N", 4, 6, 6])
    src = save(g.model("split11", 11, "t"), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    _, report = pipeline.prune(src, 0.3, structured=Structured(compensate=False), output=out)
    split = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Split")
    assert len(split.input) == 1 and [a.name for a in split.attribute] == ["axis", "split"]
    assert report.channels.removed.any()


def test_output_check_loads_the_model_in_onnx_runtime(tmp_path: Path, monkeypatch) -> None:
    src = save(builders.small_cnn(), tmp_path / "m.onnx")
    model = io.load_model(src)
    monkeypatch.setattr(io, "_runtime_refuses", lambda path: None if Path(path) == src else "boom")
    with pytest.raises(onnx.checker.ValidationError, match="ONNX Runtime cannot load"):
        io.save_model(model, tmp_path / "o.onnx", input_path=src, check=True)
    assert not (tmp_path / "o.onnx").exists()
    # an input ONNX Runtime cannot load either (custom ops of the user's own) is not held to it
    monkeypatch.setattr(io, "_runtime_refuses", lambda path: "custom op")
    io.save_model(model, tmp_path / "o.onnx", input_path=src, check=True)
    assert (tmp_path / "o.onnx").exists()


# -- -1 dims (item 6) -
def test_minus_one_dims_are_dynamic(tmp_path: Path) -> None:
    proto = eb.paddle_opset11(head="ctc")
    src = save(proto, tmp_path / "ocr.onnx")
    model = io.load_model(src)
    dims = [str(d) if not isinstance(d, int) else d for d in model.graph.inputs[0].shape]
    assert dims == ["x_dim0", 3, 16, "x_dim3"]
    signature = inputs.model_signature(src)
    assert signature.specs[0].shape == (None, 3, 16, None)
    data = tmp_path / "val.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 3, 16, 48)).astype(np.float32))
    out = tmp_path / "o.onnx"
    _, report = pipeline.prune(src, 0.2, structured=True, output=out,
                               validation=Validation(data=data))  # fmt: skip
    assert report.validation.samples == 4
    written = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in written] == ["x_dim0", 3, 16, "x_dim3"]


def test_other_negative_dims_are_still_refused(tmp_path: Path) -> None:
    proto = eb.paddle_opset11(head="cls")
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -2
    result = CliRunner().invoke(main, [str(save(proto, tmp_path / "m.onnx")), "-s", "0.5"])
    assert result.exit_code == 2 and "negative dimension (-2)" in result.output


# -- constant-only chains folded (item 7) -
@pytest.mark.parametrize("chain", ["torch", "simple"])
def test_constant_pad_chains_are_folded_before_the_walk(chain: str, tmp_path: Path) -> None:
    proto = eb.crepe_like(channels=16, taps=8, out_channels=8, frame=256, first_kernel=16,
                          pad_chain=chain)  # fmt: skip
    model = ir.serde.deserialize_model(proto)
    channels.prepare(model)
    pads = [n for n in model.graph if n.op_type == "Pad"]
    assert all(n.inputs[1].const_value is not None for n in pads)
    graph = channels.build(model)
    assert graph.prunable.any() and not graph.unreached
    for seed in (0, 1):
        assert channel_models.check_invariant(proto, tmp_path, seed, sizes={"N": 2}).removed.any()


def test_fold_constants_pass_stores_small_integers_only() -> None:
    model = ir.serde.deserialize_model(eb.crepe_like(channels=16, taps=8, out_channels=8,
                                                     frame=256, first_kernel=16))  # fmt: skip
    before = len(list(model.graph))
    assert channels.FoldConstantsPass()(model).modified
    for value in model.graph.initializers.values():
        if value.name.endswith("_folded"):
            assert value.const_value.dtype.is_integer() and value.const_value.size <= 4096
    assert len(list(model.graph)) == before  # folding only adds; preparation removes the rest


# -- --round-to across split-coupled groups (item 9) -
@pytest.mark.parametrize("n", [1, 2])
def test_round_to_holds_in_c2f_blocks(n: int) -> None:
    proto = eb.c2f_block(channels=32, n=n)
    model = ir.serde.deserialize_model(proto)
    _, report = pipeline.prune(model, 0.3, structured=Structured(round_to=8, compensate=False))
    plan = report.channels
    for layer in plan.graph.layers:
        count = len(layer.classes)
        if count % 8 == 0:
            assert plan.kept_of(layer.classes) % 8 == 0, layer.name
    assert not any("not honoured" in w for w in plan.warnings)
    assert plan.removed.any()


def test_round_to_says_which_layers_it_missed() -> None:
    """A split into parts narrower than N (halves of 12 with --round-to 8): named."""
    proto = eb.c2f_block(channels=24)
    model = ir.serde.deserialize_model(proto)
    _, report = pipeline.prune(model, 0.2, structured=Structured(round_to=8, compensate=False))
    plan = report.channels
    missed = [layer.name for layer in plan.graph.layers
              if len(layer.classes) % 8 == 0 and plan.kept_of(layer.classes) % 8]  # fmt: skip
    warned = [w for w in plan.warnings if "--round-to 8 not honoured" in w]
    assert bool(missed) == bool(warned)
    if missed:
        assert f"in {len(missed)} layer(s)" in warned[0]


def test_frozen_groups_name_every_constraint() -> None:
    """YOLOv8's head: the class channels reach the output; the box channels feed the DFL
    Softmax; the DFL projection is a fixed transform (and reaches the output too)."""
    model = ir.serde.deserialize_model(eb.yolo_head())
    _, report = pipeline.prune(model, 0.2, structured=Structured(compensate=False))
    frozen = {tuple(g["layers"]): g["reasons"] for g in report.to_dict()["frozen_groups"]}
    reasons = [r for rs in frozen.values() for r in rs]
    assert any("Softmax" in r for r in reasons)
    assert any("model output 'output0'" in r for r in reasons)
    assert any("fixed transform" in r for r in reasons)
    assert not any("stored tensor 'output0'" in r for r in reasons)
