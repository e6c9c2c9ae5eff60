"""Loading and saving: bad files, external data (kept, checked, attacked), atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import PATHS, GraphBuilder, initializers, mlp, run, save, small_cnn, threshold_path

import onnxprune
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.options import Selection
from onnxprune.storage import datafile
from onnxprune.storage.datafile import ALIGNMENT
from onnxprune.storage.io import load_model


def external_model(tmp_path: Path, location: str = "m.onnx.data", big: bool = False) -> Path:
    dims = (16, 300, 1000) if big else (16, 32, 8)
    model = mlp(dims=dims)
    path = tmp_path / "m.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_external_data_is_kept_and_aligned(tmp_path) -> None:
    src = external_model(tmp_path, big=True)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    _, report = onnxprune.prune(src, 0.5, output=out)
    assert (out.parent / "p.onnx.data").is_file()
    proto = onnx.load(str(out), load_external_data=False)
    offsets = {}
    for t in proto.graph.initializer:
        assert t.data_location == onnx.TensorProto.EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "p.onnx.data"
        offsets[t.name] = int(info.get("offset", 0))
    big = next(layer.weight.name for layer in report.plan.layers if layer.size == 300 * 1000)
    assert offsets[big] % ALIGNMENT == 0
    w = initializers(out)
    assert sum(int((w[layer.weight.name] == 0).sum()) for layer in report.plan.layers) == (
        report.plan.pruned
    )
    feeds = {"x": np.ones((2, 16), np.float32)}
    assert run(out, feeds)[0].shape == (2, 1000)
    assert report.size_after == out.stat().st_size + (out.parent / "p.onnx.data").stat().st_size


@pytest.mark.parametrize("path", PATHS)
def test_external_and_in_memory_paths_give_identical_weights(tmp_path, path) -> None:
    """Same bytes from inline and external weights, whichever way the threshold is found."""
    inline = save(mlp(dims=(16, 64, 8)), tmp_path / "inline.onnx")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(
        mlp(dims=(16, 64, 8)),
        str(ext_dir / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    onnxprune.prune(inline, Selection(0.7, min_keep="0.1"), output=tmp_path / "a.onnx")
    with threshold_path(path):
        onnxprune.prune(
            ext_dir / "m.onnx", Selection(0.7, min_keep="0.1"), output=tmp_path / "b.onnx"
        )
    a, b = initializers(tmp_path / "a.onnx"), initializers(tmp_path / "b.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()


@pytest.mark.parametrize("path", ["radix", "window"])
def test_external_data_in_many_files_is_read_and_written_to_one(tmp_path, path) -> None:
    inline = save(mlp(dims=(16, 64, 32, 8)), tmp_path / "inline.onnx")
    many = tmp_path / "many"
    many.mkdir()
    onnx.save(
        mlp(dims=(16, 64, 32, 8)),
        str(many / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,  # one file per tensor, named after it
        size_threshold=0,
    )
    assert len(list(many.iterdir())) > 4
    onnxprune.prune(inline, 0.6, output=tmp_path / "a.onnx")
    (tmp_path / "out").mkdir()
    with threshold_path(path):
        onnxprune.prune(many / "m.onnx", 0.6, output=tmp_path / "out" / "b.onnx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.onnx", "b.onnx.data"]
    a, b = initializers(tmp_path / "a.onnx"), initializers(tmp_path / "out" / "b.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()


def test_external_data_forced_for_small_model(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    onnxprune.prune(src, 0.5, output=tmp_path / "o.onnx", save=onnxprune.Save(external_data=True))
    assert (tmp_path / "o.onnx.data").is_file()
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_external_data_outside_folder_is_refused(tmp_path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    model = mlp()
    onnx.save(
        model,
        str(tmp_path / "secret.onnx"),
        save_as_external_data=True,
        location="secret.data",
        size_threshold=0,
    )
    proto = onnx.load(str(tmp_path / "secret.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(proto, str(inner / "m.onnx"))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(inner / "m.onnx")


def test_missing_and_truncated_external_data(tmp_path) -> None:
    src = external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    content = data.read_bytes()
    data.write_bytes(content[: len(content) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(src)
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(src)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an ONNX model"),
        (b"hello, I am a text file\n", "not an ONNX model"),
        (None, "not an ONNX model, or a truncated one"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_not_onnx(tmp_path, content, message) -> None:
    path = tmp_path / "bad.onnx"
    if content is None:
        whole = small_cnn().SerializeToString()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_output_rules(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    with pytest.raises(OutputError, match="is the input"):
        onnxprune.prune(src, 0.5, output=src, force=True)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--force"):
        onnxprune.prune(src, 0.5, output=out)
    assert out.read_bytes() == b"keep me"
    onnxprune.prune(src, 0.5, output=out, force=True)
    onnx.checker.check_model(str(out))
    with pytest.raises(OutputError, match="does not exist"):
        onnxprune.prune(src, 0.5, output=tmp_path / "no" / "such" / "dir.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_output_folder_not_writable(tmp_path) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            onnxprune.prune(src, 0.5, output=locked / "o.onnx")
    finally:
        locked.chmod(0o700)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    src = save(small_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    calls = {"n": 0}
    real = ir.serde.serialize_tensor_into

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ir.serde, "serialize_tensor_into", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        onnxprune.prune(src, 0.5, output=out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_interrupted_external_save_leaves_previous_output(tmp_path, monkeypatch) -> None:
    src = external_model(tmp_path)
    out = tmp_path / "o.onnx"
    onnxprune.prune(src, 0.5, output=out)
    before = (out.read_bytes(), (tmp_path / "o.onnx.data").read_bytes())

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datafile, "_write_all", crash)  # the disk fills up mid-write
    with pytest.raises(OutputError, match="No space left"):
        onnxprune.prune(src, 0.9, output=out, force=True)
    assert (out.read_bytes(), (tmp_path / "o.onnx.data").read_bytes()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nothing_to_prune(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    b.node("Relu", [x], out="y")
    b.output("y")
    src = save(b.model(), tmp_path / "m.onnx")
    with pytest.raises(onnxprune.OnnxPruneError, match="no prunable weights"):
        onnxprune.prune(src, 0.5, output=tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_tensors_stored_as_typed_fields_load_too(tmp_path) -> None:
    """Not every exporter writes raw_data; float_data tensors stay in the parsed message."""
    model = mlp(dims=(16, 64, 8))
    for t in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        t.ClearField("raw_data")
        t.float_data.extend(arr.ravel().tolist())
    src = save(model, tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    _, report = onnxprune.prune(src, 0.5, output=out)
    w = initializers(out)
    assert sum(int((w[layer.weight.name] == 0).sum()) for layer in report.plan.layers) == (
        report.plan.pruned
    )
    np.testing.assert_array_equal(run(out, {"x": np.zeros((1, 16), np.float32)})[0].shape, (1, 8))


def test_weights_are_memory_mapped_not_copied(tmp_path) -> None:
    src = save(mlp(dims=(16, 64, 8)), tmp_path / "m.onnx")
    model = load_model(src)
    arr = next(iter(model.graph.initializers.values())).const_value.numpy()
    assert not arr.flags.owndata and not arr.flags.writeable  # a read-only view of the file


def test_language_model_shapes_with_tied_embedding_fp16(tmp_path) -> None:
    """[in, out] MatMul weights pruned; the embedding shared with the output head left alone."""
    b = GraphBuilder()
    ids = b.input("ids", [1, 4], onnx.TensorProto.INT64)
    emb = b.weight((50, 16), name="embed", dtype=np.float16)
    h = b.node("Gather", [emb, ids])
    h = b.node("MatMul", [h, b.weight((16, 32), name="up", dtype=np.float16)])
    h = b.node("Relu", [h])
    h = b.node("MatMul", [h, b.weight((32, 16), name="down", dtype=np.float16)])
    t = b.node("Transpose", [emb], perm=[1, 0])
    b.node("MatMul", [h, t], out="logits")
    b.output("logits", onnx.TensorProto.FLOAT16)
    src = tmp_path / "lm.onnx"
    onnx.save(b.model(), str(src), save_as_external_data=True, location="lm.data", size_threshold=0)
    out = tmp_path / "lm.pruned.onnx"
    _, report = onnxprune.prune(src, 0.5, output=out)
    assert [layer.weight.name for layer in report.plan.layers] == ["up", "down"]
    assert report.skipped[0][0] == "embed" and "Gather" in report.skipped[0][1]
    assert report.plan.keys == np.uint16  # one exact pass for an all-float16 model
    before, after = initializers(src), initializers(out)
    np.testing.assert_array_equal(after["embed"], before["embed"])
    assert int((after["up"] == 0).sum()) + int((after["down"] == 0).sum()) == 512
    assert run(out, {"ids": np.array([[1, 2, 3, 4]], np.int64)})[0].shape == (1, 4, 50)


def test_tensors_too_big_for_one_protobuf_go_external(tmp_path, monkeypatch) -> None:
    import onnxprune.storage.io as io_module

    monkeypatch.setattr(io_module, "PROTO_LIMIT_BYTES", 1000)
    src = save(mlp(dims=(16, 64, 8)), tmp_path / "m.onnx")
    onnxprune.prune(src, 0.5, output=tmp_path / "o.onnx")
    assert (tmp_path / "o.onnx.data").is_file()
    assert (tmp_path / "o.onnx").stat().st_size < 2000
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_inspect_statistics_stream_external_weights_exactly(tmp_path, monkeypatch) -> None:
    """inspect summarises each layer chunk by chunk: the same numbers as the whole array."""
    import onnxprune.core.tensors as weights_module

    src = external_model(tmp_path, big=True)
    monkeypatch.setattr(weights_module, "CHUNK", 1000)  # many chunks per layer
    _, stats = onnxprune.inspect(src)
    for weight, s in stats:
        m = np.abs(weight.numpy().astype(np.float64)).reshape(-1)
        assert (s.size, s.zeros, s.min, s.max) == (m.size, int((m == 0).sum()), m.min(), m.max())
        assert s.mean == pytest.approx(m.mean(), rel=1e-12)
        assert s.std == pytest.approx(m.std(), rel=1e-9)
