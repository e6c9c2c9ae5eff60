"""Malformed models are refused before any work: one line naming the problem, exit 2, nothing
written, the input untouched; `inspect` alike. Acyclic models out of topological order (ONNX
Runtime runs them) are accepted and put in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, OPSET, GraphBuilder, initializers, mlp, run, save, small_cnn
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import ModelLoadError
from onnxprune.storage.io import load_model
from onnxprune.storage.wellformed import BITS, TYPED_FIELDS, check_tensor


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_refused(path: Path, message: str, *extra: str) -> None:
    """Prune and inspect both exit 2 with one line naming the problem; nothing changes on disk."""
    before = snapshot(path.parent)
    out = path.parent / "out.onnx"
    for args in ([path, "-s", "0.5", "-o", out, *extra], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"onnxprune: error: {path}: "), lines[0]
        assert message in lines[0], lines[0]
        assert "Traceback" not in result.output
        assert snapshot(path.parent) == before  # input unchanged, nothing left beside it


def refused(tmp_path: Path, model: onnx.ModelProto, message: str, *extra: str) -> None:
    assert_refused(save(model, tmp_path / "m.onnx"), message, *extra)


# -- the model header ------------------------------------------------------------------------


def test_ir_version_newer_than_onnx_knows(tmp_path) -> None:
    model = small_cnn()
    model.ir_version = 99
    refused(tmp_path, model, f"IR version 99 is newer than this onnx ({onnx.__version__}) knows")


def test_ir_version_older_than_opset_imports(tmp_path) -> None:
    model = small_cnn()
    model.ir_version = 2
    refused(tmp_path, model, "IR version 2 is older than any ONNX model with opset imports")


def test_opset_newer_than_onnx_knows(tmp_path) -> None:
    model = small_cnn()
    model.opset_import[0].version = 99
    refused(tmp_path, model, "opset 99 is newer than this onnx")


def test_opset_imported_twice(tmp_path) -> None:
    model = small_cnn()
    model.opset_import.append(helper.make_opsetid("ai.onnx", 13))
    refused(tmp_path, model, "opset of domain 'ai.onnx' is imported twice (versions 17 and 13)")


def test_unknown_operator_domain(tmp_path) -> None:
    model = small_cnn()
    model.graph.node[0].domain = "com.unknown"
    refused(tmp_path, model, "node 'Conv4' is in domain 'com.unknown', which the model imports no")


def test_default_domain_not_imported(tmp_path) -> None:
    model = small_cnn()
    model.opset_import[0].domain = "com.other"
    refused(tmp_path, model, "node 'Conv4' is in domain '', which the model imports no opset for")


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("Foo", "'Foo' is no operator of ONNX opset 17"),
        ("Gelu", "'Gelu' is no operator of ONNX opset 17"),  # introduced in opset 20
    ],
)
def test_unknown_operator_of_default_domain(tmp_path, op, message) -> None:
    model = small_cnn()
    model.graph.node[2].op_type = op
    refused(tmp_path, model, f"node 'Relu12': {message}")


def test_default_domain_spelled_ai_onnx_is_understood(tmp_path) -> None:
    model = mlp()
    model.graph.node[0].domain = "ai.onnx"
    path = save(model, tmp_path / "m.onnx")
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output


# -- what a node says about itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("few_inputs", "node 'Conv4': Conv takes 2 to 3 inputs, it has 1"),
        ("many_outputs", "node 'Relu12': Relu gives 1 to 1 outputs, it has 2"),
        ("empty_required", "node 'Conv4': input 1 (W) of Conv is required but empty"),
        ("unknown_attribute", "node 'Relu12': Relu has no attribute 'alpha'"),
        ("attribute_type", "node 'Conv4': attribute 'pads' of Conv must be INTS, it is STRING"),
        ("missing_attribute", "node 'Cast13': Cast needs the attribute 'to'"),
        ("attribute_twice", "node 'Conv4': attribute 'pads' is given twice"),
    ],
)
def test_node_against_its_schema(tmp_path, edit, message) -> None:
    model = small_cnn()
    conv, relu = model.graph.node[0], model.graph.node[2]
    if edit == "few_inputs":
        del conv.input[1:]
    elif edit == "many_outputs":
        relu.output.append("extra")
    elif edit == "empty_required":
        conv.input[1] = ""
    elif edit == "unknown_attribute":
        relu.attribute.append(helper.make_attribute("alpha", 0.5))
    elif edit == "attribute_type":
        conv.attribute[0].CopyFrom(helper.make_attribute("pads", "1111"))
    elif edit == "missing_attribute":
        model.graph.node.insert(3, helper.make_node("Cast", [relu.output[0]], ["c"], "Cast13"))
        model.graph.output.append(
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 8, 8, 8])
        )
    elif edit == "attribute_twice":
        conv.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
    refused(tmp_path, model, message)


def test_optional_input_left_empty_is_fine(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Conv", [x, b.weight((8, 3, 3, 3)), ""], pads=[1, 1, 1, 1])
    b.node("Clip", [h, "", b.weight((), array=np.float32(6.0))], out="y")
    b.output("y", shape=["N", 8, 8, 8])
    path = save(b.model(), tmp_path / "m.onnx")
    result = invoke(path, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output


# -- names: producers, duplicates, cycles ----------------------------------------------------


def test_node_reads_a_tensor_nothing_produces(tmp_path) -> None:
    model = small_cnn()
    model.graph.node[2].input[0] = "x7"
    refused(tmp_path, model, "node 'Relu12' reads 'x7', which no node, input or initializer")


def test_unnamed_node_is_named_by_position(tmp_path) -> None:
    model = small_cnn()
    model.graph.node[2].name = ""
    model.graph.node[2].input[0] = "x7"
    refused(tmp_path, model, "node #2 (Relu, unnamed) reads 'x7', which no node")


def test_graph_output_nothing_produces(tmp_path) -> None:
    model = small_cnn()
    model.graph.output[0].name = "nowhere"
    refused(tmp_path, model, "graph output 'nowhere' is produced by no node, input or initializer")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("node_output", "node 'BatchNormalization10' writes 'conv3', which is already defined"),
        ("over_input", "node 'Conv4' writes 'x', which is already defined"),
        ("over_initializer", "node 'Conv4' writes 'w1', which is already defined"),
        ("initializer", "initializer 'w1' is defined twice"),
        ("input", "graph input 'x' is declared twice"),
    ],
)
def test_names_are_assigned_once(tmp_path, edit, message) -> None:
    model = small_cnn()
    nodes = model.graph.node
    if edit == "node_output":
        nodes[1].output[0] = nodes[0].output[0]
    elif edit == "over_input":
        nodes[0].output[0] = "x"
    elif edit == "over_initializer":
        nodes[0].output[0] = "w1"
    elif edit == "initializer":
        model.graph.initializer.append(model.graph.initializer[0])
    elif edit == "input":
        model.graph.input.append(model.graph.input[0])
    refused(tmp_path, model, message)


def test_cycle(tmp_path) -> None:
    model = small_cnn()
    nodes = model.graph.node
    nodes[0].input[0] = nodes[2].output[0]  # Conv reads the Relu after it
    refused(
        tmp_path,
        model,
        "the nodes form a cycle: 'Conv4' -> 'BatchNormalization10' -> 'Relu12' -> 'Conv4'",
    )


def test_node_reading_its_own_output_is_a_cycle(tmp_path) -> None:
    model = small_cnn()
    relu = model.graph.node[2]
    relu.input[0] = relu.output[0]
    refused(tmp_path, model, "the nodes form a cycle: 'Relu12' -> 'Relu12'")


def reversed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("structured", [False, True])
def test_out_of_order_acyclic_is_accepted_and_sorted(tmp_path, structured) -> None:
    """ONNX Runtime runs nodes in any acyclic order, so onnxprune does too; the output is in
    order (the checker passes it) and pruned exactly like the ordered model."""
    extra = ["--structured"] if structured else []
    ordered = save(small_cnn(), tmp_path / "a.onnx")
    shuffled = save(reversed_nodes(small_cnn()), tmp_path / "b.onnx")
    assert run(shuffled, {"x": np.ones((1, 3, 8, 8), np.float32)})  # ORT runs it as it is
    for path in (ordered, shuffled):
        result = invoke(path, "-s", "0.5", "-o", path.with_suffix(".out.onnx"), *extra)
        assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "b.out.onnx"), full_check=True)
    a, b = initializers(tmp_path / "a.out.onnx"), initializers(tmp_path / "b.out.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# -- subgraphs -------------------------------------------------------------------------------


def if_model(then_reads: str = "h", producer_after_if: bool = False) -> onnx.ModelProto:
    """x -> Relu -> h; If(cond) gives MatMul(h, W) from either branch, reading the outer scope."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])

    def branch(name: str, reads: str) -> onnx.GraphProto:
        node = helper.make_node("MatMul", [reads, "W"], ["b"], name=f"{name}_mm")
        return helper.make_graph([node], name, [], [out])

    relu = helper.make_node("Relu", ["x"], ["h"], name="relu")
    if_node = helper.make_node(
        "If",
        ["cond"],
        ["y"],
        name="if",
        then_branch=branch("then", then_reads),
        else_branch=branch("else", "h"),
    )
    graph = helper.make_graph(
        [if_node, relu] if producer_after_if else [relu, if_node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


@pytest.mark.parametrize("producer_after_if", [False, True])
def test_subgraphs_read_the_outer_scope(tmp_path, producer_after_if) -> None:
    path = save(if_model(producer_after_if=producer_after_if), tmp_path / "m.onnx")
    result = invoke(path, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    feeds = {"x": np.ones((2, 4), np.float32), "cond": np.array(True)}
    assert run(tmp_path / "o.onnx", feeds)[0].shape == (2, 4)


def test_subgraph_reads_a_tensor_nothing_produces(tmp_path) -> None:
    refused(
        tmp_path,
        if_model(then_reads="ghost"),
        "node 'then_mm' in the 'then_branch' body of node 'if' reads 'ghost', which no node",
    )


def test_cycle_through_a_subgraph(tmp_path) -> None:
    model = if_model()
    model.graph.node[0].input[0] = "y"  # h = Relu(y), and the If's branches read h
    refused(tmp_path, model, "the nodes form a cycle: 'relu' -> 'if' -> 'relu'")


def test_malformed_tensor_in_a_subgraph(tmp_path) -> None:
    model = if_model()
    branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    branch.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "short"))
    branch.initializer[0].raw_data = b"\0" * 8
    refused(
        tmp_path,
        model,
        "initializer 'short' (in the 'then_branch' body of node 'if') holds 8 bytes of raw_data",
    )


# -- tensors ---------------------------------------------------------------------------------


def short_raw(model: onnx.ModelProto, index: int, cut: int = 4) -> onnx.ModelProto:
    tensor = model.graph.initializer[index]
    tensor.raw_data = tensor.raw_data[:-cut]
    return model


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("raw_short", "initializer 'w1' holds 860 bytes of raw_data, its dims [8, 3, 3, 3] and "),
        ("raw_long", "initializer 'w2' holds 36 bytes of raw_data, its dims [8] and type FLOAT"),
        ("float_short", "initializer 'w1' holds 213 entries of float_data, its dims [8, 3, 3, 3]"),
        ("negative", "initializer 'w1' has a negative dimension (dims [-8, 3, 3, 3])"),
        ("overflow", "initializer 'w1' claims dims [4294967296, 4294967296, 3, 3]: "),
        ("dtype_0", "initializer 'w1' has no data type (data_type 0)"),
        ("dtype_99", "initializer 'w1' has data_type 99, which is no ONNX data type"),
        ("no_values", "initializer 'w1' holds no values; its dims [8, 3, 3, 3] need 216"),
        ("two_fields", "initializer 'w1' stores its values twice, in raw_data and float_data"),
        ("wrong_field", "initializer 'w1' is FLOAT but stores its values in int64_data"),
        ("segment", "initializer 'w1' is stored in segments"),
        ("strings_raw", "initializer 'w1' holds strings in raw_data"),
    ],
)
def test_initializer_storage(tmp_path, edit, message) -> None:
    model = small_cnn()
    w = model.graph.initializer[0]
    if edit == "raw_short":
        short_raw(model, 0)
    elif edit == "raw_long":
        model.graph.initializer[1].raw_data += b"\0" * 4
    elif edit == "float_short":
        values = numpy_helper.to_array(w).ravel()
        w.ClearField("raw_data")
        w.float_data.extend(values[:-3])
    elif edit == "negative":
        w.dims[0] = -8
    elif edit == "overflow":
        w.dims[:2] = [2**32, 2**32]  # the product wraps to 0 in int64
    elif edit == "dtype_0":
        w.data_type = 0
    elif edit == "dtype_99":
        w.data_type = 99
    elif edit == "no_values":
        w.ClearField("raw_data")
    elif edit == "two_fields":
        w.float_data.extend([1.0])
    elif edit == "wrong_field":
        w.ClearField("raw_data")
        w.int64_data.extend(range(216))
    elif edit == "segment":
        w.segment.begin = 0
    elif edit == "strings_raw":
        w.data_type = TensorProto.STRING
    refused(tmp_path, model, message)


