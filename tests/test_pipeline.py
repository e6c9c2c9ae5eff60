"""The pipeline as a library: options validate themselves, a criterion registered from outside is
used like the built-in ones, the in-memory part is one onnx-ir pass, and `prune` runs the whole
workflow the command line runs (write, validate, report, gate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import mlp, run, save, small_cnn

import onnxprune
from onnxprune.errors import InvalidArgumentError, ValidationFailed
from onnxprune.options import Calibration, Selection, Structured, Validation
from onnxprune.scoring import Importance, importance, register


def samples(n: int = 64, width: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Selection(1.0), "--sparsity 1"),
        (lambda: Selection(0.5, pattern="4:2"), "--pattern"),
        (lambda: Selection(0.5, method="local"), "--method"),
        (lambda: Selection(0.5, min_keep="2.0"), "--min-keep"),
        (lambda: Selection(0.5, include=["("]), "--include"),
        (lambda: Structured(target="flops"), "--target"),
        (lambda: Calibration("c.npz", criterion="hessian"), "--criterion"),
        (lambda: Calibration("c.npz", mode="twice"), "--calibration-mode"),
        (lambda: Validation(min_cosine=2.0), "--min-cosine"),
    ],
)
def test_options_refuse_bad_values_when_made(make, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        make()


class Largest(Importance):
    """A toy criterion from outside the package: the reverse of magnitude (largest go first)."""

    name: ClassVar[str] = "toy-largest"

    def weight_scores(self, w, h, inverse):
        return 1.0 / (np.abs(w) + 1e-3)


def test_a_criterion_registered_from_outside_prunes(tmp_path: Path) -> None:
    register(Largest)
    try:
        assert "toy-largest" in importance.names()
        src = save(mlp(), tmp_path / "m.onnx")
        data = samples()
        calibration = Calibration(data=data, criterion="toy-largest", device="cpu")
        model, report = onnxprune.prune(src, 0.5, calibration=calibration)
        assert report.criterion == "toy-largest" and report.sparsity == pytest.approx(0.5, abs=1e-3)
        original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(src).graph.initializer}
        for layer in report.plan.layers:
            before = np.abs(original[layer.weight.name])  # [in, out]
            after = model.graph.initializers[layer.weight.name].const_value.numpy()
            # within each output (one scale), the largest weights went, the small ones stayed
            for o in range(before.shape[1]):
                kept, gone = before[after[:, o] != 0, o], before[after[:, o] == 0, o]
                if kept.size and gone.size:
                    assert kept.max() <= gone.min()
    finally:
        importance.REGISTRY.pop("toy-largest", None)


def test_prune_pass_composes_with_other_passes(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(small_cnn())
    seen = []

    class Count(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            seen.append(sum(1 for _ in model.graph))
            return ir.passes.PassResult(model, modified=False)

    pruner = onnxprune.PrunePass(Selection(0.5), structured=Structured(compensate=False))
    ir.passes.PassManager([Count(), pruner, Count()])(model)
    assert pruner.report is not None and pruner.report.channels is not None
    assert pruner.report.channels.achieved >= 0.5 and len(seen) == 2
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run(proto, {"x": x})[0].shape == (2, 10)


def test_prune_runs_the_whole_workflow(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "m.onnx")
    data = samples(32)
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    _, report = onnxprune.prune(
        src,
        0.5,
        validation=Validation(data=data, device="cpu", min_cosine=0.0),
        output=out,
        report=report_path,
    )
    assert report.validation is not None and out.is_file()
    written = json.loads(report_path.read_text())
    assert written["validation"]["outputs"][0]["cosine"] > 0.0
    with pytest.raises(ValidationFailed) as failed:
        onnxprune.prune(
            src,
            0.9,
            validation=Validation(data=data, device="cpu", min_cosine=0.9999),
            output=out,
            report=report_path,
            force=True,
        )
    assert failed.value.report.validation is not None  # the numbers that failed the gate
    assert json.loads(report_path.read_text())["achieved_sparsity"] == pytest.approx(0.9, 1e-3)
