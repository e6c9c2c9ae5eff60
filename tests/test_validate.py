"""Validation: metrics against hand-computed values on tiny models, data checks, devices, gates."""

from __future__ import annotations

import gzip
import math

import numpy as np
import onnx_ir as ir
import pytest
from builders import GraphBuilder, mlp, save, small_cnn
from onnx import TensorProto

from onnxprune import inputs, validate
from onnxprune import runtime as runtime_module
from onnxprune.errors import DataError, DeviceError, InvalidArgumentError, ValidationFailed
from onnxprune.report import validation as report_validation
from onnxprune.report.sweep import format_markdown, format_sweep
from onnxprune.sweep import parse_sparsities, sweep
from onnxprune.validate import measure as validate_compare
from onnxprune.validate import metrics

W_REF = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
W_PRUNED = np.array([[1, 0, 3], [4, 5, 0]], dtype=np.float32)
X = np.eye(2, dtype=np.float32)  # the outputs are then the rows of W


def linear(w: np.ndarray, batch: int | str = "N"):
    """y = x @ w: every output is a row of w for one-hot x, so all metrics are by hand."""
    b = GraphBuilder()
    x = b.input("x", [batch, 2])
    b.node("MatMul", [x, b.weight(w.shape, name="w", array=w)], out="y")
    b.output("y", shape=[batch, 3])
    return b.model()


@pytest.fixture
def pair(tmp_path):
    return save(linear(W_REF), tmp_path / "ref.onnx"), save(linear(W_PRUNED), tmp_path / "cut.onnx")


def run(pair, **kwargs) -> validate.Validation:
    kwargs.setdefault("data", {"x": X, "labels": np.array([2, 2])})
    return validate.validate(*pair, device="cpu", latency=False, **kwargs)


def test_metrics_by_hand(pair) -> None:
    v = run(pair)
    # reference rows [1 2 3] [4 5 6]; pruned rows [1 0 3] [4 5 0]; |diff| rows [0 2 0] [0 0 6]
    (out,) = v.outputs
    assert out.name == "y"
    assert out.max_abs == 6.0
    assert out.mean_abs == pytest.approx(8 / 6)
    assert out.max_rel == pytest.approx(1.0)  # 2/2 and 6/6
    assert out.cosine == pytest.approx(51 / math.sqrt(91 * 51))
    # argmax: reference [2, 2], pruned [2, 1]
    assert v.agreement == 0.5
    assert v.reference.accuracy == 1.0 and v.candidate.accuracy == 0.5
    assert v.accuracy_drop == 0.5
    assert v.samples == 2 and v.labels and v.reference.providers == ["CPUExecutionProvider"]


def test_metrics_do_not_depend_on_batch_size(pair) -> None:
    one, two = run(pair, batch_size=1), run(pair, batch_size=2)
    assert one.batch_size == 1 and two.batch_size == 2
    assert one.outputs == two.outputs and one.agreement == two.agreement


def test_costs_by_hand(pair) -> None:
    v = run(pair)
    assert (v.reference.cost.params, v.reference.cost.nonzero_params) == (6, 6)
    assert (v.candidate.cost.params, v.candidate.cost.nonzero_params) == (6, 4)
    # MACs per inference at batch 1 (the batch axis is symbolic): 1x2 @ 2x3 = 6, 4 non-zero
    assert (v.reference.cost.macs, v.reference.cost.nonzero_macs) == (6, 6)
    assert (v.candidate.cost.macs, v.candidate.cost.nonzero_macs) == (6, 4)
    assert v.reference.cost.macs_at == {"x": [1, 2]}
    assert v.reference.cost.file_bytes == pair[0].stat().st_size


