"""The builders of real exporters' graph shapes build what they say: valid, runnable, seeded."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests import export_builders as eb

BUILDERS = {
    "vad_lstm": lambda: eb.vad_lstm(),
    "layernorm_sum_onehot": lambda: eb.layernorm_classifier(spelling="sum", embed="onehot"),
    "layernorm_mean_gather": lambda: eb.layernorm_classifier(spelling="mean", embed="gather"),
    "layernorm_mean_opset18": lambda: eb.layernorm_classifier(spelling="mean", opset=18),
    "paddle_ocr_opset11": lambda: eb.paddle_opset11(head="ctc", opset=11),
    "paddle_ocr_opset13": lambda: eb.paddle_opset11(head="ctc", opset=13),
    "paddle_cls_opset11": lambda: eb.paddle_opset11(head="cls", opset=11),
    "stft_frontend": lambda: eb.stft_frontend(),
    "crepe_like": lambda: eb.crepe_like(channels=32, taps=16),
    "crepe_like_simple_pads": lambda: eb.crepe_like(channels=32, taps=16, pad_chain="simple"),
    "c2f_block": lambda: eb.c2f_block(n=2),
    "c2f_no_shortcut": lambda: eb.c2f_block(shortcut=False),
    "yolo_head": lambda: eb.yolo_head(),
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builds_checks_and_runs(name: str) -> None:
    model = BUILDERS[name]()
    assert model.ir_version == eb.IR_VERSION and model.opset_import[0].version >= 11
    onnx.checker.check_model(model, full_check=True)
    outputs = _session(model).run(None, eb.feeds(model, batch=3))
    assert all(np.isfinite(o).all() for o in outputs)
    assert outputs[0].shape[0] == 3 or name.startswith("vad")
    assert model.SerializeToString() == BUILDERS[name]().SerializeToString()  # seeded


def test_vad_lstm_weights_stored_once_and_reached_through_if() -> None:
    model = eb.vad_lstm(hidden=16)
    stored = {t.name for t in model.graph.initializer}
    assert {"decoder.rnn.weight_ih", "decoder.rnn.weight_hh"} <= stored
    branches = {a.name: a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute}
    then16 = branches["then_branch"]
    assert "LSTM" in _ops(then16) and not then16.initializer
    lstm = next(n for n in then16.node if n.op_type == "LSTM")
    producers = _producers(then16)
    w = producers[lstm.input[1]]
    assert w.op_type == "Unsqueeze" and producers[w.input[0]].op_type == "Concat"
    assert all(producers[i].op_type == "Slice" for i in producers[w.input[0]].input)
    assert producers[producers[w.input[0]].input[0]].input[0] == "decoder.rnn.weight_ih"
    inner = next(n for n in branches["else_branch"].node if n.op_type == "If")
    assert "LSTM" in _ops(next(a.g for a in inner.attribute if a.name == "then_branch"))
    state = next(i for i in model.graph.input if i.name == "state")
    dims = [d.dim_value or d.dim_param for d in state.type.tensor_type.shape.dim]
    assert dims == [2, "N", 16]  # the batch on axis 1
    session = _session(model)
    feeds = eb.feeds(model, batch=2)
    results = {}
    for rate in (16000, 8000, 44100):
        feeds["sr"] = np.array(rate, np.int64)
        prob, new_state = session.run(None, feeds)
        assert prob.shape == (2, 1) and new_state.shape == (2, 2, 16)
        results[rate] = prob
    assert not np.allclose(results[16000], results[8000])
    assert np.all(results[44100] == 0)


def test_vad_lstm_reorders_gates_like_torch() -> None:
    """The Slice/Concat turn torch's (i, f, g, o) rows into ONNX's (i, o, f, c): a model whose
    only nonzero gate rows are torch's output gate must keep c (and so h) at zero."""
    model = eb.vad_lstm(hidden=8, features=4)
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for name in ("decoder.rnn.bias_ih", "decoder.rnn.bias_hh"):
        arrays[name][:] = 0
        arrays[name][16:24] = 5.0  # torch's g rows: the cell candidate, tanh(5) ~ 1
    for name in ("decoder.rnn.weight_ih", "decoder.rnn.weight_hh"):
        arrays[name][:] = 0
    arrays["decoder.rnn.bias_ih"][0:8] = 50.0  # input gate open
    for t in model.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    feeds = eb.feeds(model, batch=1)
    feeds["state"][:] = 0
    _, state = _session(model).run(None, feeds)
    # c = i * g accumulates with the forget gate at sigmoid(0) = 0.5: positive and near 2
    assert np.all(state[1] > 1.5)