def test_big_payload_mapped_in_place_is_checked_too(tmp_path) -> None:
    """Payloads of 1 KiB and more are never parsed: their length comes from the file layout."""
    model = short_raw(mlp(dims=(16, 64, 8)), 0)
    refused(tmp_path, model, "initializer 'w1' holds 4092 bytes of raw_data, its dims [16, 64]")


def test_constant_node_value_is_checked(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    w = b.constant(np.ones((4, 4), np.float32), name="wc")
    b.node("MatMul", [x, w], out="y")
    b.output("y", shape=["N", 4])
    model = b.model()
    model.graph.node[0].attribute[0].t.raw_data = b"\0" * 60
    refused(
        tmp_path,
        model,
        "tensor 'wc' ('value' of node #0 (Constant, unnamed)) holds 60 bytes of raw_data",
    )


def test_sparse_constants_are_refused(tmp_path) -> None:
    """Sparse initializers are read (test_sparse.py); a Constant's sparse value is not."""
    values = numpy_helper.from_array(np.ones(2, np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "sp_i")
    model = mlp()
    model.graph.node.insert(
        0,
        helper.make_node(
            "Constant",
            [],
            ["c"],
            name="c",
            sparse_value=helper.make_sparse_tensor(values, indices, [16]),
        ),
    )
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [16]))
    refused(tmp_path, model, "node 'c' holds a sparse tensor ('sparse_value')")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100", "has 100 bytes of external data, its dims [16, 32] and type FLOAT need 2048"),
        ("-5", "has external data length '-5', not a byte count"),
    ],
)
def test_external_data_length_must_match_dims(tmp_path, value, message) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    for entry in entries:
        if entry.key == "length":
            entry.value = value
    onnx.save(model, str(path))
    assert_refused(path, f"initializer 'w1' {message}")


