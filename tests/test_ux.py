"""How the tool feels (issue 24): light start-up, progress on stderr, execution providers by name,
input names checked, a sweep that picks a sparsity within a budget, a nudge to validate, and no
noise (one CUDA note, none with --device cpu; no -0.00 pts)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tomllib
from builders import save, small_cnn
from click.testing import CliRunner

from onnxprune import Structured, runtime
from onnxprune.cli import main
from onnxprune.core import progress
from onnxprune.errors import InvalidArgumentError
from onnxprune.options import Device, parse_provider_options
from onnxprune.report.validation import points

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "onnx", "onnx_ir", "onnxruntime", "ml_dtypes", "sympy", "tqdm")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    return save(small_cnn(), tmp_path / "model.onnx")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "val.npz"
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=x, labels=np.arange(24) % 10)
    return path


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["-s", "2", "x.onnx"], ["sweep", "-h"]]
)
def test_help_and_argument_errors_import_nothing_heavy(args) -> None:
    script = (
        "import sys\n"
        "from onnxprune.launch import main\n"
        f"sys.argv = ['onnxprune', *{args!r}]\n"
        "import atexit, os\n"
        "heavy = " + repr(HEAVY) + "\n"
        "import onnxprune.launch as launch\n"
        "def leave(code):\n"
        "    loaded = sorted(m for m in heavy if m in sys.modules)\n"
        "    sys.stderr.write(f'HEAVY={loaded}\\n'); sys.stderr.flush(); os._exit(0)\n"
        "launch._exit = leave\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "HEAVY=[]" in done.stderr, done.stderr


def test_plain_progress_lines_when_not_a_terminal(model, data, monkeypatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    result = invoke(
        model, "-s", "0.5", "--calibration", data, "--batch-size", "4", "--device", "cpu",
        "--force",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [x for x in result.stderr.splitlines() if "calibrating on 24 samples:" in x]
    assert any("%" in x and "ETA" in x for x in lines), result.stderr
    quiet = invoke(
        model, "-s", "0.5", "--calibration", data, "--batch-size", "4", "--device", "cpu",
        "--force", "-q",
    )  # fmt: skip
    assert quiet.exit_code == 0 and "%" not in quiet.stderr


def test_a_bar_on_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "PROGRESS_AFTER_S", 0.0)
    logger = logging.getLogger("onnxprune")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        with progress.step("measuring", total=4) as meter:
            for _ in range(4):
                meter.advance()
            meter.grow(2)
            meter.advance(2)
    finally:
        logger.setLevel(before)
    err = capsys.readouterr().err
    assert "measuring" in err and "%|" in err


def test_sweep_steps_say_their_row(model, data) -> None:
    with progress.labelled("sparsegpt+calibration at 0.8"):
        assert progress.titled("calibrating") == "sparsegpt+calibration at 0.8: calibrating"
    assert progress.titled("calibrating") == "calibrating"


def test_unknown_provider_is_one_line_naming_the_available(model, data) -> None:
    result = invoke(model, "-s", "0.5", "--data", data, "--provider", "NoSuchThing", "--force")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--provider NoSuchThing" in line and "CPU" in line and "available" in line


def test_cpu_provider_by_name_runs_validation(model, data, tmp_path) -> None:
    report = tmp_path / "r.json"
    result = invoke(
        model, "-s", "0.5", "--data", data, "--provider", "cpu", "--report", report, "--force"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["validation"]["provider"] == "CPUExecutionProvider"


def test_provider_settings_are_checked() -> None:
    assert parse_provider_options(["trt_fp16_enable=1", "CUDA:device_id=0"], ["TensorRT"]) == {
        "TensorRT": {"trt_fp16_enable": "1"},
        "CUDA": {"device_id": "0"},
    }
    with pytest.raises(InvalidArgumentError, match="KEY=VALUE"):
        parse_provider_options(["novalue"], ["CPU"])
    with pytest.raises(InvalidArgumentError, match="exclude each other"):
        Device("cuda", ("CPU",))
    with pytest.raises(InvalidArgumentError, match="not among the --provider"):
        Device(providers=("CPU",), options={"TensorRT": {"a": "1"}})
    chosen = runtime.select_runtime(Device(providers=("cpu",), options={"CPU": {"a": "b"}}))
    assert chosen.providers == (runtime.CPU,) and chosen.options == ({"a": "b"},)


@pytest.mark.skipif(
    "TensorrtExecutionProvider" not in ort.get_available_providers(),
    reason="this ONNX Runtime has no TensorRT provider",
)
def test_a_provider_that_cannot_start_is_refused(model, data) -> None:
    result = invoke(model, "-s", "0.5", "--data", data, "--provider", "TensorRT", "--force")
    if result.exit_code == 0:
        pytest.skip("TensorRT runs here")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--provider Tensorrt: ONNX Runtime could not start it" in line


def test_input_shapes_must_name_inputs(model, tmp_path) -> None:
    result = invoke(model, "--structured", "-s", "0.3", "--input-shape", "nosuch=1x3x8x8")
    assert result.exit_code == 2
    assert "no such input (inputs: x)" in result.stderr
    import onnxprune

    with pytest.raises(InvalidArgumentError, match="inputs: x"):
        onnxprune.prune(model, 0.3, structured=Structured(input_shapes={"nosuch": (1, 3, 8, 8)}))


def test_pruning_without_data_says_so_once(model) -> None:
    result = invoke(model, "-s", "0.95", "--force")
    assert result.exit_code == 0
    assert result.stderr.count("nothing was validated") == 1
    assert "onnxprune validate" in result.stderr
    quiet = invoke(model, "-s", "0.95", "--force", "-q")
    assert "nothing was validated" not in quiet.stderr


def test_cuda_note_once_and_never_with_cpu(model, data, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cuda_problem", lambda: "no GPU here")
    result = invoke(model, "-s", "0.5", "--calibration", data, "--data", data, "--force")
    assert result.exit_code == 0, result.output
    assert result.output.count("no GPU here") == 1

    def probed() -> str:
        raise AssertionError("--device cpu must not probe CUDA")

    monkeypatch.setattr(runtime, "cuda_problem", probed)
    cpu = invoke(
        model, "-s", "0.5", "--calibration", data, "--data", data, "--device", "cpu", "--force"
    )
    assert cpu.exit_code == 0, cpu.output


def test_no_minus_zero_points_and_relative_error_explained(model, data) -> None:
    assert points(-0.0) == "+0.00 pts" and points(-1e-9) == "+0.00 pts"
    result = invoke(model, "-s", "0.0", "--data", data, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert "-0.00" not in result.stdout and "max rel err" not in result.stdout
    assert "relative err = ||candidate - reference||" in result.stdout


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert any(d.startswith("tqdm") for d in project["dependencies"])


def test_sweep_picks_the_highest_sparsity_within_the_budget(model, data, tmp_path) -> None:
    out, report = tmp_path / "best.onnx", tmp_path / "best.json"
    result = invoke(
        "sweep", model, "--data", data, "--min-cosine", "0.99", "--sparsities", "0.2,0.5,0.8",
        "--min-keep", "0", "--device", "cpu", "--bisections", "3", "-o", out, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file()
    info = json.loads(report.read_text())
    path = info["search"]["path"]
    chosen = info["search"]["chosen"]
    inside = [row["sparsity"] for row in path if row["within"]]
    outside = [row["sparsity"] for row in path if not row["within"]]
    assert chosen == max(inside) and (not outside or chosen < min(outside))
    assert info["target_sparsity"] == chosen
    assert info["validation"]["min_cosine"] >= 0.99
    assert len(path) > 3 or not outside  # bisection tried points off the grid
    assert f"picked sparsity {chosen:g}" in result.stdout


def test_sweep_that_picks_nothing_writes_nothing(model, data, tmp_path) -> None:
    out = tmp_path / "none.onnx"
    result = invoke(
        "sweep", model, "--data", data, "--min-cosine", "1", "--sparsities", "0.5",
        "--min-keep", "0", "--device", "cpu", "--bisections", "1", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 1
    assert not out.exists()
    lonely = invoke("sweep", model, "--data", data, "-o", out)
    assert lonely.exit_code == 2 and "budget" in lonely.stderr


def test_two_four_runs_say_how_to_ask_tensorrt_for_sparse_kernels(model, tmp_path) -> None:
    result = invoke(model, "--pattern", "2:4", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    assert "trt_sparsity_enable=1" in result.stdout
    other = invoke(model, "--pattern", "1:4", "-o", tmp_path / "q.onnx")
    assert "trt_sparsity_enable" not in other.stdout
