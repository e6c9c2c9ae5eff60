"""The command line: output, report, and one-line errors with exit code 2 for every user mistake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import GraphBuilder, initializers, save, small_cnn
from click.testing import CliRunner

from onnxprune.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model(tmp_path) -> Path:
    return save(small_cnn(), tmp_path / "model.onnx")


def test_prune_writes_default_output_and_table(model) -> None:
    result = invoke(model, "--sparsity", "0.9")
    assert result.exit_code == 0, result.output
    out = model.with_name("model.pruned.onnx")
    assert out.is_file()
    assert "total (3 layers)" in result.stdout and "achieved 0.9000" in result.stdout
    assert "layer" in result.stdout.splitlines()[0]


def test_report_json_and_explicit_output(model, tmp_path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = invoke(model, "-s", "0.9", "--method", "uniform", "-o", out, "--report", rep)
    assert result.exit_code == 0, result.output
    data = json.loads(rep.read_text())
    assert data["method"] == "uniform" and data["output"] == str(out)
    assert data["zeros_after"] == round(0.9 * data["prunable_weights"])
    w = initializers(out)
    assert (
        sum(int((w[layer["name"]] == 0).sum()) for layer in data["layers"]) == (data["zeros_after"])
    )


def test_prune_subcommand_name_also_works(model, tmp_path) -> None:
    result = invoke("prune", model, "-s", "0.5", "-o", tmp_path / "x.onnx", "-q")
    assert result.exit_code == 0 and result.stdout == ""


def test_min_keep_and_pattern(model, tmp_path) -> None:
    result = invoke(model, "-s", "0.98", "--min-keep", "0.01", "-o", tmp_path / "a.onnx")
    assert result.exit_code == 0, result.output
    assert "layer collapse" not in result.output
    result = invoke(model, "--pattern", "2:4", "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0, result.output
    assert "pattern 2:4" in result.stdout


def test_inspect_writes_nothing(model, tmp_path) -> None:
    rep = tmp_path / "i.json"
    result = invoke("inspect", model, "--sparsity", "0.9", "--report", rep)
    assert result.exit_code == 0, result.output
    assert "would keep" in result.stdout and "mean|w|" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.json", "model.onnx"]
    assert len(json.loads(rep.read_text())["layers"]) == 3


def nothing_prunable(tmp_path: Path) -> Path:
    b = GraphBuilder()
    b.node("Relu", [b.input("x", ["N", 4])], out="y")
    b.output("y")
    return save(b.model(), tmp_path / "relu.onnx")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("text", "not an ONNX model"),
        ("truncated", "truncated"),
        ("sparsity_high", "must be in [0, 1)"),
        ("sparsity_negative", "must be in [0, 1)"),
        ("method", "Invalid value for '--method'"),
        ("infeasible", "highest sparsity it allows"),
        ("nothing", "no prunable weights: looked for constant weights of Conv"),
        ("exists", "already exists; pass --force"),
        ("is_input", "is the input model"),
        ("no_dir", "does not exist"),
        ("min_keep", "--min-keep"),
        ("no_sparsity", "give --sparsity"),
        ("external_missing", "is missing"),
    ],
)
def test_user_errors_one_line_exit_2_no_output(tmp_path, model, case, message) -> None:
    out = tmp_path / "out.onnx"
    args: list = [model, "-s", "0.5", "-o", out]
    if case == "missing":
        args[0] = tmp_path / "nope.onnx"
    elif case == "text":
        args[0] = tmp_path / "t.onnx"
        args[0].write_text("not a model")
    elif case == "truncated":
        args[0] = tmp_path / "cut.onnx"
        args[0].write_bytes(model.read_bytes()[:700])
    elif case == "sparsity_high":
        args[2] = "1.0"
    elif case == "sparsity_negative":
        args[2] = "-0.5"
    elif case == "method":
        args += ["--method", "random"]
    elif case == "infeasible":
        args = [model, "-s", "0.99", "--min-keep", "0.5", "-o", out]
    elif case == "nothing":
        args[0] = nothing_prunable(tmp_path)
    elif case == "exists":
        out.write_bytes(b"x")
    elif case == "is_input":
        args = [model, "-s", "0.5", "-o", model, "--force"]
    elif case == "no_dir":
        args[4] = tmp_path / "a" / "b.onnx"
    elif case == "min_keep":
        args += ["--min-keep", "lots"]
    elif case == "no_sparsity":
        args = [model, "-o", out]
    elif case == "external_missing":
        import onnx

        onnx.save(
            small_cnn(),
            str(tmp_path / "ext.onnx"),
            save_as_external_data=True,
            location="ext.data",
            size_threshold=0,
        )
        (tmp_path / "ext.data").unlink()
        args[0] = tmp_path / "ext.onnx"
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    if case not in ("method", "no_sparsity"):  # click's own usage errors print a usage line too
        assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or case == "exists"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_installed_entry_point(model, tmp_path) -> None:
    exe = shutil.which("onnxprune", path=str(Path(sys.executable).parent)) or shutil.which(
        "onnxprune"
    )
    assert exe, "the onnxprune console script is not installed"
    done = subprocess.run(
        [exe, str(model), "--sparsity", "0.8", "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "achieved 0.8" in done.stdout
    bad = subprocess.run(
        [exe, str(tmp_path / "none.onnx"), "-s", "0.5"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and bad.stderr.startswith("onnxprune: error:")
    assert bad.stdout == "" and "Traceback" not in bad.stderr
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert "onnxprune" in version.stdout


def test_interrupt_is_one_line_exit_130_and_no_output(model, tmp_path, monkeypatch) -> None:
    import onnxprune.storage.io as io_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "_write_inline", interrupted)
    out = tmp_path / "o.onnx"
    result = invoke(model, "-s", "0.5", "-o", out)
    assert result.exit_code == 130
    assert result.stderr.strip() == "onnxprune: interrupted; nothing was written"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_table_names_the_node_that_uses_each_weight(tmp_path) -> None:
    """Exporters name tensors onnx::Conv_55 but nodes /stem/Conv: the table shows both."""
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    w = b.weight((4, 4), name="onnx::MatMul_7")
    y = b.node("MatMul", [x, w], out="y")
    b.node("MatMul", [y, w], out="z")  # the same weight used twice
    b.output("z")
    path = save(b.model(), tmp_path / "m.onnx")
    for args in ([path, "-s", "0.5"], ["inspect", path]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        header, _, row = result.stdout.splitlines()[:3]
        assert header.split()[:3] == ["layer", "node", "op"]
        assert row.split()[:4] == ["onnx::MatMul_7", "MatMul1", "+1", "MatMul"]
