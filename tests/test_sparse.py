"""Sparse storage: weights written as ONNX sparse initializers (COO) where that is smaller, read
back from models that hold them, refused in one line when malformed; ONNX Runtime gives the very
same outputs for both forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import IR_VERSION, OPSET, GraphBuilder, mlp, run, save, small_cnn
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.storage import io, sparse, writer


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(writer.TEMP_PREFIX)]


def feeds(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        shape = [d.dim_value or 3 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[value.name] = rng.standard_normal(shape).astype(dtype)
    return out


def same_outputs(a: Path, b: Path) -> bool:
    """ONNX Runtime gives bit-identical outputs for both models (on two input draws)."""
    for seed in (0, 1):
        x = feeds(a, seed)
        if not all(u.tobytes() == v.tobytes() for u, v in zip(run(a, x), run(b, x), strict=True)):
            return False
    return True


def header(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def index_types(path: Path) -> dict[str, str]:
    return {
        s.values.name: TensorProto.DataType.Name(s.indices.data_type)
        for s in header(path).graph.sparse_initializer
    }


def dense_arrays(path: Path) -> dict[str, bytes]:
    """Every main-graph initializer as dense bytes, whichever way it is stored."""
    model = io.load_model(path)
    return {
        name: value.const_value.numpy().tobytes()
        for name, value in model.graph.initializers.items()
    }


def with_zeros(model: onnx.ModelProto, share: float, seed: int = 0) -> onnx.ModelProto:
    """Every initializer of rank >= 2 with `share` of its elements set to zero."""
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if array.ndim >= 2:
            array.reshape(-1)[rng.random(array.size) < share] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def to_sparse(
    model: onnx.ModelProto,
    names: list[str] | None = None,
    index: type = np.int64,
    coords: bool = False,
) -> onnx.ModelProto:
    """The named initializers (default: every one of rank >= 2) as sparse initializers."""
    graph = model.graph
    keep = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if (names is None and array.ndim < 2) or (names is not None and tensor.name not in names):
            keep.append(tensor)
            continue
        flat = array.reshape(-1)
        where = np.flatnonzero(flat.view(f"u{flat.dtype.itemsize}"))
        positions = np.stack(np.unravel_index(where, array.shape), 1) if coords else where
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(
                numpy_helper.from_array(flat[where], tensor.name),
                numpy_helper.from_array(positions.astype(index)),
                list(array.shape),
            )
        )
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


# -- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_outputs_are_identical(tmp_path, dtype) -> None:
    src = save(mlp(dims=(64, 256, 128, 8), dtype=dtype), tmp_path / "m.onnx")
    dense, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    ok(src, "-s", "0.9", "-o", dense, "-q")
    report = tmp_path / "r.json"
    result = ok(src, "-s", "0.9", "-o", sparse_out, "--sparse-storage", "--report", report)
    assert not header(dense).graph.sparse_initializer
    stored = index_types(sparse_out)
    assert set(stored) == {"w1", "w9", "w17"}  # the three weights; biases stay dense
    assert same_outputs(dense, sparse_out)
    assert dense_arrays(dense) == dense_arrays(sparse_out)  # bit for bit, zeros included
    assert sparse_out.stat().st_size < dense.stat().st_size / 3
    line = next(x for x in result.output.splitlines() if x.startswith("sparse storage:"))
    assert "3 of 6 tensors as sparse initializers" in line
    summary = json.loads(report.read_text())["sparse_storage"]
    assert summary["tensors"] == 3 and summary["saved_bytes"] > 0
    # the saving the report states is exactly what the file lost against the dense one
    assert dense.stat().st_size - sparse_out.stat().st_size == summary["saved_bytes"]
    assert not temporaries(tmp_path)


def test_convolutions_round_trip(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    dense, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    ok(src, "-s", "0.8", "-o", dense, "-q")
    ok(src, "-s", "0.8", "-o", sparse_out, "--sparse-storage", "-q")
    assert header(sparse_out).graph.sparse_initializer
    assert same_outputs(dense, sparse_out)


def test_index_type_chosen_per_tensor(tmp_path) -> None:
    """int8 up to 128 elements, int16 up to 32768, int32 beyond: the smallest ONNX Runtime
    reads; ONNX Runtime runs all three to the same outputs."""
    src = save(mlp(dims=(8, 16, 2048, 24)), tmp_path / "m.onnx")
    dense, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    ok(src, "-s", "0.9", "-o", dense, "-q")
    ok(src, "-s", "0.9", "-o", sparse_out, "--sparse-storage", "-q")
    assert index_types(sparse_out) == {"w1": "INT8", "w9": "INT16", "w17": "INT32"}
    assert same_outputs(dense, sparse_out)


@pytest.mark.parametrize(
    ("count", "expected"),
    [(1, np.int8), (128, np.int8), (129, np.int16), (32768, np.int16), (32769, np.int32),
     (2**31, np.int32), (2**31 + 1, np.int64)],
)  # fmt: skip
def test_index_dtype(count, expected) -> None:
    assert sparse.index_dtype(count) == np.dtype(expected)
    assert sparse.index_dtype(count, "int64") == np.dtype(np.int64)


def test_int64_indices_pass_onnx_checker(tmp_path) -> None:
    """onnx.checker takes only int64 indices: `index="int64"` writes the form it accepts; the
    smallest types are what ONNX Runtime reads, and the checker refuses them."""
    src = save(mlp(dims=(8, 16, 2048, 24)), tmp_path / "m.onnx")
    model, _ = onnxprune.prune(src, 0.9)
    wide = io.save_model(model, tmp_path / "wide.onnx", sparse=sparse.plan(model, "int64"))
    narrow = io.save_model(model, tmp_path / "narrow.onnx", sparse=True, check=True)
    io.check_model_file(wide)
    assert set(index_types(wide).values()) == {"INT64"}
    onnx.checker.check_model(str(wide))
    with pytest.raises(onnx.checker.ValidationError, match="must have INT64 type"):
        onnx.checker.check_model(str(narrow))
    assert same_outputs(wide, narrow)
    assert narrow.stat().st_size < wide.stat().st_size


def _with_share(shape: tuple[int, ...], zeros: float, dtype=np.float32) -> ir.Tensor:
    array = np.random.default_rng(0).standard_normal(shape).astype(dtype) + 5  # no zeros
    array.reshape(-1)[: round(zeros * array.size)] = 0
    return ir.Tensor(array)


@pytest.mark.parametrize(
    ("shape", "dtype", "index", "dense_at", "sparse_at"),
    [
        ((256, 256), np.float32, np.int32, 0.40, 0.55),  # 8 bytes a value vs 4: even at 1/2
        ((256, 256), np.float16, np.int32, 0.60, 0.70),  # 6 vs 2: even at 2/3
        ((128, 128), np.float16, np.int16, 0.45, 0.55),  # 4 vs 2: even at 1/2
        ((8, 16), np.float32, np.int8, 0.15, 0.30),  # 5 vs 4: even at 1/5, plus headers
    ],
)
def test_break_even(shape, dtype, index, dense_at, sparse_at) -> None:
    assert sparse.decide(_with_share(shape, dense_at, dtype), "w") is None
    form = sparse.decide(_with_share(shape, sparse_at, dtype), "w")
    assert form is not None and form.index == np.dtype(index)
    assert form.nnz == round((1 - sparse_at) * math.prod(shape))
    assert form.sparse_bytes < form.dense_bytes


def test_tensor_at_40_percent_stays_dense_in_the_file(tmp_path) -> None:
    """One weight 40% zero (65,536 elements: int32 indices), one 90%: only the second goes."""
    model = mlp(dims=(256, 256, 256))
    rng = np.random.default_rng(1)
    for tensor, share in zip(model.graph.initializer[::2], (0.4, 0.9), strict=True):
        array = numpy_helper.to_array(tensor).copy()
        array.reshape(-1)[rng.permutation(array.size)[: round(share * array.size)]] = 0
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    src = save(model, tmp_path / "m.onnx")
    out = io.save_model(io.load_model(src), tmp_path / "o.onnx", sparse=True, check=True)
    assert list(index_types(out)) == ["w9"]
    assert {t.name for t in header(out).graph.initializer} == {"w1", "w4", "w12"}
    assert same_outputs(src, out)


def test_negative_zero_and_other_types_kept_bit_for_bit(tmp_path) -> None:
    """-0.0 is a value (ONNX Runtime fills in +0.0): it is stored, not dropped."""
    b = mlp(dims=(64, 64, 8))
    w = numpy_helper.to_array(b.graph.initializer[0]).copy()
    w.reshape(-1)[: 9 * w.size // 10] = 0.0
    w.reshape(-1)[1:100:2] = -0.0
    b.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    src = save(b, tmp_path / "m.onnx")
    out = io.save_model(io.load_model(src), tmp_path / "o.onnx", sparse=True, check=True)
    assert "w1" in index_types(out)
    assert dense_arrays(out)["w1"] == w.tobytes()
    assert same_outputs(src, out)


# -- reading ---------------------------------------------------------------------------------


def _zeroed(tmp_path: Path) -> tuple[onnx.ModelProto, Path]:
    model = with_zeros(mlp(dims=(64, 256, 128, 8)), 0.7)
    return model, save(model, tmp_path / "dense_in.onnx")


@pytest.mark.parametrize(
    ("index", "coords"),
    [(np.int64, False), (np.int32, False), (np.int16, False), (np.int64, True)],
)
def test_model_with_sparse_initializers(tmp_path, index, coords) -> None:
    """Read, inspected like any weight, pruned exactly as its dense twin, written sparse by
    default and dense with --dense-storage."""
    model, dense_in = _zeroed(tmp_path)
    src = save(to_sparse(model, index=index, coords=coords), tmp_path / "m.onnx")
    assert len(header(src).graph.sparse_initializer) == 3
    assert same_outputs(dense_in, src)  # ONNX Runtime reads the input as it is
    assert dense_arrays(src) == dense_arrays(dense_in)
    listed = ok("inspect", src).output
    assert all(f"\nw{i}" in listed for i in (1, 9, 17)), listed
    twin, kept, dense_out = (tmp_path / f"{n}.onnx" for n in ("twin", "kept", "dense"))
    ok(dense_in, "-s", "0.9", "-o", twin, "-q")
    result = ok(src, "-s", "0.9", "-o", kept)
    ok(src, "-s", "0.9", "-o", dense_out, "--dense-storage", "-q")
    assert "sparse storage: 3 of 6 tensors" in result.output
    assert set(index_types(kept)) == {"w1", "w9", "w17"}
    assert not header(dense_out).graph.sparse_initializer
    assert dense_arrays(kept) == dense_arrays(twin) == dense_arrays(dense_out)
    assert same_outputs(twin, kept) and same_outputs(twin, dense_out)
    assert not temporaries(tmp_path)


def _if_model(sparse_body: bool) -> onnx.ModelProto:
    """An If whose branches each hold their own weight; the then-branch's sparse if asked."""
    rng = np.random.default_rng(0)
    branches = []
    for name in ("then", "else"):
        w = rng.standard_normal((16, 32)).astype(np.float32)
        w.reshape(-1)[::2] = 0
        inits = [numpy_helper.from_array(w, f"w_{name}")]
        body = helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"])],
            name,
            [],
            [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 32])],
            inits,
        )
        if sparse_body and name == "then":
            body = to_sparse(helper.make_model(body), ["w_then"]).graph
        branches.append(body)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["h"], then_branch=branches[0], else_branch=branches[1]),
            helper.make_node("MatMul", ["h", "w_out"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.float32(0), "zero"),
            numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w_out"),
        ],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def test_sparse_initializers_in_subgraphs_are_read(tmp_path) -> None:
    dense_in = save(_if_model(False), tmp_path / "dense_in.onnx")
    src = save(_if_model(True), tmp_path / "m.onnx")
    assert "w_then" in ok("inspect", src).output
    twin, out = tmp_path / "twin.onnx", tmp_path / "out.onnx"
    ok(dense_in, "-s", "0.5", "-o", twin, "-q")
    ok(src, "-s", "0.5", "-o", out, "-q")  # written dense: only the main graph goes sparse
    for x in (np.ones((1, 16), np.float32), -np.ones((1, 16), np.float32)):
        assert run(twin, {"x": x})[0].tobytes() == run(out, {"x": x})[0].tobytes()


