"""Sensitivity analysis: each layer pruned alone, its numbers checked against numpy, the table and
report, one-line errors, and prune --sensitivity keeping more of the fragile layer at the exact
target sparsity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, run, save
from click.testing import CliRunner
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import InvalidArgumentError
from onnxprune.validate.sensitivity import protected_keep

SPARSITIES = (0.2, 0.5, 0.8)
TINY = 52  # of the fragile layer's 256 weights: pruning 20% of it removes only these


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fragile_model() -> onnx.ModelProto:
    """x -> identity MatMul (a fixed transform, skipped) -> Gemm 'fragile' -> Relu -> Gemm
    'robust' -> y. fragile: 52 tiny weights, the rest about 1 (pruning half of it breaks the
    model); robust: 55% tiny, the rest about 10 (pruning half of it removes only tiny ones).
    Global magnitude ranking at 0.5 takes fragile's unit weights before robust's large ones."""
    rng = np.random.default_rng(0)
    fragile = np.sign(rng.standard_normal(256)) * rng.uniform(0.8, 1.2, 256)
    fragile[rng.permutation(256)[:TINY]] = rng.uniform(1e-4, 1e-3, TINY)
    robust = np.sign(rng.standard_normal(512)) * rng.uniform(8, 12, 512)
    small = rng.permutation(512)[:282]
    robust[small] = rng.uniform(1e-4, 1e-3, small.size)
    b = GraphBuilder()
    x = b.input("x", ["N", 16])
    h = b.node("MatMul", [x, b.weight((16, 16), name="eye", array=np.eye(16, dtype=np.float32))])
    h = b.node(
        "Gemm",
        [h, b.weight((16, 16), name="fragile", array=fragile.reshape(16, 16).astype(np.float32))],
        transB=1,
    )
    h = b.node("Relu", [h])
    b.node(
        "Gemm",
        [h, b.weight((32, 16), name="robust", array=robust.reshape(32, 16).astype(np.float32))],
        out="y",
        transB=1,
    )
    b.output("y", shape=["N", 32])
    return b.model()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    x = np.random.default_rng(1).standard_normal((24, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    return {"model": save(_fragile_model(), tmp_path / "m.onnx"), "data": tmp_path / "val.npz"}


def _alone(model: onnx.ModelProto, name: str, sparsity: float) -> onnx.ModelProto:
    """The model with only `name`'s smallest-magnitude round(s x size) weights zeroed (numpy)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    for tensor in pruned.graph.initializer:
        if tensor.name == name:
            w = numpy_helper.to_array(tensor).copy()
            order = np.argsort(np.abs(w).ravel(), kind="stable")[: round(sparsity * w.size)]
            w.ravel()[order] = 0
            tensor.CopyFrom(numpy_helper.from_array(w, name))
    return pruned


def test_numbers_are_those_of_the_layer_zeroed_in_numpy(files) -> None:
    model = _fragile_model()
    x = dict(np.load(files["data"]))
    dense = run(model, x)[0].astype(np.float64)
    result = onnxprune.sensitivity(files["model"], SPARSITIES, data=str(files["data"]))
    assert [layer.name for layer in result.layers] == ["fragile", "robust"]  # graph order
    assert [layer.params for layer in result.layers] == [256, 512]
    assert result.sparsities == list(SPARSITIES) and result.samples == 24
    for layer in result.layers:
        for point in layer.points:
            out = run(_alone(model, layer.name, point.sparsity), x)[0].astype(np.float64)
            rel = np.linalg.norm(out - dense) / np.linalg.norm(dense)
            cosine = float(out.ravel() @ dense.ravel()) / (
                np.linalg.norm(out) * np.linalg.norm(dense)
            )
            agreement = float(np.mean(out.argmax(1) == dense.argmax(1)))
            assert point.rel_error == pytest.approx(rel, rel=1e-5, abs=1e-7)
            assert point.min_cosine == pytest.approx(min(cosine, 1.0), abs=1e-7)
            assert point.agreement == pytest.approx(agreement)
            assert point.achieved == round(point.sparsity * layer.params) / layer.params
    fragile, robust = result.layers
    assert fragile.error(0.2) < 0.01 and fragile.error(0.5) > 0.1  # breaks past its tiny weights
    assert robust.error(0.5) < 0.01
    assert result.most_sensitive()[0] == "fragile"
    # the model on disk and in memory are left as they were
    assert onnx.load(str(files["model"])).SerializeToString() == model.SerializeToString()


