"""Calibration and validation samples from a folder of .npz shards (read one at a time, samples
counted across them), from a dict of arrays, or from any iterable of input dicts or an
onnxruntime.quantization-style reader (`get_next()`): the same samples give the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import initializers, save, small_cnn
from click.testing import CliRunner

import onnxprune
from onnxprune import Calibration, Validation
from onnxprune.cli import main
from onnxprune.errors import DataError
from onnxprune.inputs import InputSpec, ShardedBatches, read_samples


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    return save(small_cnn(), tmp_path / "model.onnx")


@pytest.fixture
def samples():
    rng = np.random.default_rng(0)
    return rng.standard_normal((20, 3, 8, 8)).astype(np.float32)


def shard(folder, x, sizes, labels=None):
    folder.mkdir()
    start = 0
    for i, n in enumerate(sizes):
        extra = {} if labels is None else {"labels": labels[start : start + n]}
        np.savez(folder / f"part-{i:03d}.npz", x=x[start : start + n], **extra)
        start += n
    return folder


class Reader:
    """What onnxruntime.quantization's CalibrationDataReader subclasses look like."""

    def __init__(self, x):
        self.items = iter([{"x": x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def test_batches_span_shards_and_count_across_them(tmp_path, samples) -> None:
    folder = shard(tmp_path / "s", samples, [7, 6, 7])
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]
    inputs = read_samples(folder, spec, batch_size=8)
    assert isinstance(inputs.batches, ShardedBatches)
    assert inputs.samples == 20 and len(inputs.batches) == 3
    walked = list(inputs.batches)
    assert [len(b["x"]) for b in walked] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in walked]), samples)
    np.testing.assert_array_equal(inputs.batches[1]["x"], samples[8:16])
    limited = read_samples(folder, spec, batch_size=8, limit=10)
    assert limited.samples == 10 and [len(b["x"]) for b in limited.batches] == [8, 2]


def test_shards_that_disagree_are_refused(tmp_path, samples) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    np.savez(folder / "a.npz", x=samples[:5])
    np.savez(folder / "b.npz", x=samples[:5, :, :4])
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]
    with pytest.raises(DataError, match="per sample"):
        read_samples(folder, spec)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.npz files"):
        read_samples(empty, spec)


def test_every_source_calibrates_to_the_same_model(model, tmp_path, samples) -> None:
    np.savez(tmp_path / "calib.npz", x=samples)
    folder = shard(tmp_path / "shards", samples, [9, 11])
    sources = {
        "npz": tmp_path / "calib.npz",
        "shards": folder,
        "dict": {"x": samples},
        "list": [{"x": samples[i : i + 4]} for i in range(0, 20, 4)],
        "reader": Reader(samples),
    }
    written = {}
    for name, data in sources.items():
        out = tmp_path / f"{name}.onnx"
        _, report = onnxprune.prune(
            model, 0.5, calibration=Calibration(data, batch_size=6, device="cpu"), output=out
        )
        assert report.calibration.samples == 20, name
        written[name] = initializers(out)
    for name, weights in written.items():
        for key, value in weights.items():
            np.testing.assert_allclose(
                value, written["npz"][key], rtol=1e-5, atol=1e-6, err_msg=name
            )


def test_cli_takes_folders_for_calibration_and_data(model, tmp_path, samples) -> None:
    calib = shard(tmp_path / "calib", samples, [10, 10])
    labels = np.arange(20) % 10
    data = shard(tmp_path / "val", samples, [12, 8], labels=labels)
    report = tmp_path / "r.json"
    result = invoke(
        model, "-s", "0.5", "--calibration", calib, "--data", data, "--device", "cpu",
        "--report", report, "-o", tmp_path / "o.onnx",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads(report.read_text())
    assert info["calibration"]["samples"] == 20
    assert info["validation"]["samples"] == 20 and info["validation"]["labels"]


def test_validation_takes_an_iterable(model, tmp_path, samples) -> None:
    _, report = onnxprune.prune(
        model,
        0.5,
        output=tmp_path / "o.onnx",
        validation=Validation(data=[{"x": samples[:10]}, {"x": samples[10:]}], device="cpu"),
    )
    assert report.validation.samples == 20


def test_a_reader_that_gives_nothing_or_not_dicts_is_refused(model, tmp_path) -> None:
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]
    with pytest.raises(DataError, match="gave no samples"):
        read_samples(Reader(np.zeros((0, 3, 8, 8), np.float32)), spec)
    with pytest.raises(DataError, match="not a dict"):
        read_samples([np.zeros((1, 3, 8, 8), np.float32)], spec)