# -- malformed sparse initializers -----------------------------------------------------------


def _malformed(mutate) -> onnx.ModelProto:
    """An MLP whose first weight (16 x 32) is a sparse initializer of 256 values."""
    model = mlp(dims=(16, 32, 8))
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.reshape(-1)[::2] = 0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w1"))
    model = to_sparse(model, ["w1"])
    mutate(model.graph.sparse_initializer[0])
    return model


def _set_indices(sp: onnx.SparseTensorProto, values, dtype=np.int64, dims=None) -> None:
    sp.indices.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype)))
    if dims is not None:
        del sp.indices.dims[:]
        sp.indices.dims.extend(dims)


def _indices(sp: onnx.SparseTensorProto) -> np.ndarray:
    return numpy_helper.to_array(sp.indices).copy()


def _swap(sp):
    i = _indices(sp)
    i[[3, 4]] = i[[4, 3]]
    _set_indices(sp, i)


def _repeat(sp):
    i = _indices(sp)
    i[4] = i[3]
    _set_indices(sp, i)


def _out_of_range(sp):
    i = _indices(sp)
    i[-1] = 16 * 32
    _set_indices(sp, i)


def _negative(sp):
    i = _indices(sp)
    i[0] = -1
    _set_indices(sp, i)


def _short(sp):
    _set_indices(sp, _indices(sp)[:-1])