@pytest.mark.parametrize("dtype", [*sorted(BITS), TensorProto.STRING])
def test_storage_lengths_follow_the_packing_rules(dtype) -> None:
    """Every data type, in its typed field and in raw_data (sub-byte types packed), as onnx's
    own helpers write it, is accepted; one entry or byte less is refused."""
    for dims in ([5], [2, 3], [0], []):
        count = int(np.prod(dims))
        if dtype == TensorProto.STRING:
            tensors = [helper.make_tensor("t", dtype, dims, [b"a"] * count)]
        else:
            np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
            typed = helper.make_tensor("t", dtype, dims, np.ones(count, np_dtype), raw=False)
            raw = numpy_helper.from_array(np.ones(dims, np_dtype), "t")
            raw.data_type = dtype  # from_array maps some types to their storage type
            tensors = [typed, raw]
        for tensor in tensors:
            assert check_tensor(tensor, "t") is None
            if not count:
                continue
            short = onnx.TensorProto()
            short.CopyFrom(tensor)
            if short.HasField("raw_data"):
                short.raw_data = short.raw_data[:-1]
            else:
                field = next(f for f in TYPED_FIELDS if len(getattr(short, f)))
                del getattr(short, field)[-1]
            assert check_tensor(short, "t") is not None


# -- load_model, the API and real processes --------------------------------------------------