@pytest.mark.parametrize("spelling", ["sum", "mean"])
def test_layernorm_spelt_out_with_expand_of_computed_shape(spelling: str) -> None:
    model = eb.layernorm_classifier(spelling=spelling)
    ops = _ops(model.graph)
    assert "LayerNormalization" not in ops and "Expand" in ops and "Sqrt" in ops
    wanted = {"sum": {"ReduceSum", "Div", "Sub", "Mul"}, "mean": {"ReduceMean", "Pow", "Add"}}
    assert wanted[spelling] <= set(ops)
    producers = _producers(model.graph)
    expand = next(n for n in model.graph.node if n.op_type == "Expand")
    concat = producers[expand.input[1]]
    assert concat.op_type == "Concat"
    gather = producers[concat.input[0]]
    assert gather.op_type == "Gather" and producers[gather.input[0]].op_type == "Shape"
    assert ops.index("Conv") < ops.index("Expand") < ops.index("MatMul", ops.index("Expand"))
    probs = _session(model).run(None, eb.feeds(model, batch=4))[0]
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_layernorm_matches_numpy() -> None:
    """The spelt-out LayerNorm normalises: both spellings give the same probabilities."""
    a = eb.layernorm_classifier(spelling="sum", embed="gather")
    b = eb.layernorm_classifier(spelling="mean", embed="gather")
    feeds = eb.feeds(a, batch=3)
    assert np.allclose(_session(a).run(None, feeds)[0], _session(b).run(None, feeds)[0],
                       atol=1e-5)  # fmt: skip


def test_layernorm_rejects_unknown_spelling() -> None:
    with pytest.raises(ValueError, match="spelling"):
        eb.layernorm_classifier(spelling="fused")


@pytest.mark.parametrize("head", ["ctc", "cls"])
def test_paddle_minus_one_dims_and_reshape_chain(head: str) -> None:
    model = eb.paddle_opset11(head=head, opset=11)
    assert model.opset_import[0].version == 11
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_value") and dims[0].dim_value == -1
    assert not any(d.HasField("dim_param") for d in dims)
    assert not model.graph.initializer  # every weight a Constant node
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                 for n in model.graph.node if n.op_type == "Constant"}  # fmt: skip
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(not n.attribute for n in reshapes)  # no allowzero
    targets = [constants[n.input[1]].tolist() for n in reshapes]
    assert all(t[0] == 0 and -1 in t for t in targets)
    if head == "ctc":
        assert len(reshapes) >= 3 and "Transpose" in _ops(model.graph)
        out = _session(model).run(None, eb.feeds(model, batch=2))[0]
        assert out.shape == (2, 32, 12) and np.allclose(out.sum(-1), 1, atol=1e-5)


def test_paddle_refuses_opset_14() -> None:
    with pytest.raises(ValueError, match="below opset 14"):
        eb.paddle_opset11(opset=14)


def test_stft_basis_is_a_dft() -> None:
    model = eb.stft_frontend(n_fft=16, hop=4, samples=64)
    basis = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[
        "stft.forward_basis_buffer"
    ]
    assert basis.shape == (18, 1, 16)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.input[1] == "stft.forward_basis_buffer"
    assert next(a.ints for a in conv.attribute if a.name == "strides") == [4]
    # the rows are the windowed DFT: applied to a frame, they give numpy's rfft of it
    rng = np.random.default_rng(0)
    frame = rng.standard_normal(16)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)
    spectrum = np.fft.rfft(frame * window)
    got = basis[:, 0, :] @ frame
    assert np.allclose(got[:9], spectrum.real, atol=1e-4)
    assert np.allclose(got[9:], spectrum.imag, atol=1e-4)


