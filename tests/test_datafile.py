"""The external data writer: aligned layout, block stream, O_DIRECT and its fallback, errors."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import initializers, mlp

import onnxprune
from onnxprune.storage import datafile
from onnxprune.storage.datafile import BlockWriter


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of two device blocks, so a few kilobytes already cross block boundaries."""
    monkeypatch.setattr(datafile, "BLOCK_BYTES", 2 * datafile.DIRECT_ALIGN)


def stream(path, pieces, direct: bool) -> BlockWriter:
    with BlockWriter(path, direct=direct) as writer:
        for piece in pieces:
            if isinstance(piece, int):
                writer.pad_to(piece)
            else:
                writer.write(piece)
    return writer


@pytest.mark.parametrize("direct", [False, True])
def test_block_stream_writes_exactly_the_bytes_given(tmp_path, small_blocks, direct) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 5000, dtype=np.uint8)
    b = rng.standard_normal(3001).astype(np.float16)  # an odd byte count, not block-aligned
    c = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    writer = stream(tmp_path / "d", [a, 6000, b, 20480, c, b"x"], direct)
    expected = a.tobytes() + bytes(1000) + b.tobytes()
    expected += bytes(20480 - len(expected)) + c + b"x"
    assert (tmp_path / "d").read_bytes() == expected  # exact length: the padded tail is cut
    if direct and hasattr(os, "O_DIRECT"):
        assert writer.direct  # tmp_path is on a filesystem that does direct I/O here


def test_direct_io_refused_falls_back_to_buffered(tmp_path, small_blocks, monkeypatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    data = np.arange(10000, dtype=np.uint16)
    writer = stream(tmp_path / "d", [data], direct=True)
    assert not writer.direct
    assert (tmp_path / "d").read_bytes() == data.tobytes()


def test_blocks_the_device_refuses_direct_are_written_buffered(tmp_path, small_blocks, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_pwrite = os.pwrite

    def picky(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    data = np.arange(10000, dtype=np.uint16)
    writer = stream(tmp_path / "d", [data], direct=True)
    assert not writer.direct
    assert (tmp_path / "d").read_bytes() == data.tobytes()


def test_a_failed_background_write_is_raised(tmp_path, small_blocks, monkeypatch) -> None:
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datafile, "_write_all", full)
    writer = BlockWriter(tmp_path / "d", direct=False)
    with pytest.raises(OSError, match="No space"), writer:
        for _ in range(10):  # the error of block 1 surfaces when its slot comes round again
            writer.write(bytes(datafile.BLOCK_BYTES))
    assert writer._fd == -1


def test_layout_aligns_big_tensors_and_packs_small_ones() -> None:
    def value(n: int) -> ir.Value:
        return ir.Value(name=f"v{n}", const_value=ir.Tensor(np.zeros(n, dtype=np.uint8)))

    big = datafile.ALIGN_THRESHOLD + 1
    placements = datafile.layout([value(300), value(big), value(1000), value(big)])
    offsets = [p.offset for p in placements]
    assert offsets[0] == 0
    assert offsets[1] % datafile.ALIGNMENT == 0 and offsets[1] >= 300
    assert offsets[2] == offsets[1] + big + (-big % datafile.PACK_ALIGNMENT)
    assert offsets[3] % datafile.ALIGNMENT == 0 and offsets[3] >= offsets[2] + 1000


@pytest.mark.parametrize("direct", [False, True])
def test_pruned_external_model_is_the_same_written_either_way(tmp_path, monkeypatch, direct):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(dims=(16, 300, 1000)), str(src), save_as_external_data=True, size_threshold=0)
    onnxprune.prune(src, 0.6, output=tmp_path / "reference.onnx")
    monkeypatch.setattr(datafile, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(datafile, "DIRECT_MIN_BYTES", 0 if direct else 1 << 62)
    onnxprune.prune(src, 0.6, output=tmp_path / "o.onnx")
    a, b = initializers(tmp_path / "reference.onnx"), initializers(tmp_path / "o.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()
    header = onnx.load(str(tmp_path / "o.onnx"), load_external_data=False)
    stored = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stored and all(t.external_data[0].value == "o.onnx.data" for t in stored)
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