def test_load_model_raises_model_load_error(tmp_path) -> None:
    model = small_cnn()
    model.graph.node[2].input[0] = "x7"
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match="reads 'x7'"):
        load_model(path)


@pytest.mark.parametrize("case", ["ir_version", "cycle", "raw_short"])
def test_real_process_prints_one_line_no_traceback(tmp_path, case) -> None:
    model = small_cnn()
    if case == "ir_version":
        model.ir_version = 99
    elif case == "cycle":
        model.graph.node[0].input[0] = model.graph.node[2].output[0]
    else:
        short_raw(model, 0)
    path = save(model, tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    for args in ([path, "-s", "0.5", "-o", tmp_path / "o.onnx"], ["inspect", path]):
        done = subprocess.run(
            [sys.executable, "-m", "onnxprune", *map(str, args)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"onnxprune: error: {path}: ")
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert snapshot(tmp_path) == before


# -- zero-size weights -----------------------------------------------------------------------


def zero_size_cnn() -> onnx.ModelProto:
    """Two prunable Convs, then one whose weight has no output channels (shape 0x8x3x3)."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Relu", [b.node("Conv", [x, b.weight((8, 3, 3, 3))], pads=[1, 1, 1, 1])])
    h = b.node("Relu", [b.node("Conv", [h, b.weight((8, 8, 3, 3))], pads=[1, 1, 1, 1])])
    b.node("Conv", [h, b.weight((0, 8, 3, 3), name="empty")], out="y", pads=[1, 1, 1, 1])
    b.output("y", shape=["N", 0, 8, 8])
    return b.model()


@pytest.mark.parametrize("structured", [False, True])
def test_zero_size_weight_is_skipped_with_a_reason(tmp_path, structured) -> None:
    path = save(zero_size_cnn(), tmp_path / "m.onnx")
    extra = ["--structured"] if structured else []
    result = invoke(path, "-s", "0.3", "-o", tmp_path / "o.onnx", *extra)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    inspected = invoke("inspect", path, *extra)
    assert inspected.exit_code == 0, inspected.output
    if structured:
        assert "its weight 'empty' holds no elements (shape (0, 8, 3, 3))" in inspected.stdout
    else:
        assert "skipped empty: it holds no weights (shape (0, 8, 3, 3))" in inspected.stdout
        assert "skipped empty: it holds no weights" in result.output


# -- crashes the property test (test_corrupt_models.py) found, one test each ----------------


def test_name_that_is_not_utf8(tmp_path) -> None:
    """protobuf hands out bytes for a string field that is not UTF-8 (a flipped byte)."""
    model = small_cnn()
    model.graph.node[1].input[0] = "MARKER"
    raw = model.SerializeToString().replace(b"MARKER", b"MARK\xff\xfe")
    path = tmp_path / "m.onnx"
    path.write_bytes(raw)
    assert_refused(path, "model.graph.node[1].input[0] is not UTF-8 text: the file is damaged")


def test_external_location_that_is_not_utf8(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="MARK.dat", size_threshold=0)
    path.write_bytes(path.read_bytes().replace(b"MARK.dat", b"MA\xffK.dat"))
    assert_refused(path, "external_data[0].value is not UTF-8 text")


@pytest.mark.parametrize(
    ("data_type", "message"),
    [(0, "has no data type (data_type 0)"), (99, "has data_type 99, which is no ONNX data type")],
)
def test_no_data_type_on_a_payload_mapped_in_place(tmp_path, data_type, message) -> None:
    """wire.py reads a big initializer's header to map its payload: an unknown type left it
    raising TypeError before the load could name the problem."""
    model = mlp(dims=(16, 64, 8))
    model.graph.initializer[0].data_type = data_type
    refused(tmp_path, model, f"initializer 'w1' {message}")


def test_ir_version_3_needs_initializers_among_inputs(tmp_path) -> None:
    model = mlp()
    model.ir_version = 3
    refused(tmp_path, model, "initializer 'w1' is no graph input, which IR version 3 requires")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("no_name", "graph output #0 does not pass onnx.checker: Field 'name' of 'value_info' "),
        ("no_shape", "graph output 'y' does not pass onnx.checker: Field 'shape' of 'type' is"),
        ("negative", "graph input 'x' is declared with a negative dimension (-3)"),
        ("huge", "graph input 'x' is declared with dims ['N', 9223372036854775807, 8, 8]: more"),
        ("clash", "tensor 'x' is declared FLOAT [None, 10] as graph output but FLOAT [None, 3"),
    ],
)
def test_declared_inputs_and_outputs(tmp_path, edit, message) -> None:
    model = small_cnn()
    x, y = model.graph.input[0], model.graph.output[0]
    if edit == "no_name":
        y.name = ""
    elif edit == "no_shape":
        y.type.tensor_type.ClearField("shape")
    elif edit == "negative":
        x.type.tensor_type.shape.dim[1].dim_value = -3
    elif edit == "huge":
        x.type.tensor_type.shape.dim[1].dim_value = 2**63 - 1
    elif edit == "clash":
        y.name = "x"  # the model's output is now its input, declared [N, 10]
    refused(tmp_path, model, message)


def test_ops_given_inputs_they_cannot_take(tmp_path) -> None:
    """A Conv reading a matrix: ONNX shape inference refuses it before any work."""
    model = small_cnn()
    model.graph.node[0].input[0] = model.graph.initializer[-2].name  # the Gemm's 10x128 weight
    refused(
        tmp_path,
        model,
        "node 'Conv4' (Conv): Input tensor must have at least 3 dimensions (ONNX shape inference)",
    )


def test_absurd_declared_channels_are_frozen_not_allocated(tmp_path) -> None:
    """x declared with 2**40 channels against a Conv of 3: no id array of that size is made;
    the Conv's channels are frozen with the reason (and with nothing else removable, the model
    is refused, saying so)."""
    model = small_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40
    path = save(model, tmp_path / "m.onnx")
    result = invoke("inspect", path, "--structured")
    assert result.exit_code == 2, result.output
    assert "an axis of 1099511627776 channels is more than onnxprune tracks" in result.output


def test_what_onnx_checker_refuses_is_refused_before_the_work(tmp_path) -> None:
    """The rest of onnx.checker's rules (the output is checked by them) apply to the input."""
    model = small_cnn()
    model.graph.name = ""
    refused(tmp_path, model, "onnx.checker refuses it: Field 'name' of 'graph' is required to be")


def test_external_data_in_a_subgraph_is_accepted(tmp_path) -> None:
    """Checked by strict inference instead of the checker, which would look for the data file
    from the working folder."""
    model = if_model()
    branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    branch.initializer.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "Wt"))
    branch.node[0].input[1] = "Wt"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    then = next(a.g for a in proto.graph.node[1].attribute if a.name == "then_branch")
    assert then.initializer[0].data_location == TensorProto.EXTERNAL
    result = invoke(path, "-s", "0.5", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    feeds = {"x": np.ones((2, 4), np.float32), "cond": np.array(True)}
    assert run(tmp_path / "o.onnx", feeds)[0].shape == (2, 4)


def test_valid_external_data_model_is_accepted(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    for args in ([path, "-s", "0.5", "-o", tmp_path / "o.onnx"], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output


def test_attribute_without_a_type(tmp_path) -> None:
    """A type protobuf does not know (a flipped byte) reads as UNDEFINED: a closed enum."""
    model = small_cnn()
    raw = bytearray(model.SerializeToString())
    pads = model.graph.node[0].attribute[0]
    assert pads.name == "pads" and pads.type == onnx.AttributeProto.INTS
    field = bytes([0xA0, 0x01, pads.type])  # AttributeProto.type is field 20, a varint
    at = raw.index(field, raw.index(b"pads"))
    raw[at + 2] = 99
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(raw))
    assert_refused(path, "node 'Conv4': attribute 'pads' of Conv must be INTS, it is UNDEFINED")


def test_unknown_element_type_of_an_external_tensor_is_one_line(tmp_path) -> None:
    """Found by the slow property test: onnx.checker's C++ side raised a plain ValueError
    ("Invalid tensor data type 29") for a graph input it made from an external tensor."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].data_type = 29
    path.write_bytes(proto.SerializeToString())
    result = CliRunner().invoke(main, [str(path), "-s", "0.5", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx"]


def _located(tmp_path: Path, location: str) -> Path:
    """An MLP whose data file is m.data, every tensor's location rewritten to `location`."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("sub/../m.data", "does not open: a folder it names on the way"),
        ("m.data\0x", "has a location with a NUL byte"),
        ("m.data/", "ends with a separator"),
    ],
    ids=["missing-folder-dotdot", "nul", "trailing-slash"],
)
def test_external_locations_that_do_not_open_are_one_line(tmp_path, location, message) -> None:
    """Found by a hostile campaign: these passed the load's check (realpath settles `sub/..` on
    paper, a NUL raised ValueError in it) and failed later as internal errors (exit 3)."""
    path = _located(tmp_path, location)
    before = snapshot(tmp_path)
    for args in ([path, "-s", "0.5", "-o", tmp_path / "o.onnx"], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.output
        assert snapshot(tmp_path) == before
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_a_hard_linked_data_file_is_one_line(tmp_path) -> None:
    """onnx and onnx-ir refuse a data file with several names (a hard-link attack can bring a
    file from elsewhere in): refused at the load in one line (it was an internal error when
    onnx-ir read a small tensor of it)."""
    path = _located(tmp_path, "m.data")
    os.link(tmp_path / "m.data", tmp_path / "second name")
    before = snapshot(tmp_path)
    for args in ([path, "-s", "0.5", "-o", tmp_path / "o.onnx"], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "has 2 names (hard links); refused" in lines[0], lines
        assert snapshot(tmp_path) == before


def test_dotdot_through_a_folder_that_exists_just_works(tmp_path) -> None:
    """`sub/../m.data` opens where `sub` is a folder: ONNX Runtime and the checker read it too."""
    path = _located(tmp_path, "sub/../m.data")
    (tmp_path / "sub").mkdir()
    result = invoke(path, "-s", "0.5", "-o", tmp_path / "o.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert run(tmp_path / "o.onnx", {"x": np.ones((2, 16), np.float32)})[0].shape == (2, 8)


def label_table_model() -> onnx.ModelProto:
    """A classifier that also looks its class up in a STRING initializer (a label table)."""
    b = GraphBuilder(0)
    x = b.input("x", ["N", 16])
    h = b.node("Relu", [b.node("MatMul", [x, b.weight((16, 32))])])
    y = b.node("MatMul", [h, b.weight((32, 8))], out="y")
    labels = np.array([f"class {i}" for i in range(8)], dtype=object)
    b.initializers.append(numpy_helper.from_array(labels, "labels"))
    top = b.node("ArgMax", [y], axis=1, keepdims=0)
    b.node("Gather", ["labels", top], out="label")
    b.output("y", shape=["N", 8])
    b.output("label", TensorProto.STRING, ["N"])
    return b.model()


@pytest.mark.parametrize(
    "extra", [[], ["--external-data"], ["--sparse-storage"], ["--data"]], ids=str
)
def test_a_string_initializer_beside_the_weights_prunes_normally(tmp_path, extra) -> None:
    """The label table is left as it is; the weights are pruned, saved, checked and run (it
    was an internal error: onnx-ir has no bit width for STRING)."""
    src = save(label_table_model(), tmp_path / "m.onnx")
    before = src.read_bytes()
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    if extra == ["--data"]:
        np.savez(tmp_path / "d.npz", x=x)
        extra = ["--data", tmp_path / "d.npz"]
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    result = invoke(src, "-s", "0.5", "-o", out, "-q", "--report", report, *extra)
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before
    assert json.loads(report.read_text())["zeros_after"] == 8 * 32 // 2 + 16 * 32 // 2
    text = [s.decode() if isinstance(s, bytes) else s for s in initializers(out)["labels"]]
    assert text == [f"class {i}" for i in range(8)]
    if "--sparse-storage" not in extra:  # onnx.checker takes int64 sparse indices only
        onnx.checker.check_model(str(out), full_check=True)
    y, label = run(out, {"x": x})
    assert [s.decode() if isinstance(s, bytes) else s for s in label] == [
        f"class {i}" for i in y.argmax(axis=1)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxprune-")]
    assert invoke("inspect", src).exit_code == 0