@pytest.mark.parametrize("chain", ["torch", "simple"])
def test_crepe_pads_come_from_constants_only(chain: str) -> None:
    model = eb.crepe_like(channels=16, taps=8, out_channels=4, frame=256, first_kernel=16,
                          pad_chain=chain)  # fmt: skip
    producers = _producers(model.graph)
    inputs = {i.name for i in model.graph.input}

    def sources(name: str) -> set[str]:
        if name in inputs:
            return {"input"}
        node = producers.get(name)
        if node is None:
            return {"initializer"}
        if node.op_type == "Constant":
            return {"Constant"}
        return set().union(*(sources(i) for i in node.input if i))

    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2
    for pad in pads:
        assert sources(pad.input[1]) == {"Constant"}
        if chain == "simple":
            assert producers[pad.input[1]].op_type == "Concat"
            assert {producers[i].op_type for i in producers[pad.input[1]].input} & {"Div", "Sub"}
        else:  # Cast <- Reshape <- Transpose <- Slice (reversed) <- Reshape <- Concat
            walk, node = [], producers[pad.input[1]]
            while node.op_type != "Concat":
                walk.append(node.op_type)
                node = producers[node.input[0]]
            assert walk == ["Cast", "Reshape", "Transpose", "Slice", "Reshape"]
    # both chains compute the same 'same' padding: the same weights give the same outputs
    other = eb.crepe_like(channels=16, taps=8, out_channels=4, frame=256, first_kernel=16,
                          pad_chain="simple" if chain == "torch" else "torch")  # fmt: skip
    feeds = eb.feeds(model, batch=2)
    assert np.allclose(_session(model).run(None, feeds)[0], _session(other).run(None, feeds)[0])
    wide = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    assert list(wide.dims) == [4, 16, 8, 1]
    out = _session(model).run(None, eb.feeds(model, batch=2))[0]
    assert out.shape == (2, 36)


def test_crepe_wide_layer_size_is_configurable() -> None:
    """The full-width layer is only declared here (33 MB when built): check the arithmetic on a
    mid-size one instead of building it."""
    model = eb.crepe_like(channels=256, taps=64, out_channels=8)
    wide = next(t for t in model.graph.initializer if t.name == "conv2.weight")
    assert list(wide.dims) == [8, 256, 64, 1]  # a design of 256 x 64 = 16384 columns


def test_c2f_split_residual_concat() -> None:
    model = eb.c2f_block(channels=8, n=2)
    ops = _ops(model.graph)
    assert ops.count("Split") == 1 and ops.count("MaxPool") == 3
    producers = _producers(model.graph)
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    kinds = [producers[i].op_type for i in concat.input]
    assert kinds == ["Split", "Split", "Add", "Add"]
    first_add = producers[concat.input[2]]
    assert concat.input[1] in first_add.input  # the residual reads the second half
    plain = eb.c2f_block(channels=8, n=1, shortcut=False)
    assert "Add" not in _ops(plain.graph)


def test_yolo_head_box_class_concat_feeds_decoding_and_output() -> None:
    model = eb.yolo_head(classes=3, reg_max=4)
    producers = _producers(model.graph)
    out = producers["output0"]
    assert out.op_type == "Concat"
    boxes, scores = (producers[i] for i in out.input)
    assert boxes.op_type == "Mul" and scores.op_type == "Sigmoid"
    split = producers[scores.input[0]]
    assert split.op_type == "Split"
    levels = producers[split.input[0]]
    assert levels.op_type == "Concat" and len(levels.input) == 2
    per_level = [producers[producers[i].input[0]] for i in levels.input]
    assert all(n.op_type == "Concat" for n in per_level)
    dfl = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[
        "model.4.dfl.conv.weight"
    ]
    assert dfl.ravel().tolist() == [0, 1, 2, 3]
    result = _session(model).run(None, eb.feeds(model, batch=2))[0]
    assert result.shape == (2, 7, 16 + 4)
    assert np.all((result[:, 4:] > 0) & (result[:, 4:] < 1))
    assert np.all(result[:, 2:4] >= 0)  # widths and heights from non-negative distances


def test_feeds_cover_every_input() -> None:
    for name, build in BUILDERS.items():
        model = build()
        feeds = eb.feeds(model, batch=2)
        assert sorted(feeds) == sorted(i.name for i in model.graph.input), name


def test_all_builders_lists_the_defaults() -> None:
    built = eb.all_builders()
    assert len(built) == 10
    for model in built.values():
        onnx.checker.check_model(model, full_check=True)