def test_conv_and_gemm_macs_by_hand(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 1, 4, 4])
    w = np.ones((2, 1, 3, 3), np.float32)
    w[1] = 0  # half the filters are zero
    c = b.node("Conv", [x, b.weight(w.shape, array=w)])  # -> [N, 2, 2, 2]
    f = b.node("Flatten", [c])  # -> [N, 8]
    b.node("Gemm", [f, b.weight((3, 8))], out="y", transB=1)  # -> [N, 3]
    b.output("y", shape=["N", 3])
    path = save(b.model(), tmp_path / "m.onnx")
    cost = metrics.model_cost(path, {"x": (1, 1, 4, 4)})
    # Conv: 8 outputs x 9 MACs = 72, non-zero 36; Gemm: 3 outputs x 8 = 24
    assert cost.macs == 72 + 24 and cost.nonzero_macs == 36 + 24
    assert cost.macs_unknown == []
    assert metrics.model_cost(path, {"x": (5, 1, 4, 4)}).macs == 5 * 96


def test_gzip_size_is_gzip(tmp_path) -> None:
    path = save(small_cnn(), tmp_path / "m.onnx")
    expected = len(gzip.compress(path.read_bytes(), compresslevel=6, mtime=0))
    assert metrics.gzip_size([path]) == expected


def test_latency_summary_by_hand() -> None:
    lat = metrics.Latency.from_seconds([i / 1000 for i in range(1, 11)], batch_size=4)
    assert lat.median_ms == pytest.approx(5.5) and lat.p90_ms == pytest.approx(9.1)
    assert lat.runs == 10 and lat.batch_size == 4


def test_latency_is_measured(pair) -> None:
    v = validate.validate(*pair, data={"x": X}, device="cpu")
    for model in (v.reference, v.candidate):
        assert model.latency is not None and model.latency.runs >= validate_compare.MIN_REPEATS
        assert 0 < model.latency.median_ms <= model.latency.p90_ms


def test_identical_models_agree_exactly(pair) -> None:
    v = validate.validate(pair[0], pair[0], device="cpu", latency=False)
    (out,) = v.outputs
    assert (out.max_abs, out.mean_abs, out.max_rel, out.cosine) == (0, 0, 0, 1.0)
    assert v.agreement == 1.0 and v.accuracy_drop is None


def test_diff_accumulator_edge_cases() -> None:
    acc = metrics.DiffAccumulator("z")
    acc.update(np.zeros(3), np.zeros(3))
    assert acc.result().cosine == 1.0
    acc = metrics.DiffAccumulator("z")
    acc.update(np.ones(3), np.zeros(3))
    assert acc.result().cosine == 0.0 and acc.result().max_rel == 1.0
    with pytest.raises(DataError, match="not comparable"):
        acc.update(np.ones(3), np.ones(4))


def test_in_memory_model_and_outputs_paired_by_position(pair, tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 2])
    b.node("MatMul", [x, b.weight((2, 3), array=W_REF)], out="logits")
    b.output("logits", shape=["N", 3])
    model = ir.serde.deserialize_model(b.model())
    v = validate.validate(pair[0], model, data={"x": X}, device="cpu", latency=False)
    assert v.candidate.path == validate_compare.IN_MEMORY
    assert v.outputs[0].max_abs == 0 and v.agreement == 1.0


# --- inputs -------------------------------------------------------------------------------------


def test_generated_inputs_are_seeded_and_batch_becomes_one(pair, caplog) -> None:
    caplog.set_level("INFO", logger="onnxprune")
    a, b = run(pair, data=None, seed=3), run(pair, data=None, seed=3)
    assert a.outputs == b.outputs and a.inputs == "generated (seed 3)"
    assert a.samples == inputs.GENERATED_BATCHES and a.batch_size == 1
    assert any("symbolic batch dimension N set to 1" in n for n in a.notices)
    assert run(pair, data=None, seed=4).outputs != a.outputs


