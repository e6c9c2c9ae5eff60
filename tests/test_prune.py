"""End to end through the Python API: valid output, exact sparsity, the input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import GraphBuilder, initializers, mlp, run, save, small_cnn
from onnx import helper

import onnxprune
from onnxprune.options import Selection
from onnxprune.storage.io import check_model_file


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prunable_zeros(path: Path, names: list[str]) -> int:
    tensors = initializers(path)
    return sum(int((tensors[n] == 0).sum()) for n in names)


@pytest.mark.parametrize("build", [small_cnn, mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_output_is_valid_runs_and_hits_sparsity(tmp_path, build, sparsity) -> None:
    src = save(build(), tmp_path / "m.onnx")
    before = digest(src)
    out = tmp_path / "out.onnx"
    _, report = onnxprune.prune(src, sparsity, output=out)
    check_model_file(out)
    names = [layer.weight.name for layer in report.plan.layers]
    assert prunable_zeros(out, names) == round(sparsity * report.plan.total)
    feeds = {
        "x": np.random.default_rng(0)
        .standard_normal((2, 3, 8, 8) if build is small_cnn else (2, 16))
        .astype(np.float32)
    }
    assert run(out, feeds)[0].shape == run(src, feeds)[0].shape
    assert digest(src) == before  # the input is never touched


def test_sparsity_zero_leaves_outputs_bit_identical(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    onnxprune.prune(src, 0.0, output=out)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(out, feeds)[0], run(src, feeds)[0])
    for name, arr in initializers(src).items():
        np.testing.assert_array_equal(initializers(out)[name], arr)


def test_two_runs_give_identical_files(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    onnxprune.prune(src, Selection(0.8, min_keep="0.05"), output=tmp_path / "a.onnx")
    onnxprune.prune(src, Selection(0.8, min_keep="0.05"), output=tmp_path / "b.onnx")
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_only_pruned_tensors_change_and_metadata_stays(tmp_path) -> None:
    model = small_cnn()
    model.producer_name = "unit-test"
    model.doc_string = "a doc string"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "me"})
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    model.graph.value_info.append(
        helper.make_tensor_value_info(relu, onnx.TensorProto.FLOAT, ["N", 8, 8, 8])
    )
    src = save(model, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    _, report = onnxprune.prune(src, 0.5, output=out)
    a, b = onnx.load(str(src)), onnx.load(str(out))
    assert (b.ir_version, b.producer_name, b.doc_string) == (10, "unit-test", "a doc string")
    assert b.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in b.metadata_props} == {"author": "me"}
    assert list(b.opset_import) == list(a.opset_import)
    assert [n.name for n in b.graph.node] == [n.name for n in a.graph.node]
    assert [vi.name for vi in b.graph.value_info] == [vi.name for vi in a.graph.value_info]
    assert [t.name for t in b.graph.initializer] == [t.name for t in a.graph.initializer]
    pruned = {layer.weight.name for layer in report.plan.layers}
    for name, arr in initializers(src).items():
        if name not in pruned:
            np.testing.assert_array_equal(initializers(out)[name], arr)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64], ids=str)
def test_low_and_high_precision_weights(tmp_path, dtype) -> None:
    src = save(mlp(dtype=dtype, dims=(8, 8)), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    onnxprune.prune(src, 0.5, output=out)
    w = initializers(out)
    (name,) = [n for n, a in w.items() if a.ndim == 2]
    assert w[name].dtype == np.dtype(dtype) and int((w[name] == 0).sum()) == 32
    check_model_file(out)


def test_constant_node_weight_is_pruned_in_place(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    w = b.constant(np.arange(1, 13, dtype=np.float32).reshape(4, 3), name="cw")
    b.node("MatMul", [x, w], out="y")
    b.output("y")
    src = save(b.model(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    onnxprune.prune(src, 0.5, output=out)
    node = onnx.load(str(out)).graph.node[0]
    assert node.op_type == "Constant"
    arr = onnx.numpy_helper.to_array(node.attribute[0].t)
    np.testing.assert_array_equal(arr.ravel(), [0, 0, 0, 0, 0, 0, 7, 8, 9, 10, 11, 12])


def test_api_on_in_memory_model_and_stages_alone(tmp_path) -> None:
    model = onnxprune.load_model(save(small_cnn(), tmp_path / "m.onnx"))
    found = onnxprune.find_weights(model)
    p = onnxprune.plan(found.weights, 0.6)
    onnxprune.apply_plan(model, p)
    out = onnxprune.save_model(model, tmp_path / "out.onnx")
    assert prunable_zeros(out, [w.name for w in found.weights]) == round(0.6 * found.total)
    _model2, report = onnxprune.prune(onnxprune.load_model(tmp_path / "m.onnx"), 0.6)
    assert report.output_path is None and report.plan.pruned == p.pruned
    layer = report.plan.layers[0]
    assert int((layer.weight.numpy() == 0).sum()) == layer.prune


def test_pattern_two_four_end_to_end(tmp_path) -> None:
    src = save(mlp(dims=(16, 8, 4)), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    _, report = onnxprune.prune(src, Selection(pattern="2:4"), output=out)
    assert report.plan.sparsity == 0.5
    for layer in report.plan.layers:
        arr = initializers(out)[layer.weight.name]
        assert (np.moveaxis(arr == 0, 0, -1).reshape(-1, 4).sum(axis=1) == 2).all()


def test_report_json_numbers(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    _, report = onnxprune.prune(src, 0.75, output=tmp_path / "o.onnx")
    data = report.to_dict()
    assert data["zeros_after"] == round(0.75 * data["prunable_weights"])
    assert sum(layer["params"] for layer in data["layers"]) == data["prunable_weights"]
    assert sum(layer["params"] - layer["kept"] for layer in data["layers"]) == data["zeros_after"]
    assert data["size_bytes"]["before"] == src.stat().st_size
    assert data["size_bytes"]["after"] == (tmp_path / "o.onnx").stat().st_size


def if_model(rows: int, cols: int) -> onnx.ModelProto:
    """y = x @ then_w (initializer of the then branch) or x @ outer_w (main graph's)."""
    then_b = GraphBuilder(1)
    then_b.node("MatMul", ["x", then_b.weight((rows, cols), name="then_w")], out="t")
    then_b.output("t", shape=["N", cols])
    then_g = helper.make_graph(then_b.nodes, "then", [], then_b.outputs, then_b.initializers)
    else_b = GraphBuilder(2)
    else_b.node("MatMul", ["x", "outer_w"], out="e")
    else_b.output("e", shape=["N", cols])
    else_g = helper.make_graph(else_b.nodes, "else", [], else_b.outputs, [])
    b = GraphBuilder()
    b.input("x", ["N", rows])
    cond = b.input("cond", [], onnx.TensorProto.BOOL)
    b.weight((rows, cols), name="outer_w")
    b.node("If", [cond], out="y", then_branch=then_g, else_branch=else_g)
    b.output("y", shape=["N", cols])
    return b.model()


def test_weights_inside_if_branches_are_pruned_and_run(tmp_path) -> None:
    src = save(if_model(4, 3), tmp_path / "if.onnx")
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(src, 0.5, output=out)
    assert {layer.weight.name for layer in report.plan.layers} == {"then_w", "outer_w"}
    proto = onnx.load(str(out))
    branch = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    then_w = onnx.numpy_helper.to_array(branch.initializer[0])
    outer_w = initializers(out)["outer_w"]
    assert int((then_w == 0).sum()) + int((outer_w == 0).sum()) == 12
    x = np.ones((2, 4), np.float32)
    for flag in (True, False):
        w = then_w if flag else outer_w
        np.testing.assert_allclose(run(out, {"x": x, "cond": np.array(flag)})[0], x @ w, rtol=1e-6)


def test_subgraph_weights_go_to_the_external_data_file_too(tmp_path) -> None:
    src = save(if_model(16, 8), tmp_path / "if.onnx")  # 512-byte weights: big enough to go out
    out = tmp_path / "o.onnx"
    onnxprune.prune(src, 0.5, output=out, save=onnxprune.Save(external_data=True))
    header = onnx.load(str(out), load_external_data=False)
    branch = next(a.g for a in header.graph.node[0].attribute if a.name == "then_branch")
    for tensor in (header.graph.initializer[0], branch.initializer[0]):
        assert tensor.data_location == onnx.TensorProto.EXTERNAL
    proto = onnx.load(str(out))
    branch = next(a.g for a in proto.graph.node[0].attribute if a.name == "then_branch")
    then_w = onnx.numpy_helper.to_array(branch.initializer[0])
    outer_w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    assert int((then_w == 0).sum()) + int((outer_w == 0).sum()) == 128
    x = np.ones((2, 16), np.float32)
    for flag in (True, False):
        w = then_w if flag else outer_w
        np.testing.assert_allclose(run(out, {"x": x, "cond": np.array(flag)})[0], x @ w, rtol=1e-5)


def _scaled_mlp(scale: float, norm: bool) -> onnx.ModelProto:
    """Two Gemms whose weights differ in scale by `scale`; optionally a BatchNorm-like
    normalisation left after the first."""
    b = GraphBuilder(5)
    rng = np.random.default_rng(6)
    h = b.node(
        "Gemm",
        [b.input("x", ["N", 8]), b.weight((8, 8), array=rng.standard_normal((8, 8)).astype("f"))],
    )
    if norm:
        h = b.node("LayerNormalization", [h, b.weight((8,)), b.weight((8,))], axis=-1)
    w2 = (scale * rng.standard_normal((8, 4))).astype(np.float32)
    b.node("Gemm", [h, b.weight((8, 4), array=w2)], out="y")
    b.output("y")
    return b.model()


@pytest.mark.parametrize(
    ("scale", "norm", "expect"),
    [(1.0, False, None), (0.01, False, "scales differ by"), (1.0, True, "normalisation")],
)
def test_magnitude_warns_where_it_is_not_scale_free(tmp_path, scale, norm, expect) -> None:
    """Global magnitude without data says when layer scales make it unreliable."""
    model = onnxprune.load_model(save(_scaled_mlp(scale, norm), tmp_path / "m.onnx"))
    _, report = onnxprune.prune(model, 0.5)
    hazards = [w for w in report.warnings if "not scale-free" in w]
    if expect is None:
        assert not hazards
    else:
        assert len(hazards) == 1 and expect in hazards[0] and "--calibration" in hazards[0]
