"""The command line: prune --validate, validate, sweep; gate and data-error exit codes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from builders import GraphBuilder, save, small_cnn
from click.testing import CliRunner

from onnxprune import runtime
from onnxprune.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    return save(small_cnn(), tmp_path / "model.onnx")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "val.npz"
    np.savez(
        path, x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32), labels=np.arange(12) % 10
    )
    return path


def test_prune_validate_adds_table_and_report(model, data, tmp_path) -> None:
    rep = tmp_path / "r.json"
    result = invoke(
        model, "-s", "0.5", "--validate", "--data", data, "--device", "cpu", "--report", rep
    )
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.stdout and "gzip size" in result.stdout
    assert "12 samples from" in result.stdout
    v = json.loads(rep.read_text())["validation"]
    assert v["provider"] == "CPUExecutionProvider" and v["samples"] == 12
    assert v["candidate"]["path"].endswith("model.pruned.onnx")
    assert 0 <= v["top1_agreement"] <= 1 and v["reference"]["accuracy"] is not None


def test_data_implies_validate(model, data) -> None:
    result = invoke(model, "-s", "0.5", "--data", data, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.stdout


def test_gate_pass_and_fail_exit_codes(model, data, tmp_path) -> None:
    ok = invoke(model, "-s", "0.1", "--device", "cpu", "--min-cosine", "0.5", "-q")
    assert ok.exit_code == 0, ok.output
    rep = tmp_path / "r.json"
    bad = invoke(
        model,
        "-s",
        "0.95",
        "--force",
        "--data",
        data,
        "--device",
        "cpu",
        "--report",
        rep,
        "--min-cosine",
        "0.9999",
        "--min-agreement",
        "1",
    )
    assert bad.exit_code == 1, bad.output
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("onnxprune: error: validation failed: ")
    assert "--min-cosine 0.9999" in errors[0]
    assert "validation" in json.loads(rep.read_text())  # the numbers are kept for CI logs
    assert model.with_name("model.pruned.onnx").is_file()


def test_validate_command(model, data, tmp_path) -> None:
    rep = tmp_path / "v.json"
    result = invoke(
        "validate",
        model,
        model,
        "--data",
        data,
        "--device",
        "cpu",
        "--report",
        rep,
        "--max-accuracy-drop",
        "0",
        "--min-agreement",
        "1",
        "--min-cosine",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(rep.read_text())["top1_agreement"] == 1.0


def test_validate_without_data_uses_generated_inputs(model, caplog) -> None:
    # notices go to the "onnxprune" logger (stderr in a real run; caplog here)
    result = invoke("validate", model, model, "--device", "cpu", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "generated (seed 7)" in result.stdout
    assert "input 'x': symbolic batch dimension N set to 1" in caplog.messages


def test_validate_accuracy_gate_fails(tmp_path) -> None:
    def linear(w):
        b = GraphBuilder()
        x = b.input("x", ["N", 2])
        b.node("MatMul", [x, b.weight((2, 2), array=np.asarray(w, np.float32))], out="y")
        b.output("y", shape=["N", 2])
        return b.model()

    a = save(linear([[1, 0], [0, 1]]), tmp_path / "a.onnx")
    b = save(linear([[0, 1], [1, 0]]), tmp_path / "b.onnx")  # swaps the classes
    path = tmp_path / "d.npz"
    np.savez(path, x=np.eye(2, dtype=np.float32), labels=np.array([0, 1]))
    result = invoke(
        "validate", a, b, "--data", path, "--device", "cpu", "--max-accuracy-drop", "0.01"
    )
    assert result.exit_code == 1
    assert "accuracy dropped by 1.0000 (1.0000 -> 0.0000)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{wrong}"], "array 'x' is float64, model input 'x' expects float32"),
        (["--data", "{short}"], "'labels' has 3 entries but the inputs have 4 samples"),
        (["--data", "{missing}"], "no such file"),
        (["--input-shape", "x"], "--input-shape 'x': write NAME=DIMS"),
        (["--max-accuracy-drop", "0.01"], "--max-accuracy-drop needs labels"),
        (["--batch-size", "0", "--data", "{short}"], "--batch-size 0: must be at least 1"),
    ],
)
def test_data_errors_exit_2(model, tmp_path, args, message) -> None:
    files = {
        "wrong": tmp_path / "wrong.npz",
        "short": tmp_path / "short.npz",
        "missing": tmp_path / "missing.npz",
    }
    np.savez(files["wrong"], x=np.zeros((4, 3, 8, 8)))
    np.savez(files["short"], x=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    args = [a.format(**files) for a in args]
    result = invoke("validate", model, model, "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) >= 1
    assert "Traceback" not in result.output


def test_device_cuda_fails_clearly_without_cuda(model) -> None:
    problem = runtime.cuda_problem()
    if problem is None:
        pytest.skip("CUDA works here; the failure path needs a machine without it")
    result = invoke("validate", model, model, "--device", "cuda")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"onnxprune: error: --device cuda: {problem}; use --device auto or cpu"
    )


def test_auto_says_why_it_runs_on_cpu(model, caplog) -> None:
    problem = runtime.cuda_problem()
    if problem is None:
        pytest.skip("CUDA works here")
    result = invoke("validate", model, model)
    assert result.exit_code == 0, result.output
    assert [m for m in caplog.messages if "CPU" in m] == [f"running on CPU: {problem}"]


@pytest.mark.gpu
def test_cli_on_cuda(model, data) -> None:
    problem = runtime.cuda_problem()
    if problem:
        print(f"skipping: {problem}")
        pytest.skip(f"CUDA not usable: {problem}")
    result = invoke("validate", model, model, "--data", data, "--device", "cuda")
    assert result.exit_code == 0, result.output
    assert "CUDAExecutionProvider" in result.stdout


def test_sweep_command(model, data, tmp_path) -> None:
    md, rep = tmp_path / "s.md", tmp_path / "s.json"
    result = invoke(
        "sweep",
        model,
        "--data",
        data,
        "--sparsities",
        "0.5,0.9",
        "--device",
        "cpu",
        "--min-keep",
        "0.05",
        "--markdown",
        md,
        "--report",
        rep,
    )
    assert result.exit_code == 0, result.output
    assert "global+min-keep 0.05" in result.stdout and "uniform" in result.stdout
    assert md.read_text().startswith("| sparsity | global | global+min-keep 0.05 | uniform |")
    rows = json.loads(rep.read_text())["rows"]
    assert len(rows) == 6 and {r["sparsity"] for r in rows} == {0.5, 0.9}


def test_sweep_command_structured(model, data, tmp_path) -> None:
    rep = tmp_path / "s.json"
    args = ["sweep", model, "--data", data, "--sparsities", "0.3", "--device", "cpu"]
    result = invoke(*args, "--structured", "--round-to", "2", "--min-keep", "0", "--report", rep)
    assert result.exit_code == 0, result.output
    assert "structured" in result.stdout and "uniform" not in result.stdout
    report = json.loads(rep.read_text())
    assert report["structured"] and len(report["rows"]) == 1
    assert report["rows"][0]["latency_ms"] > 0


def test_sweep_plot(model, data, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    result = invoke(
        "sweep", model, "--data", data, "--sparsities", "0.5", "--device", "cpu", "--plot", png
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_without_matplotlib(model, data, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = invoke("sweep", model, "--data", data, "--device", "cpu", "--plot", tmp_path / "p.png")
    assert result.exit_code == 2
    assert "--plot needs matplotlib: pip install 'onnxprune[plot]'" in result.stderr
    assert "samples from" not in result.stdout  # failed before the sweep ran