def test_generated_inputs_follow_types() -> None:
    specs = [
        inputs.InputSpec("ids", np.dtype(np.int64), ("B", 7)),
        inputs.InputSpec("mask", np.dtype(np.bool_), (2, 7)),
        inputs.InputSpec("img", np.dtype(np.uint8), (2, 3)),
    ]
    got = inputs.generate(specs, batch_size=2, batches=2, seed=0)
    batch = got.batches[0]
    assert batch["ids"].shape == (2, 7) and batch["ids"].dtype == np.int64
    assert batch["ids"].min() >= 0 and batch["ids"].max() < inputs.INT_HIGH
    assert batch["mask"].dtype == np.bool_ and batch["img"].dtype == np.uint8
    # the batch size was given: the only notice is that nothing said what range "ids" can use
    assert got.notices == [
        "input 'ids': integers drawn from [0, 10): the graph does not say what range it can "
        "use; give real values with --data"
    ]


def test_symbolic_non_batch_dim_needs_input_shape(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", "T"])
    b.node("Relu", [x], out="y")
    b.output("y", shape=["N", "T"])
    path = save(b.model(), tmp_path / "m.onnx")
    with pytest.raises(DataError, match=r"symbolic dimension T at axis 1.*--input-shape x=1xT "):
        validate.validate(path, path, device="cpu", latency=False)
    v = validate.validate(path, path, device="cpu", latency=False, input_shapes={"x": (2, 5)})
    assert v.reference.cost.macs_at == {"x": [1, 5]} and v.batch_size == 2
    with pytest.raises(InvalidArgumentError, match="no such input"):
        validate.validate(path, path, device="cpu", input_shapes={"z": (1, 1)})


def test_parse_input_shapes() -> None:
    assert inputs.parse_input_shapes(["x=1x3x224x224", "m:0=2X5"]) == {
        "x": (1, 3, 224, 224),
        "m:0": (2, 5),
    }
    for bad in ("x", "x=1xa", "=1x2", "x=-1"):
        with pytest.raises(InvalidArgumentError, match="NAME=DIMS"):
            inputs.parse_input_shapes([bad])


def test_single_unnamed_array_is_accepted(pair, tmp_path) -> None:
    path = tmp_path / "val.npz"
    np.savez(path, X, labels=np.array([2, 2]))  # stored as arr_0
    v = run(pair, data=path)
    assert v.samples == 2 and v.inputs == str(path) and v.reference.accuracy == 1.0


def two_inputs(tmp_path):
    b = GraphBuilder()
    a, c = b.input("a", ["N", 2]), b.input("b", ["N", 2])
    b.node("Add", [a, c], out="y")
    b.output("y", shape=["N", 2])
    return save(b.model(), tmp_path / "two.onnx")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"a": np.ones((3, 2), np.float32)},
            r"no array for model input 'b'.*arrays in the file: 'a'",
        ),
        (
            {"a": np.ones((3, 2)), "b": np.ones((3, 2), np.float32)},
            r"array 'a' is float64, model input 'a' expects float32",
        ),
        (
            {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 2), np.float32)},
            r"array 'a' has shape \[3, 4\], model input 'a' has shape \[N, 2\]",
        ),
        (
            {"a": np.ones((3, 2, 1), np.float32), "b": np.ones((3, 2), np.float32)},
            r"array 'a' has shape \[3, 2, 1\]",
        ),
        (
            {"a": np.ones((3, 2), np.float32), "b": np.ones((4, 2), np.float32)},
            "different numbers of samples",
        ),
        (
            {"a": np.ones((3, 2), np.float32), "b": np.ones((3, 2), np.float32), "labels": [1, 2]},
            "'labels' has 2 entries but the inputs have 3 samples",
        ),
        (
            {
                "a": np.ones((3, 2), np.float32),
                "b": np.ones((3, 2), np.float32),
                "labels": np.ones((3, 2), np.int64),
            },
            "'labels' must be a 1-D integer array",
        ),
        ({"a": np.ones((0, 2), np.float32), "b": np.ones((0, 2), np.float32)}, "no samples"),
    ],
)
def test_data_errors(tmp_path, arrays, message) -> None:
    path = two_inputs(tmp_path)
    data = {k: np.asarray(v) for k, v in arrays.items()}
    with pytest.raises(DataError, match=message):
        validate.validate(path, path, data=data, device="cpu", latency=False)