def test_fixed_transform_is_listed_as_skipped(files) -> None:
    result = onnxprune.sensitivity(files["model"], [0.5], data=str(files["data"]))
    assert "eye" not in [layer.name for layer in result.layers]
    reasons = dict(result.skipped)
    assert "fixed transform" in reasons["eye"] and "identity" in reasons["eye"]
    assert result.to_dict()["skipped"] == [{"name": "eye", "reason": reasons["eye"]}]


def test_table_and_report_refusing_to_overwrite(files, tmp_path) -> None:
    report = tmp_path / "sens.json"
    args = ["sensitivity", files["model"], "--data", files["data"], "--sparsities", "0.2,0.5,0.8"]
    result = invoke(*args, "--report", report)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["layer", "op", "params", "cos@0.2", "err@0.2"]
    assert "top-1@0.8" in lines[0] and lines[0].endswith("most sensitive")
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    data = json.loads(report.read_text())
    for layer in data["layers"]:  # the table shows the report's numbers, rounded
        row = rows[layer["name"]]
        assert row[1] == "Gemm"
        for i, point in enumerate(layer["points"]):
            assert float(row[3 + 3 * i]) == pytest.approx(point["min_cosine"], abs=5e-5)
            assert float(row[4 + 3 * i]) == pytest.approx(point["rel_error"], abs=5e-5)
    assert rows["fragile"][-1] == "#1" and rows["robust"][-1] == "#2"
    assert "most sensitive (err at 0.8): fragile, robust" in result.stdout
    assert "skipped eye: an identity matrix" in result.stdout
    assert data["most_sensitive"] == ["fragile", "robust"]
    assert data["sparsities"] == [0.2, 0.5, 0.8] and data["samples"] == 24
    again = invoke(*args, "--report", report)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert "pass --force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert invoke(*args, "--report", report, "--force").exit_code == 0


