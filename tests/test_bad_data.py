"""Bad samples, batch sizes, gate values and options: one line, exit 2, and no model written.

Everything about the data is checked before any pruning (validate.preflight, inputs.py), so a
failed command leaves the folder as it was.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from builders import GraphBuilder, save, small_cnn
from click.testing import CliRunner

from onnxprune import inputs, validate
from onnxprune.cli import main
from onnxprune.errors import DataError, ValidationFailed
from onnxprune.options import MinKeep
from onnxprune.validate.metrics import DiffAccumulator, OutputDiff

SAMPLES = 12


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_user_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("onnxprune: error: "), result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.fixture
def model(tmp_path):
    return save(small_cnn(), tmp_path / "model.onnx")


def x(n: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def forged_rows(path: Path, rows: int) -> Path:
    """An .npz whose member header claims `rows` samples while holding the bytes of 4."""
    array = x(4)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 8, 8)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", head.getvalue() + array.tobytes())
    return path


def bad_crc(path: Path) -> Path:
    """A stored member whose last data byte was changed after the CRC was written."""
    np.savez(path, x=x(4))
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size - 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def two_inputs(tmp_path: Path) -> Path:
    b = GraphBuilder()
    a = b.input("a", ["N", 4])
    c = b.input("b", ["N", 4])
    s = b.node("Add", [a, c])
    b.node("MatMul", [s, b.weight((4, 3))], out="y")
    b.output("y", shape=["N", 3])
    return save(b.model(), tmp_path / "two.onnx")


def open_width(tmp_path: Path) -> Path:
    """A classifier whose file leaves the number of classes open: ["N", "K"]."""
    b = GraphBuilder()
    h = b.input("x", ["N", 4])
    b.node("MatMul", [h, b.weight((4, 3))], out="y")
    b.output("y", shape=["N", "K"])
    return save(b.model(), tmp_path / "open.onnx")


# ---------------------------------------------------------------------------------------------
# the data file itself


def make_data(tmp_path: Path, case: str) -> tuple[Path, str]:
    path = tmp_path / f"{case}.npz"
    labels = np.arange(SAMPLES) % 10
    if case == "npy":
        path = tmp_path / "x.npy"
        np.save(path, x())
        return path, f"{path} is a .npy array; --data needs an .npz with one array per model input"
    if case == "rows_1e12":
        return forged_rows(path, 10**12), "its header claims shape [1000000000000, 3, 8, 8]"
    if case == "not_zip":
        path.write_bytes(b"hello, not a zip")
        return path, "not a readable .npz file"
    if case == "truncated":
        npz(path, x=x())
        path.write_bytes(path.read_bytes()[:300])
        return path, "not a readable .npz file"
    if case == "crc":
        return bad_crc(path), "damaged .npz file (Bad CRC-32"
    if case == "object":
        np.savez(path, x=np.array([None] * SAMPLES, dtype=object))
        return path, "holds Python objects (dtype object)"
    if case == "scalar":
        return npz(path, x=np.float32(1.0)), "array 'x' has shape [], model input 'x' has shape"
    if case == "empty":
        return npz(path, x=x(0)), "the arrays hold no samples"
    if case == "no_arrays":
        return npz(path), "the .npz file holds no arrays"
    if case == "wrong_dtype":
        return npz(path, x=x().astype(np.float64)), "array 'x' is float64"
    if case == "wrong_rank":
        return npz(path, x=x()[:, 0]), "array 'x' has shape [12, 8, 8]"
    if case == "label_too_big":
        return npz(path, x=x(), labels=labels + 1), "'labels' holds 10, but the model's first"
    if case == "label_negative":
        return npz(path, x=x(), labels=labels - 1), "'labels' holds -1; class indices start at 0"
    if case == "label_float":
        return npz(path, x=x(), labels=labels.astype(np.float32)), "'labels' must be a 1-D integer"
    if case == "label_count":
        return npz(path, x=x(), labels=labels[:5]), "'labels' has 5 entries but the inputs have 12"
    if case == "label_2d":
        return npz(path, x=x(), labels=labels[:, None]), "'labels' must be a 1-D integer"
    raise AssertionError(case)


DATA_CASES = [
    "npy",
    "rows_1e12",
    "not_zip",
    "truncated",
    "crc",
    "object",
    "scalar",
    "empty",
    "no_arrays",
    "wrong_dtype",
    "wrong_rank",
    "label_too_big",
    "label_negative",
    "label_float",
    "label_count",
    "label_2d",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_prune_with_bad_data_writes_nothing(model, tmp_path, case) -> None:
    path, message = make_data(tmp_path, case)
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--data", path, "--device", "cpu")
    assert_user_error(result, message)
    assert files(tmp_path) == before


@pytest.mark.parametrize("case", ["npy", "rows_1e12", "crc", "object", "label_too_big"])
def test_validate_with_bad_data(model, tmp_path, case) -> None:
    path, message = make_data(tmp_path, case)
    before = files(tmp_path)
    result = invoke("validate", model, model, "--data", path, "--device", "cpu")
    assert_user_error(result, message)
    assert files(tmp_path) == before


@pytest.mark.parametrize("case", ["npy", "rows_1e12", "label_negative"])
def test_sweep_with_bad_data(model, tmp_path, case) -> None:
    path, message = make_data(tmp_path, case)
    before = files(tmp_path)
    result = invoke(
        "sweep", model, "--data", path, "--device", "cpu", "--sparsities", "0.5",
        "--report", tmp_path / "r.json", "--markdown", tmp_path / "t.md",
    )  # fmt: skip
    assert_user_error(result, message)
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("npy", "is a .npy array; --calibration needs an .npz with one array per model input, "
         "e.g. np.savez('calib.npz', input=x)"),
        ("rows_1e12", "its header claims shape [1000000000000, 3, 8, 8]"),
        ("crc", "damaged .npz file"),
        ("object", "holds Python objects"),
        ("wrong_dtype", "array 'x' is float64"),
        ("empty", "the arrays hold no samples"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_bad_calibration_writes_nothing(model, tmp_path, case, message, command) -> None:
    path, _ = make_data(tmp_path, case)
    before = files(tmp_path)
    if command == "prune":
        result = invoke(model, "-s", "0.5", "--calibration", path, "--device", "cpu")
    else:
        good = npz(tmp_path / "val.npz", x=x())
        before = files(tmp_path)
        result = invoke(
            "sweep", model, "--data", good, "--calibration", path, "--device", "cpu",
            "--sparsities", "0.5",
        )  # fmt: skip
    assert_user_error(result, message)
    assert files(tmp_path) == before


def test_calibration_labels_are_ignored(model, tmp_path) -> None:
    """--calibration ignores labels: out-of-range ones are no error there."""
    path = npz(tmp_path / "c.npz", x=x(), labels=np.full(SAMPLES, 99))
    result = invoke(model, "-s", "0.5", "--calibration", path, "--criterion", "wanda", "-q")
    assert result.exit_code == 0, result.output


def test_mismatched_rows_across_inputs(tmp_path) -> None:
    two = two_inputs(tmp_path)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    path = npz(tmp_path / "d.npz", a=a, b=a[:5])
    before = files(tmp_path)
    result = invoke(two, "-s", "0.5", "--data", path, "--device", "cpu")
    assert_user_error(result, "input arrays have different numbers of samples: a 6, b 5")
    assert files(tmp_path) == before
    missing = npz(tmp_path / "m.npz", a=a)
    result = invoke(two, "-s", "0.5", "--data", missing, "--device", "cpu")
    assert_user_error(result, "no array for model input 'b'")


def test_labels_beyond_an_open_output_width_keep_no_model(tmp_path) -> None:
    """The file does not say how many classes: the first batch does, and nothing is kept."""
    model = open_width(tmp_path)
    rng = np.random.default_rng(0)
    path = npz(
        tmp_path / "d.npz",
        x=rng.standard_normal((8, 4)).astype(np.float32),
        labels=np.array([0, 1, 2, 3, 0, 1, 2, 0]),
    )
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--data", path, "--device", "cpu", "-q")
    assert_user_error(result, "'labels' holds 3, but the model's first output has 3 classes")
    assert "(no pruned model was kept)" in result.stderr
    assert files(tmp_path) == before
    # the same through validate: an error, never an accuracy
    result = invoke("validate", model, model, "--data", path, "--device", "cpu")
    assert_user_error(result, "'labels' holds 3")


def test_data_refused_by_the_run_keeps_the_previous_output(tmp_path) -> None:
    """--force over an output: validation runs on the prepared model before anything is put in
    place, so data that only the run refuses leaves the previous output, its report and the
    input as they were (it deleted the new output, the old one already gone)."""
    model = open_width(tmp_path)
    rng = np.random.default_rng(0)
    good = npz(tmp_path / "g.npz", x=rng.standard_normal((8, 4)).astype(np.float32))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    first = invoke(model, "-s", "0.5", "-o", out, "--report", report, "--data", good, "-q")
    assert first.exit_code == 0, first.output
    bad = npz(
        tmp_path / "d.npz",
        x=rng.standard_normal((8, 4)).astype(np.float32),
        labels=np.array([0, 1, 2, 3, 0, 1, 2, 0]),
    )
    before = _snapshot(tmp_path)
    args = ["-s", "0.9", "-o", out, "--report", report, "--data", bad, "--force", "-q"]
    result = invoke(model, *args)
    assert_user_error(result, "'labels' holds 3, but the model's first output has 3 classes")
    assert "(no pruned model was kept)" in result.stderr and ".onnxprune-" not in result.stderr
    assert _snapshot(tmp_path) == before


def test_labels_in_range_pass(model, tmp_path) -> None:
    path = npz(tmp_path / "d.npz", x=x(), labels=np.arange(SAMPLES) % 10)
    result = invoke(model, "-s", "0.5", "--data", path, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# batch size


def test_batch_size_zero_is_refused_before_pruning(model, tmp_path) -> None:
    path = npz(tmp_path / "d.npz", x=x())
    before = files(tmp_path)
    for args in (["--data", path], ["--calibration", path], ["--validate"]):
        result = invoke(model, "-s", "0.5", "--batch-size", "0", "--device", "cpu", *args)
        assert_user_error(result, "--batch-size 0: must be at least 1")
        assert files(tmp_path) == before
    result = invoke("sweep", model, "--batch-size", "-3", "--device", "cpu")
    assert_user_error(result, "--batch-size -3: must be at least 1")


def test_huge_batch_size_is_clamped_to_the_samples(model, tmp_path) -> None:
    path = npz(tmp_path / "d.npz", x=x())
    result = invoke(
        model, "-s", "0.5", "--data", path, "--device", "cpu", "--batch-size", "100000000000"
    )
    assert result.exit_code == 0, result.output
    assert f"{SAMPLES} samples from" in result.stdout and f"batch {SAMPLES};" in result.stdout
    result = invoke(
        model, "-s", "0.5", "--calibration", path, "--criterion", "wanda", "--force", "-q",
        "--device", "cpu", "--batch-size", "100000000000",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = inputs.from_arrays({"x": x()}, [inputs.InputSpec("x", np.dtype("f4"), ("N", 3, 8, 8))],
                             batch_size=10**11)  # fmt: skip
    assert got.batch_size == SAMPLES and len(got.batches) == 1


def test_huge_batch_of_generated_inputs_is_refused(model, tmp_path) -> None:
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--validate", "--batch-size", "100000000000")
    assert_user_error(result, "--batch-size 100000000000: one batch of generated inputs would")
    assert files(tmp_path) == before
    result = invoke("validate", model, model, "--batch-size", "100000000000")
    assert_user_error(result, "one batch of generated inputs would take")


# ---------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "macs"], "--target macs counts what removing whole channels saves: it "
         "needs --structured"),
        (["--round-to", "8"], "--round-to 8 rounds channel counts: it needs --structured"),
    ],
)  # fmt: skip
def test_structured_only_options_need_structured(model, tmp_path, args, message) -> None:
    before = files(tmp_path)
    assert_user_error(invoke(model, "-s", "0.5", *args), message)
    assert_user_error(invoke("sweep", model, "--device", "cpu", *args), message)
    assert files(tmp_path) == before
    from onnxprune.cli import structured_settings
    from onnxprune.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="needs --structured"):
        structured_settings(False, target="macs")


def test_min_keep_decimal_is_a_fraction_integer_a_count(model, tmp_path) -> None:
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--min-keep", "1.0")
    assert_user_error(result, "--min-keep 100% leaves only 0 of")
    assert "the highest sparsity it allows is 0.0000" in result.stderr
    assert files(tmp_path) == before
    result = invoke(model, "-s", "0.5", "--min-keep", "1", "-o", tmp_path / "one.onnx")
    assert result.exit_code == 0, result.output
    assert "min-keep 1" in result.stdout
    assert MinKeep.parse("1") == MinKeep(count=1)
    assert MinKeep.parse("1.0") == MinKeep(fraction=1.0) == MinKeep.parse("100%")
    assert MinKeep.parse(1.0) == MinKeep(fraction=1.0) and MinKeep.parse(1) == MinKeep(count=1)
    assert str(MinKeep.parse("1.0")) == "100%" and str(MinKeep.parse("0.02")) == "0.02"
    result = invoke(model, "-s", "0.5", "--min-keep", "100.0")
    assert_user_error(result, "a fraction (written with a decimal point or %) must be at most")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-cosine", "nan"], "--min-cosine nan: must be a number in [-1, 1]"),
        (["--min-cosine", "inf"], "--min-cosine inf: must be a number in [-1, 1]"),
        (["--min-cosine", "-1.5"], "--min-cosine -1.5: must be a number in [-1, 1]"),
        (["--min-agreement", "1.5"], "--min-agreement 1.5: must be a number in [0, 1]"),
        (["--min-agreement", "nan"], "--min-agreement nan: must be a number in [0, 1]"),
        (["--max-accuracy-drop", "-1"], "--max-accuracy-drop -1.0: must be a number in [0, 1]"),
        (["--max-accuracy-drop", "inf"], "--max-accuracy-drop inf: must be a number in [0, 1]"),
    ],
)
def test_gate_values_are_checked_first(model, tmp_path, args, message) -> None:
    path = npz(tmp_path / "d.npz", x=x(), labels=np.arange(SAMPLES) % 10)
    before = files(tmp_path)
    assert_user_error(invoke(model, "-s", "0.5", "--data", path, *args), message)
    assert_user_error(invoke("validate", model, model, "--data", path, *args), message)
    assert files(tmp_path) == before


def test_gates_that_cannot_be_measured_fail_before_pruning(model, tmp_path) -> None:
    path = npz(tmp_path / "d.npz", x=x())
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--data", path, "--max-accuracy-drop", "0.01")
    assert_user_error(result, "--max-accuracy-drop needs labels")
    assert files(tmp_path) == before


def _result(cosines: list[float], agreement: float, drop: float | None = None) -> object:
    ref = validate.ModelResult("a", ["CPUExecutionProvider"], None, accuracy=0.5)
    cand = validate.ModelResult(
        "b", ["CPUExecutionProvider"], None, accuracy=None if drop is None else 0.5 - drop
    )
    return validate.Validation(
        reference=ref,
        candidate=cand,
        outputs=[OutputDiff(f"y{i}", 0.0, 0.0, 0.0, c) for i, c in enumerate(cosines)],
        agreement=agreement,
        samples=4,
        batch_size=4,
        inputs="data",
        labels=drop is not None,
        device="cpu",
    )


def test_nan_measurements_fail_gates() -> None:
    with pytest.raises(ValidationFailed, match="output 'y1' is nan"):
        validate.check_gates(_result([1.0, math.nan, 0.5], 1.0), min_cosine=0.1)
    with pytest.raises(ValidationFailed, match="top-1 agreement nan"):
        validate.check_gates(_result([1.0], math.nan), min_agreement=0.5)
    with pytest.raises(ValidationFailed, match="accuracy dropped by nan"):
        validate.check_gates(_result([1.0], 1.0, drop=math.nan), max_accuracy_drop=0.5)
    validate.check_gates(_result([1.0, 0.9], 1.0, drop=0.0), min_cosine=0.9, max_accuracy_drop=0)
    # outputs that overflow or are NaN do not come out with a cosine of 1
    acc = DiffAccumulator("y")
    with np.errstate(invalid="ignore"):
        acc.update(np.array([np.inf, 1.0]), np.array([np.inf, 2.0]))
    assert not acc.result().cosine >= 0.5


# ---------------------------------------------------------------------------------------------
# the readers, directly


def test_headers_are_read_without_the_data(tmp_path) -> None:
    path = npz(tmp_path / "d.npz", x=x(), labels=np.arange(SAMPLES))
    headers = inputs.read_npz_headers(path)
    assert headers["x"].shape == (SAMPLES, 3, 8, 8) and headers["x"].dtype == np.float32
    assert headers["labels"].ndim == 1
    with pytest.raises(DataError, match="header claims"):
        inputs.read_npz_headers(forged_rows(tmp_path / "f.npz", 10**12))
    with pytest.raises(DataError, match="header claims"):
        inputs.load_npz(forged_rows(tmp_path / "g.npz", 5))
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, x=x())
    assert np.array_equal(inputs.load_npz(compressed)["x"], x())


def test_input_shape_with_a_zero_dim_is_refused(model, tmp_path) -> None:
    before = files(tmp_path)
    result = invoke(model, "-s", "0.5", "--validate", "--input-shape", "x=0x3x8x8")
    assert_user_error(result, "a dimension of 0 makes an empty input")
    assert files(tmp_path) == before


# -- the order of complaints, and what they name (issue 20) ------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pattern", "5:4"], "--pattern '5:4': need 0 < N < M"),
        (["--pattern", "two:four"], "--pattern 'two:four': write N:M"),
        (["-s", "1.5"], "--sparsity 1.5: must be in [0, 1)"),
        (["-s", "0.5", "--min-keep", "abc"], "--min-keep 'abc'"),
        (["-s", "0.5", "--include", "("], "--include '(': not a regular expression"),
        (["-s", "0.5", "--criterion", "wanda"], "--criterion wanda needs calibration samples"),
        (["-s", "0.5", "--calibration-samples", "2"], "--calibration-samples needs --calibration"),
        (["-s", "0.5", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["-s", "0.5", "--min-cosine", "3"], "--min-cosine 3.0: must be a number in [-1, 1]"),
        (["-s", "0.5", "--heads"], "--heads removes whole attention heads"),
    ],
)
def test_argument_errors_come_before_file_state_errors(model, tmp_path, args, message) -> None:
    """A bad argument is said first, not "already exists" (which --force would only trade for
    the same error) nor a missing data file."""
    taken = tmp_path / "o.onnx"
    taken.write_bytes(b"someone's file")
    before = _snapshot(tmp_path)
    result = invoke(model, *args, "-o", taken, "--data", tmp_path / "missing.npz")
    assert_user_error(result, message)
    assert _snapshot(tmp_path) == before


def test_argument_errors_first_in_inspect_and_sweep(model, tmp_path) -> None:
    taken = tmp_path / "r.json"
    taken.write_text("keep")
    cases = [
        (["inspect", model, "-s", "2", "--report", taken], "--sparsity 2: must be in [0, 1)"),
        (["sweep", model, "--sparsities", "2", "--report", taken], "--sparsities '2'"),
        (["sweep", model, "--min-keep", "x", "--markdown", taken], "--min-keep 'x'"),
        (
            ["sweep", model, "--criteria", "foo", "--calibration", tmp_path / "no.npz"],
            "--criteria 'foo'",
        ),
    ]
    for args, message in cases:
        assert_user_error(invoke(*args), message)
    assert taken.read_text() == "keep"


@pytest.mark.parametrize("option", ["--data", "--calibration"])
def test_one_array_named_for_another_input_is_refused_by_name(model, tmp_path, option) -> None:
    """One array for a one-input model is used only when it has no name of its own (np.savez's
    arr_0): an array named for another input is another model's samples."""
    samples = npz(tmp_path / "s.npz", input_ids=x())
    before = _snapshot(tmp_path)
    result = invoke(model, "-s", "0.5", "-o", tmp_path / "o.onnx", option, samples)
    assert_user_error(result, "the array is named 'input_ids', the model's input 'x'")
    assert _snapshot(tmp_path) == before
    np.savez(tmp_path / "u.npz", x())  # unnamed: arr_0
    ok = invoke(model, "-s", "0.5", "-o", tmp_path / "o.onnx", option, tmp_path / "u.npz", "-q")
    assert ok.exit_code == 0, ok.output


def nan_weight_model(value: float) -> GraphBuilder:
    b = GraphBuilder(0)
    h = b.node("Relu", [b.node("MatMul", [b.input("x", ["N", 16]), b.weight((16, 32))])])
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    w[3, 4] = value
    b.node("MatMul", [h, b.weight((32, 8), name="head", array=w)], out="y")
    b.output("y", shape=["N", 8])
    return b


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(
    "extra", [[], ["--criterion", "wanda"], ["--structured"]], ids=["sparsegpt", "wanda", "ch"]
)
def test_nan_weights_are_named_as_the_models_not_the_samples(tmp_path, value, extra) -> None:
    src = save(nan_weight_model(value).model(), tmp_path / "m.onnx")
    rows = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    calib = npz(tmp_path / "c.npz", x=rows)
    before = _snapshot(tmp_path)
    result = invoke(src, "-s", "0.5", "-o", tmp_path / "o.onnx", "--calibration", calib, *extra)
    assert_user_error(result, "weight 'head' holds NaN or Inf: the model itself is damaged")
    assert "calibration data" not in result.stderr
    assert _snapshot(tmp_path) == before