def test_data_file_errors(pair, tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        run(pair, data=tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        run(pair, data=bad)


def test_fixed_batch_dimension_batches_by_it(tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="onnxprune")
    path = save(linear(W_REF, batch=1), tmp_path / "fixed.onnx")
    data = {"x": np.tile(X, (3, 1))[:5], "labels": np.array([2, 2, 2, 2, 2])}
    v = validate.validate(path, path, data=data, batch_size=4, device="cpu", latency=False)
    assert v.batch_size == 1 and v.samples == 5
    assert any("fixed at 1" in n for n in v.notices)


def test_models_with_other_inputs_are_not_comparable(pair, tmp_path) -> None:
    other = two_inputs(tmp_path)
    with pytest.raises(DataError, match="needs input 'a'"):
        validate.validate(pair[0], other, device="cpu", latency=False)


# --- devices ------------------------------------------------------------------------------------


def test_cpu_device_never_probes_cuda() -> None:
    cpu = runtime_module.CPU
    assert runtime_module.select_runtime("cpu") == runtime_module.Runtime("cpu", (cpu,))
    with pytest.raises(InvalidArgumentError):
        runtime_module.select_runtime("tpu")


def test_auto_falls_back_to_cpu_with_a_reason(monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "cuda_problem", lambda: "no GPU here")
    runtime = runtime_module.select_runtime("auto")
    assert runtime.providers == (runtime_module.CPU,)
    assert runtime.note == "running on CPU: no GPU here"
    with pytest.raises(DeviceError, match="--device cuda: no GPU here"):
        runtime_module.select_runtime("cuda")


def test_cuda_problem_is_a_sentence_or_none() -> None:
    problem = runtime_module.cuda_problem()
    assert problem is None or ("CUDA" in problem and "\n" not in problem)


def cuda_or_skip() -> None:
    problem = runtime_module.cuda_problem()
    if problem:
        print(f"skipping: {problem}")
        pytest.skip(f"CUDA not usable: {problem}")


@pytest.mark.gpu
def test_cuda_runs_and_reports_its_provider(pair) -> None:
    cuda_or_skip()
    v = validate.validate(*pair, data={"x": X, "labels": np.array([2, 2])}, device="cuda")
    assert v.reference.providers[0] == runtime_module.CUDA and v.provider == runtime_module.CUDA
    assert v.agreement == 0.5 and v.candidate.latency is not None  # timed with IO binding
    auto = validate.validate(*pair, data={"x": X}, device="auto", latency=False)
    assert auto.provider == runtime_module.CUDA and auto.note is None


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path) -> None:
    cuda_or_skip()
    path = save(small_cnn(), tmp_path / "m.onnx")
    on_gpu = validate.validate(path, path, device="cuda", latency=False)
    assert on_gpu.outputs[0].max_abs == 0


# --- gates --------------------------------------------------------------------------------------


def test_gates(pair) -> None:
    v = run(pair)  # accuracy 1.0 -> 0.5, agreement 0.5, cosine 0.749
    validate.check_gates(v, max_accuracy_drop=0.5, min_agreement=0.5, min_cosine=0.7)
    with pytest.raises(ValidationFailed, match=r"accuracy dropped by 0.5000 \(1.0000 -> 0.5000\)"):
        validate.check_gates(v, max_accuracy_drop=0.1)
    with pytest.raises(ValidationFailed, match=r"agreement 0\.5000 is below --min-agreement 0\.9"):
        validate.check_gates(v, min_agreement=0.9)
    with pytest.raises(ValidationFailed, match=r"output 'y' is 0\.748"):
        validate.check_gates(v, min_cosine=0.99)
    with pytest.raises(ValidationFailed) as info:
        validate.check_gates(v, max_accuracy_drop=0.1, min_agreement=0.9)
    assert "\n" not in str(info.value) and str(info.value).count(";") == 1


def test_accuracy_gate_needs_labels(pair) -> None:
    v = run(pair, data={"x": X})
    with pytest.raises(DataError, match="needs labels"):
        validate.check_gates(v, max_accuracy_drop=0.01)


def test_to_dict_has_the_table_numbers(pair) -> None:
    d = run(pair).to_dict()
    assert d["top1_agreement"] == 0.5 and d["accuracy_drop"] == 0.5
    assert d["candidate"]["nonzero_params"] == 4 and d["candidate"]["nonzero_macs"] == 4
    assert d["outputs"][0]["max_abs"] == 6.0 and d["provider"] == "CPUExecutionProvider"
    text = report_validation.format_validation(run(pair))
    assert "top-1 agreement" in text and "50.00%" in text and "-50.00 pts" in text


# --- sweep --------------------------------------------------------------------------------------


def test_sweep_rows(tmp_path) -> None:
    path = save(mlp(dims=(16, 32, 8)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((20, 16)).astype(np.float32), "labels": np.arange(20) % 8}
    result = sweep(path, [0.5, 0.9], data=data, min_keep="0.2", device="cpu")
    assert [(r.method, r.sparsity) for r in result.rows] == [
        ("global", 0.5),
        ("global", 0.9),
        ("global+min-keep 0.2", 0.5),
        ("global+min-keep 0.2", 0.9),  # min-keep 0.2 allows at most 0.8
        ("uniform", 0.5),
        ("uniform", 0.9),
    ]
    infeasible = result.rows[3]
    assert infeasible.error and "highest sparsity" in infeasible.error
    ok = result.rows[0]
    assert ok.achieved == 0.5 and ok.accuracy is not None and 0 < ok.min_cosine <= 1
    assert ok.nonzero_macs < result.reference.cost.macs
    table = format_markdown(result)
    assert table.splitlines()[0] == "| sparsity | global | global+min-keep 0.2 | uniform |"
    assert "| 0.9 |" in table and "infeasible" in table


def test_structured_sweep_removes_channels_and_times_each_model(tmp_path) -> None:
    path = save(mlp(dims=(16, 64, 8)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((20, 16)).astype(np.float32), "labels": np.arange(20) % 8}
    result = sweep(path, [0.25, 0.5], data=data, min_keep="0.1", device="cpu", structured=True)
    assert result.structured and result.target == "params"
    assert [(r.method, r.sparsity) for r in result.rows] == [
        ("structured", 0.25),
        ("structured", 0.5),
        ("structured+min-keep 0.1", 0.25),
        ("structured+min-keep 0.1", 0.5),
    ]
    dense = result.reference
    assert dense.latency is not None and dense.latency.median_ms > 0
    for row in result.rows:
        assert row.error is None and row.latency_ms > 0
        assert abs(row.achieved - row.sparsity) < 0.05  # hidden channels of 25 params each
        assert row.macs < dense.cost.macs and row.file_bytes < dense.cost.file_bytes
    assert result.rows[1].macs < result.rows[0].macs
    text = format_sweep(result)
    assert "latency" in text.splitlines()[0] and "removed with their channels" in text


def test_parse_sparsities() -> None:
    assert parse_sparsities("0.5, 0.9") == [0.5, 0.9]
    for bad in ("", "a", "1.0", "-0.1"):
        with pytest.raises(InvalidArgumentError):
            parse_sparsities(bad)


def test_input_specs_refuse_non_tensor_types() -> None:
    class Arg:
        name, type, shape = "s", "seq(tensor(float))", []

    class Session:
        def get_inputs(self):
            return [Arg()]

    with pytest.raises(DataError, match="seq"):
        inputs.input_specs(Session())
    assert TensorProto.FLOAT  # builders use TensorProto; keep the import honest


def test_accuracy_gate_needs_a_class_output(tmp_path) -> None:
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 3])
    b.node("Relu", [x], out="y")
    b.output("y", shape=["N", 2, 3])
    path = save(b.model(), tmp_path / "m.onnx")
    data = {"x": np.ones((4, 2, 3), np.float32), "labels": np.zeros(4, np.int64)}
    v = validate.validate(path, path, data=data, device="cpu", latency=False)
    assert v.labels and v.reference.accuracy is None and v.agreement is None
    assert v.outputs[0].cosine == 1.0
    with pytest.raises(DataError, match=r"needs a first output shaped \[batch, classes\]"):
        validate.check_gates(v, max_accuracy_drop=0.01)
    with pytest.raises(DataError, match="--min-agreement needs"):
        validate.check_gates(v, min_agreement=0.9)


def test_every_output_is_compared(tmp_path) -> None:
    def two_outputs(scale: float):
        b = GraphBuilder()
        x = b.input("x", ["N", 2])
        b.node("MatMul", [x, b.weight((2, 3), array=W_REF)], out="logits")
        b.node("Mul", [x, b.weight((1,), array=np.array([scale], np.float32))], out="aux")
        b.output("logits", shape=["N", 3])
        b.output("aux", shape=["N", 2])
        return b.model()

    a = save(two_outputs(1.0), tmp_path / "a.onnx")
    c = save(two_outputs(2.0), tmp_path / "c.onnx")
    v = validate.validate(a, c, data={"x": X}, device="cpu", latency=False)
    assert [o.name for o in v.outputs] == ["logits", "aux"]
    assert v.outputs[0].max_abs == 0 and v.outputs[1].max_abs == 1.0  # aux doubles the eye
    assert v.outputs[1].max_rel == 1.0 and v.outputs[1].cosine == pytest.approx(1.0)
    assert v.min_cosine == pytest.approx(1.0) and v.agreement == 1.0


def test_latency_with_io_binding(pair) -> None:
    # the CUDA path's IO binding, exercised on the CPU
    import onnxruntime as ort

    session = ort.InferenceSession(str(pair[0]), providers=["CPUExecutionProvider"])
    lat = validate.measure_latency(session, {"x": X}, warmup=1, repeats=4, io_binding=True)
    assert lat.runs == 4 and lat.batch_size == 2 and lat.median_ms > 0


def test_latencies_are_timed_in_turns(tmp_path) -> None:
    from onnxprune.runtime import open_session, select_runtime

    path = save(mlp(), tmp_path / "m.onnx")
    runtime = select_runtime("cpu")
    sessions = [open_session(path, runtime) for _ in range(2)]
    feeds = {"x": np.ones((4, 16), dtype=np.float32)}
    first, second = validate_compare.measure_latencies(
        [(s, feeds) for s in sessions], repeats=7, budget_s=60.0
    )
    assert first.runs == second.runs == 7  # one run of each in turn, as many of each
    assert first.batch_size == second.batch_size == 4


def test_a_structured_model_not_faster_is_said() -> None:
    from types import SimpleNamespace

    from onnxprune.pipeline import not_faster

    def measured(ref_ms: float, cand_ms: float) -> SimpleNamespace:
        def latency(ms: float) -> metrics.Latency:
            return metrics.Latency(median_ms=ms, p90_ms=ms, runs=20, batch_size=8)

        return SimpleNamespace(
            device="cpu",
            reference=SimpleNamespace(latency=latency(ref_ms)),
            candidate=SimpleNamespace(latency=latency(cand_ms)),
        )

    said = not_faster(measured(10.0, 11.8))
    assert said is not None and "not faster on cpu" in said and "x1.18" in said
    assert "--round-to 8" in said
    assert not_faster(measured(10.0, 9.9)) is not None  # within 2%: no gain worth the name
    assert not_faster(measured(10.0, 8.0)) is None
    none_timed = measured(10.0, 8.0)
    none_timed.candidate.latency = None
    assert not_faster(none_timed) is None