def test_calibration_samples_work_as_data(files) -> None:
    by_data = invoke("sensitivity", files["model"], "--data", files["data"])
    by_calibration = invoke("sensitivity", files["model"], "--calibration", files["data"])
    assert by_data.exit_code == 0 and by_calibration.exit_code == 0, by_calibration.output
    assert by_data.stdout == by_calibration.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsities", "0.5,1.5"], "each must be in [0, 1)"),
        (["--sparsities", "half"], "give comma-separated numbers"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--data", "DATA", "--calibration", "DATA"], "give one of them"),
        (["--input-shape", "x"], "--input-shape 'x': write NAME=DIMS"),
        (["--data", "missing.npz"], "missing.npz"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(files, extra, message) -> None:
    extra = [files["data"] if a == "DATA" else a for a in extra]
    result = invoke("sensitivity", files["model"], *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_prune_with_sensitivity_keeps_more_of_the_fragile_layer(files, tmp_path) -> None:
    sens = tmp_path / "sens.json"
    measured = invoke(
        "sensitivity", files["model"], "--data", files["data"], "--sparsities", "0.2,0.5,0.8",
        "--report", sens,
    )  # fmt: skip
    assert measured.exit_code == 0, measured.output
    reports = {}
    for name, extra in (("plain", []), ("protected", ["--sensitivity", sens])):
        out, rep = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        result = invoke(files["model"], "-s", "0.5", "-o", out, "--report", rep, *extra)
        assert result.exit_code == 0, result.output
        reports[name] = (json.loads(rep.read_text()), result.stdout)
    plain, protected = reports["plain"][0], reports["protected"][0]
    for data in (plain, protected):  # the target is met exactly either way
        assert data["prunable_weights"] == 768 and data["zeros_after"] == 384
        assert data["achieved_sparsity"] == 0.5
    kept = {
        d: {layer["name"]: layer["kept"] for layer in r[0]["layers"]} for d, r in reports.items()
    }
    assert kept["plain"]["fragile"] == 256 - TINY - 50  # global ranking cuts into its unit weights
    # pruned alone, fragile broke at 0.5 but not at 0.2: it keeps at least 80%
    assert protected["sensitivity_keep"] == {"fragile": pytest.approx(0.8)}
    layers = {layer["name"]: layer for layer in protected["layers"]}
    assert layers["fragile"]["min_keep"] == math.ceil(0.8 * 256) == kept["protected"]["fragile"]
    assert layers["robust"]["min_keep"] == 0
    line = "sensitivity: 1 layer(s) whose output error, pruned alone to 0.5, exceeds the "
    assert f"{line}tolerance keep at least: fragile 80.00%" in reports["protected"][1]
    assert "sensitivity_keep" not in plain
    # a tolerance the fragile layer meets protects nothing
    loose = tmp_path / "loose.json"
    result = invoke(
        files["model"], "-s", "0.5", "-o", tmp_path / "l.onnx", "--report", loose,
        "--sensitivity", sens, "--sensitivity-tolerance", "10",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(loose.read_text())["layers"] == plain["layers"]


def test_prune_with_sensitivity_that_cannot_reach_the_target(files, tmp_path) -> None:
    sens = tmp_path / "sens.json"
    assert invoke(
        "sensitivity", files["model"], "--data", files["data"], "--sparsities", "0.2,0.5",
        "--report", sens,
    ).exit_code == 0  # fmt: skip
    result = invoke(files["model"], "-s", "0.9", "-o", tmp_path / "o.onnx", "--sensitivity", sens)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("onnxprune: error: --sensitivity")
    # fragile keeps 205 and robust is measured within tolerance: 563 of 768 prunable
    assert "563 of 768" in line and "0.7330" in line and "--sensitivity-tolerance" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sensitivity-tolerance", "0.1"], "--sensitivity-tolerance needs --sensitivity"),
        (["--sensitivity", "SENS", "--structured"], "with --structured, give --min-keep"),
        (["--sensitivity", "SENS", "--pattern", "2:4"], "an N:M --pattern"),
        (["--sensitivity", "SENS", "--sensitivity-tolerance", "-1"], "at least 0"),
        (["--sensitivity", "nothing.json"], "--sensitivity nothing.json: no such file"),
        (["--sensitivity", "DATA"], "not a JSON report of `onnxprune sensitivity`"),
        (["--sensitivity", "OTHER"], "measured on another model"),
    ],
)
def test_prune_sensitivity_errors(files, tmp_path, extra, message) -> None:
    sens = tmp_path / "sens.json"
    other = tmp_path / "other.json"
    point = {"sparsity": 0.5, "rel_error": 0.5}
    other.write_text(json.dumps({"layers": [{"name": "conv9", "points": [point]}]}))
    sens.write_text(json.dumps({"layers": [{"name": "fragile", "points": [point]}]}))
    names = {"SENS": sens, "DATA": files["data"], "OTHER": other}
    extra = [names.get(a, a) for a in extra]
    if "--pattern" not in extra:
        extra = ["-s", "0.5", *extra]
    result = invoke(files["model"], "-o", tmp_path / "o.onnx", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_rule() -> None:
    layer = lambda *errors: [  # noqa: E731
        {"sparsity": s, "rel_error": e} for s, e in zip((0.2, 0.5, 0.8), errors, strict=True)
    ]
    measured = {
        "layers": [
            {"name": "steady", "points": layer(0.0, 0.01, 0.04)},
            {"name": "late", "points": layer(0.0, 0.01, 0.3)},
            {"name": "early", "points": layer(0.1, 0.2, 0.3)},
            {"name": "silent", "points": layer(None, None, None)},
        ]
    }
    # at a measured sparsity: its own error decides
    assert protected_keep(measured, 0.5) == {"steady": 0, "late": 0, "early": 1.0, "silent": 0}
    # between two: the error at the next one up decides; the keep is the last one within
    assert protected_keep(measured, 0.6) == {"steady": 0, "late": 0.5, "early": 1.0, "silent": 0}
    # above all: the highest measured decides
    assert protected_keep(measured, 0.9)["late"] == 0.5
    # below all: the lowest decides; nothing within tolerance below the target keeps all
    assert protected_keep(measured, 0.1)["early"] == 1.0
    assert protected_keep(measured, 0.6, tolerance=0.25) == {
        "steady": 0, "late": 0.5, "early": 0.5, "silent": 0,
    }  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="at least 0"):
        protected_keep(measured, 0.5, tolerance=float("nan"))


def test_a_model_without_prunable_weights_is_one_line(tmp_path) -> None:
    b = GraphBuilder()
    b.node("Relu", [b.input("x", ["N", 4])], out="y")
    b.output("y", shape=["N", 4])
    result = invoke("sensitivity", save(b.model(), tmp_path / "relu.onnx"))
    assert result.exit_code == 2 and "no prunable weights" in result.stderr, result.output