def _uint8(sp):
    sp.indices.CopyFrom(numpy_helper.from_array(np.arange(sp.values.dims[0], dtype=np.uint8)))


def _no_indices(sp):
    sp.ClearField("indices")


def _values_2d(sp):
    sp.values.dims.append(1)


def _zero_dim(sp):
    sp.dims[0] = 0


def _coordinate(sp):
    flat = _indices(sp)
    coords = np.stack(np.unravel_index(flat, (16, 32)), 1)
    coords[2, 1] = 32
    _set_indices(sp, coords)


def _truncated(sp):
    sp.values.raw_data = sp.values.raw_data[:-4]


MALFORMED = {
    "unsorted": (_swap, "has indices out of order at position 4"),
    "duplicate": (_repeat, "has indices repeated at position 4"),
    "out of range": (_out_of_range, "has index 512 at position 255, outside [0, 512)"),
    "negative": (_negative, "has index -1 at position 0, outside [0, 512)"),
    "length mismatch": (_short, "holds 256 values but indices of dims [255]"),
    "uint8 indices": (_uint8, "has UINT8 indices; ONNX Runtime reads INT8, INT16, INT32"),
    "no indices": (_no_indices, "holds 256 values but no indices"),
    "values not a list": (_values_2d, "has values of dims [256, 1]"),
    "empty axis": (_zero_dim, "has dims [0, 32]: a sparse tensor needs rank >= 1"),
    "coordinate": (_coordinate, "has coordinate 32 at [2, 1], outside [0, 32)"),
    "short values": (_truncated, "holds 1020 bytes of raw_data"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_sparse_initializers_are_refused(tmp_path, case) -> None:
    mutate, message = MALFORMED[case]
    path = save(_malformed(mutate), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    for args in ([path, "-s", "0.5", "-o", tmp_path / "out.onnx"], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"onnxprune: error: {path}: "), lines[0]
        assert message in lines[0], lines[0]
        assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_the_output_check_refuses_a_bad_sparse_initializer(tmp_path) -> None:
    path = save(_malformed(_swap), tmp_path / "m.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="out of order"):
        io.check_model_file(path)


def test_corrupted_sparse_models_exit_0_or_2(tmp_path) -> None:
    """Bytes flipped anywhere in a model holding sparse initializers: it works or is refused in
    one line, never a traceback."""
    good = to_sparse(with_zeros(mlp(dims=(16, 32, 8)), 0.5), index=np.int16).SerializeToString()
    rng = np.random.default_rng(0)
    for i in range(40):
        data = bytearray(good)
        for at in rng.integers(0, len(data), 1 + i % 3):
            data[at] = int(rng.integers(0, 256))
        path = tmp_path / f"c{i}.onnx"
        path.write_bytes(bytes(data))
        result = invoke(path, "-s", "0.5", "-o", tmp_path / f"o{i}.onnx", "-q")
        assert result.exit_code in (0, 2), (i, result.output)
        assert "Traceback" not in result.output


# -- external data, options, output safety -------------------------------------------------------


def test_external_data(tmp_path) -> None:
    """Values and indices go to the data file (tiny ones stay in the header); the layout and the
    form are both kept by the next run; the data file of a sparse input is an input."""
    src = save(mlp(dims=(64, 256, 128, 8)), tmp_path / "m.onnx")
    dense, out = tmp_path / "dense.onnx", tmp_path / "s.onnx"
    ok(src, "-s", "0.99", "-o", dense, "-q")
    ok(src, "-s", "0.99", "-o", out, "--sparse-storage", "--external-data", "-q")
    assert [p.name for p in io.model_files(out)] == ["s.onnx", "s.onnx.data"]
    entries = {s.values.name: s for s in header(out).graph.sparse_initializer}
    assert set(entries) == {"w1", "w9", "w17"}
    external = {n for n, s in entries.items() if s.values.data_location == TensorProto.EXTERNAL}
    assert external == {"w1", "w9"}  # w17: a few values, under 256 bytes with indices: inline
    assert all(entries[n].indices.data_location == TensorProto.EXTERNAL for n in external)
    assert same_outputs(dense, out)
    assert dense_arrays(dense) == dense_arrays(out)
    again = tmp_path / "again.onnx"
    ok(out, "-s", "0.995", "-o", again, "-q")
    assert [p.name for p in io.model_files(again)] == ["again.onnx", "again.onnx.data"]
    assert set(index_types(again)) == {"w1", "w9", "w17"}
    before = snapshot(tmp_path)
    result = invoke(out, "-s", "0.995", "-o", tmp_path / "s.onnx.data", "--force")
    assert result.exit_code == 2 and "a data file of the input model" in result.stderr
    assert snapshot(tmp_path) == before


def test_external_data_of_a_model_whose_only_weight_is_tiny_and_sparse(tmp_path) -> None:
    """The data file the layout keeps holds something the model reads, even when that is all
    sparse tensors small enough for the header."""
    b = GraphBuilder()
    b.node("MatMul", [b.input("x", ["N", 4]), b.weight((4, 8))], out="y")
    b.output("y", shape=["N", 8])
    src = save(b.model(), tmp_path / "m.onnx")
    dense, out = tmp_path / "dense.onnx", tmp_path / "o.onnx"
    ok(src, "-s", "0.9", "-o", dense, "-q")
    ok(src, "-s", "0.9", "-o", out, "--sparse-storage", "--external-data", "-q")
    assert [p.name for p in io.model_files(out)] == ["o.onnx", "o.onnx.data"]
    assert index_types(out) == {"w1": "INT8"}
    assert same_outputs(dense, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dense.onnx",
        "m.onnx",
        "o.onnx",
        "o.onnx.data",
    ]


def test_ir_version_before_6_cannot_hold_sparse_initializers(tmp_path) -> None:
    model = mlp(dims=(64, 256, 8))
    model.ir_version = 5
    src = save(model, tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    result = invoke(src, "-s", "0.9", "--sparse-storage")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "onnxprune: error: --sparse-storage: the model's IR version 5 has no sparse "
        "initializers (IR 6 added them); leave the option out, or re-export the model with a "
        "newer exporter"
    ]
    assert snapshot(tmp_path) == before
    ok(src, "-s", "0.9", "-q")


def test_output_safety_holds(tmp_path) -> None:
    src = save(mlp(dims=(64, 256, 8)), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    ok(src, "-s", "0.9", "-o", out, "--sparse-storage", "-q")
    before = snapshot(tmp_path)
    result = invoke(src, "-s", "0.95", "-o", out, "--sparse-storage")
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert snapshot(tmp_path) == before
    ok(src, "-s", "0.95", "-o", out, "--sparse-storage", "--force", "-q")
    assert snapshot(tmp_path)["o.onnx"] != before["o.onnx"]
    assert not temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]


@pytest.mark.parametrize("step", io.SAVE_STEPS)
def test_failure_at_every_step_leaves_nothing(tmp_path, monkeypatch, step) -> None:
    src = save(mlp(dims=(64, 256, 8)), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    ok(src, "-s", "0.5", "-o", out, "--sparse-storage", "--external-data", "-q")
    before = snapshot(tmp_path)

    def fail(at: str) -> None:
        if at == step:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_fault", fail)
    result = invoke(src, "-s", "0.9", "-o", out, "--force", "--sparse-storage", "--external-data")
    assert result.exit_code in (2, 3) and "Traceback" not in result.stderr
    assert not temporaries(tmp_path)
    if io.SAVE_STEPS.index(step) < io.SAVE_STEPS.index("committed"):
        assert snapshot(tmp_path) == before
    else:
        assert index_types(out) and run(out, feeds(out))
