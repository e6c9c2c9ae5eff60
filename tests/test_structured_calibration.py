"""Calibrated structured pruning (calibration/channels.py): the least-squares algebra against
numpy's own solvers, exact bias compensation on linear paths, scale-free channel choice, exact
counts, determinism, accuracy on the digits model, and the command line.

Every reference is independent of onnxprune: np.linalg.lstsq on the samples for the re-solved
weights and the group-OBS errors, explicit inverses for the damped forms, ONNX Runtime for what a
model computes. Calibration runs on the CPU (exact comparisons, byte-identical reruns).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

import onnxprune
from onnxprune import pipeline
from onnxprune.calibration import Calibration
from onnxprune.calibration import solvers as reconstruct
from onnxprune.cli import main
from onnxprune.options import Selection
from onnxprune.report import Report
from onnxprune.selection.channels import ChannelPlan, class_costs, counted_weights, plan_channels
from tests.builders import GraphBuilder, run, save
from tests.channel_models import (
    analyse,
    choose,
    combined,
    gemm_mlp,
    kill,
    mlp_transformer,
    random_cnn,
    random_transformer,
    squeeze_excite,
)

Arrays = dict[str, np.ndarray]
MODELS_DIR = Path(__file__).parent.parent / "models"


# ---------------------------------------------------------------------------------------------
# helpers


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def calibrated(
    model: onnx.ModelProto | Path, sparsity: float, data: Arrays, **settings
) -> tuple[ir.Model, ChannelPlan]:
    """Structured pruning with calibration on the CPU; the model and the applied plan."""
    pruned, report = calibrated_run(model, sparsity, data, **settings)
    assert report.channels is not None
    return pruned, report.channels


def calibrated_run(
    model: onnx.ModelProto | Path,
    sparsity: float,
    data: Arrays,
    *,
    output: Path | None = None,
    min_keep: str | float | None = None,
    round_to: int | None = None,
    target: str = "params",
    **options,
) -> tuple[ir.Model, Report]:
    """Structured pruning with calibration on the CPU; the model and the report."""
    source = model if isinstance(model, Path) else ir.serde.deserialize_model(model)
    pruned, report = pipeline.prune(
        source,
        Selection(sparsity, min_keep=min_keep),
        calibration=Calibration(data=data, **{"device": "cpu", **options}),
        output=output,
        force=True,
        structured=onnxprune.Structured(round_to=round_to, target=target),
    )
    assert report.channels is not None and report.calibration is not None
    return pruned, report


def outputs(model: ir.Model | onnx.ModelProto | Path, data: Arrays) -> list[np.ndarray]:
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    return run(model, data)


def assert_same_outputs(got: Sequence[np.ndarray], expected: Sequence[np.ndarray], rtol: float):
    """Equal up to `rtol` of each output's largest magnitude."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        scale = max(float(np.abs(e).max()), 1e-30)
        np.testing.assert_allclose(g, e, rtol=0, atol=rtol * scale)


def stored(model: ir.Model | onnx.ModelProto | Path) -> Arrays:
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    elif isinstance(model, Path):
        model = onnx.load(str(model))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def checked(path: Path, data: Arrays) -> list[np.ndarray]:
    """The full checker passes on a written model, and ONNX Runtime runs it to finite outputs."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = run(path, data)
    assert all(np.isfinite(o).all() for o in got)
    return got


def batch_feeds(proto: onnx.ModelProto, n: int, seed: int) -> Arrays:
    """Standard normal inputs, n samples along the symbolic (batch) dims."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else n
                for d in value.type.tensor_type.shape.dim]  # fmt: skip
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(covariance, mean) of the rows of x, one pass as capture gathers them: E[x x^T] - m m^T."""
    mean = x.mean(axis=0)
    return reconstruct.covariance(x.T @ x / len(x), mean), mean


def regress(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of b [n, O] on [a, 1]: (weights [O, K], intercept [O], residual [n, O])."""
    design = np.column_stack([a, np.ones(len(a))])
    coef, *_ = np.linalg.lstsq(design, b, rcond=None)
    return coef[:-1].T, coef[-1], b - design @ coef


def damped(c: np.ndarray, damp: float) -> np.ndarray:
    """C + damp * diag(C), each diagonal floored at 1e-6 of the mean (reconstruct.py's rule)."""
    diagonal = np.maximum(np.diag(c), 1e-6 * float(np.mean(np.diag(c))))
    return c + damp * np.diag(diagonal)


def samples_with_offsets(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Correlated columns with means far from zero."""
    mixing = np.eye(k) + 0.5 * rng.standard_normal((k, k))
    return rng.standard_normal((n, k)) @ mixing + rng.uniform(-3.0, 5.0, k)


# ---------------------------------------------------------------------------------------------
# 1. resolve_inputs is least squares with a free bias


def test_resolve_inputs_one_pass_is_least_squares_on_the_kept_inputs() -> None:
    rng = np.random.default_rng(1)
    x = samples_with_offsets(rng, 500, 10)
    w = rng.standard_normal((5, 10))
    keep = np.ones(10, dtype=bool)
    keep[[1, 4, 7]] = False
    cov, mean = moments(x)
    new = reconstruct.resolve_inputs(w, keep, cov[np.ix_(keep, keep)], cov[:, keep], 1e-9)
    expected, intercept, residual = regress(x[:, keep], x @ w.T)
    assert new.shape == (5, 7)
    np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # the bias shift solve() applies, W E[x] - W' E[x_K], is the regression's intercept
    np.testing.assert_allclose(w @ mean - new @ mean[keep], intercept, rtol=1e-6, atol=1e-6)
    # and the error it reports is the regression's residual over the output's fluctuation
    error = reconstruct.fluctuation_error(w, new, cov, cov[np.ix_(keep, keep)], cov[:, keep])
    centred = (x - mean) @ w.T
    assert error == pytest.approx(
        math.sqrt(np.square(residual).sum() / np.square(centred).sum()), rel=1e-6
    )
    # nothing removed: the weights come back as they are
    same = reconstruct.resolve_inputs(w, np.ones(10, dtype=bool), cov, cov, 0.01)
    np.testing.assert_array_equal(same, w)


def test_resolve_inputs_damping_is_ridge_towards_the_kept_weights() -> None:
    """min E||W (x - m) - W' (x_K - m_K)||^2 + sum_j d_j ||W'_j - W_Kj||^2, d = damp * diag(C):
    an augmented least-squares problem, solved by lstsq."""
    rng = np.random.default_rng(2)
    n = 300
    x = samples_with_offsets(rng, n, 8)
    w = rng.standard_normal((4, 8))
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    cov, mean = moments(x)
    kept_cov = cov[np.ix_(keep, keep)]
    new = reconstruct.resolve_inputs(w, keep, kept_cov, cov[:, keep], 0.05)
    d = np.sqrt(np.diag(damped(kept_cov, 0.05) - kept_cov))
    a = np.vstack([(x[:, keep] - mean[keep]) / np.sqrt(n), np.diag(d)])
    b = np.vstack([(x - mean) @ w.T / np.sqrt(n), np.diag(d) @ w[:, keep].T])
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(new, expected, rtol=1e-8, atol=1e-10)


def test_resolve_inputs_paired_is_least_squares_of_the_dense_output() -> None:
    """Sequential statistics: the pruned model feeds x_p (not the dense x_d's kept columns); the
    kept weights are fitted so that W' x_p + bias matches W x_d."""
    rng = np.random.default_rng(3)
    n = 600
    x_dense = samples_with_offsets(rng, n, 9)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=bool)
    x_pruned = 0.8 * x_dense[:, keep] + 0.3 * rng.standard_normal((n, 6)) + 1.0
    x_pruned[:, 2] = np.maximum(x_pruned[:, 2], 0.5)  # and not linearly related either
    w = rng.standard_normal((5, 9))
    cov, mean = moments(x_pruned)
    dense_cov, dense_mean = moments(x_dense)
    cross = (x_dense - dense_mean).T @ (x_pruned - mean) / n  # [K_dense, K]
    new = reconstruct.resolve_inputs(w, keep, cov, cross, 1e-9)
    expected, intercept, residual = regress(x_pruned, x_dense @ w.T)
    np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(w @ dense_mean - new @ mean, intercept, rtol=1e-6, atol=1e-6)
    error = reconstruct.fluctuation_error(w, new, dense_cov, cov, cross)
    centred = (x_dense - dense_mean) @ w.T
    assert error == pytest.approx(
        math.sqrt(np.square(residual).sum() / np.square(centred).sum()), rel=1e-6
    )


# ---------------------------------------------------------------------------------------------
# 2. bias compensation is exact where the removed channel is constant; least squares is exact
#    where the kept channels span what the removed ones carried


CONSTANT = 3  # the hidden channel that is constant over every input


def constant_channel(op: str, bias: bool) -> tuple[onnx.ModelProto, str, int]:
    """Layer 1 makes hidden channel CONSTANT constant (zero weights, a positive bias, a ReLU);
    layer 2 reads it, with or without a bias of its own. (model, first weight, its output axis)."""
    b = GraphBuilder(11)
    if op == "conv":
        x = b.input("x", ["N", 3, 6, 6])
        w1 = b.rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
        w1[CONSTANT] = 0
        b1 = b.rng.standard_normal(8).astype(np.float32)
        b1[CONSTANT] = 1.5
        h = b.node("Conv", [x, b.weight(w1.shape, name="W1", array=w1), b.weight((8,), array=b1)],
                   pads=[1, 1, 1, 1])  # fmt: skip
        h = b.node("Relu", [h])
        # no padding: every kernel position of the constant channel reads 1.5
        inputs = [h, b.weight((4, 8, 3, 3), name="W2", scale=0.3)]
        if bias:
            inputs.append(b.weight((4,), name="B2"))
        b.node("Conv", inputs, out="y")
        b.output("y", shape=["N", 4, 4, 4])
        return b.model(), "W1", 0
    x = b.input("x", ["N", 6])
    if op == "gemm":
        w1 = b.rng.standard_normal((8, 6)).astype(np.float32)
        w1[CONSTANT] = 0
        b1 = b.rng.standard_normal(8).astype(np.float32)
        b1[CONSTANT] = 2.0
        h = b.node("Gemm", [x, b.weight(w1.shape, name="W1", array=w1), b.weight((8,), array=b1)],
                   transB=1)  # fmt: skip
        h = b.node("Relu", [h])
        inputs = [h, b.weight((4, 8), name="W2")]
        if bias:
            inputs.append(b.weight((4,), name="B2"))
        b.node("Gemm", inputs, out="y", transB=1)
        b.output("y", shape=["N", 4])
        return b.model(), "W1", 0
    w1 = b.rng.standard_normal((6, 8)).astype(np.float32)
    w1[:, CONSTANT] = 0
    b1 = b.rng.standard_normal(8).astype(np.float32)
    b1[CONSTANT] = 2.0
    h = b.node("MatMul", [x, b.weight(w1.shape, name="W1", array=w1)])
    h = b.node("Relu", [b.node("Add", [h, b.weight((8,), array=b1)])])
    if bias:
        h = b.node("MatMul", [h, b.weight((8, 4), name="W2")])
        b.node("Add", [h, b.weight((4,), name="B2")], out="y")
    else:
        b.node("MatMul", [h, b.weight((8, 4), name="W2")], out="y")
    b.output("y", shape=["N", 4])
    return b.model(), "W1", 1


@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("op", ["gemm", "matmul", "conv"])
def test_constant_channel_moves_into_the_bias_exactly(
    tmp_path: Path, op: str, bias: bool, mode: str, criterion: str
) -> None:
    proto, first, axis = constant_channel(op, bias)
    shape = (24, 3, 6, 6) if op == "conv" else (40, 6)
    rng = np.random.default_rng(12)
    data = {"x": (rng.standard_normal(shape) + 0.5).astype(np.float32)}
    held_out = {"x": (2 * rng.standard_normal(shape) - 0.3).astype(np.float32)}
    out = tmp_path / "out.onnx"
    # 0.1 of the parameters is one hidden channel (of 8): the one that costs nothing
    _, report = calibrated_run(proto, 0.1, data, output=out, mode=mode, criterion=criterion)
    plan = report.channels
    assert int(plan.removed.sum()) == 1
    before, after = stored(proto), stored(out)
    kept = np.delete(before[first], CONSTANT, axis=axis)
    if mode == "one-pass":  # the first layer's inputs are the model's: nothing to re-solve
        np.testing.assert_array_equal(after[first], kept)
    else:  # re-measured on identical inputs: float32 noise of the statistics only
        np.testing.assert_allclose(after[first], kept, rtol=0, atol=1e-4 * np.abs(kept).max())
    assert report.calibration is not None and report.calibration.bias_corrected >= 1
    assert max(report.errors.values()) < 1e-3  # the reported output error: none
    for feeds_ in (data, held_out):
        assert_same_outputs(checked(out, feeds_), run(proto, feeds_), rtol=1e-5)
    graph = onnx.load(str(out)).graph
    last = graph.node[-1]
    if op == "matmul":  # the MatMul's Add is reused, or one is inserted
        assert [n.op_type for n in graph.node][-2:] == ["MatMul", "Add"]
    else:  # Gemm's C, Conv's B: created where there was none
        assert last.op_type == op.capitalize() and len(last.input) == 3
    assert [o.name for o in graph.output] == ["y"]


def low_rank_linear(seed: int) -> onnx.ModelProto:
    """Gemm 16 -> 12 -> 5 with biases and no non-linearity between."""
    b = GraphBuilder(seed)
    h = b.input("x", ["N", 16])
    h = b.node("Gemm", [h, b.weight((12, 16), name="W1"), b.weight((12,))], transB=1)
    b.node("Gemm", [h, b.weight((5, 12), name="W2"), b.weight((5,))], out="y", transB=1)
    b.output("y", shape=["N", 5])
    return b.model()


def subspace_samples(rng: np.random.Generator, basis: np.ndarray, offset: np.ndarray, n: int):
    return {"x": (rng.standard_normal((n, len(basis))) @ basis + offset).astype(np.float32)}


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
def test_linear_model_pruned_to_the_data_rank_is_exact(
    tmp_path: Path, mode: str, criterion: str
) -> None:
    """Inputs in a 4-dimensional affine subspace: the 12 hidden channels span only 4 dimensions,
    so any 4 (generic) carry the rest and least squares finds the weights that do it."""
    rng = np.random.default_rng(21)
    basis = rng.standard_normal((4, 16))
    offset = rng.uniform(-1.0, 2.0, 16)
    proto = low_rank_linear(22)
    data = subspace_samples(rng, basis, offset, 64)
    held_out = subspace_samples(rng, basis, offset, 32)
    # 8 hidden channels of 12 (21 parameters each of 252): 0.66 needs all 8. Chosen in steps:
    # single-removal scores are all ~0 here (each channel is carried by the others), so one
    # step may keep 4 that span the subspace only barely (error 0.01 in one-pass)
    model, report = calibrated_run(
        proto, 0.66, data, mode=mode, criterion=criterion, damp=1e-8, steps=4
    )
    assert int(report.channels.removed.sum()) == 8
    assert stored(model)["W2"].shape == (5, 4)
    assert report.errors["W2"] < 1e-3
    assert_same_outputs(outputs(model, held_out), run(proto, held_out), rtol=1e-4)
    # a fifth dimension the data never showed is not carried: the test can fail
    other = {"x": held_out["x"] + rng.standard_normal((32, 16)).astype(np.float32)}
    with pytest.raises(AssertionError):
        assert_same_outputs(outputs(model, other), run(proto, other), rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# 3. channel_errors against brute force


def test_channel_errors_are_the_least_squares_residuals() -> None:
    rng = np.random.default_rng(31)
    n = 400
    columns = rng.permutation(np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5]))  # interleaved
    x = samples_with_offsets(rng, n, len(columns))
    w = rng.standard_normal((4, len(columns)))
    cov, mean = moments(x)
    classes = np.array([3, 0, 5, 9, 2, 1, 4])  # 9: no column, no error
    y = x @ w.T
    centred = (x - mean) @ w.T
    obs, energy = reconstruct.channel_errors(w, cov, columns, classes, 1e-10, obs=True)
    flap, energy_again = reconstruct.channel_errors(w, cov, columns, classes, 0.01, obs=False)
    assert energy == pytest.approx(np.square(centred).sum() / n, rel=1e-10)
    assert energy_again == energy
    for i, c in enumerate(classes):
        j = columns == c
        if not j.any():
            assert obs[i] == 0 and flap[i] == 0
            continue
        # the other inputs re-solved, the bias free: the regression's mean squared residual
        _, _, residual = regress(x[:, ~j], y)
        assert obs[i] == pytest.approx(np.square(residual).sum() / n, rel=1e-6), c
        # nothing re-solved, the mean moved into the bias: the removed part's fluctuation
        removed = (x[:, j] - mean[j]) @ w[:, j].T
        assert flap[i] == pytest.approx(np.square(removed).sum() / n, rel=1e-10), c
        assert obs[i] <= flap[i] * (1 + 1e-9)


def test_channel_errors_damped_and_scale_free() -> None:
    rng = np.random.default_rng(32)
    columns = np.array([2, 0, 1, 1, 0, 2, 3, 3, 3, 1])
    x = samples_with_offsets(rng, 200, len(columns))
    w = rng.standard_normal((3, len(columns)))
    cov, _ = moments(x)
    classes = np.arange(4)
    errors, energy = reconstruct.channel_errors(w, cov, columns, classes, 0.01)
    inverse = np.linalg.inv(damped(cov, 0.01))
    for c in classes:
        j = np.flatnonzero(columns == c)
        expected = np.trace(w[:, j] @ np.linalg.inv(inverse[np.ix_(j, j)]) @ w[:, j].T)
        assert errors[c] == pytest.approx(expected, rel=1e-8)
    # each class's inputs scaled by s (as a producer's output channel) and its weights by 1/s
    s = np.array([0.1, 3.0, 10.0, 0.2])[columns]
    scaled, scaled_energy = reconstruct.channel_errors(w / s, cov * np.outer(s, s), columns,
                                                       classes, 0.01)  # fmt: skip
    np.testing.assert_allclose(scaled, errors, rtol=1e-8)
    assert scaled_energy == pytest.approx(energy, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# 4. the choice is scale-free: twins that compute the same function lose the same channels


def twin_cnn(
    scales: dict[int, np.ndarray] | None = None, bn: str | None = None, bn_after: int = 0
) -> onnx.ModelProto:
    """Conv 3->8, Relu, Conv 8->8, Relu, Conv 8->6 (stride 2), Relu, pool, Gemm.

    scales {i: s}: Conv i's output channels (weights and bias) times s, undone in the next
    layer's input weights (times 1/s): the same function, through the ReLUs.
    bn: "unfolded" puts a BatchNorm after Conv `bn_after`; "folded" folds that BatchNorm into it.
    """
    rng = np.random.default_rng(41)
    w = [
        rng.standard_normal((8, 3, 3, 3)),
        0.3 * rng.standard_normal((8, 8, 3, 3)),
        0.3 * rng.standard_normal((6, 8, 3, 3)),
        rng.standard_normal((4, 6)),
    ]
    bias = [rng.standard_normal(8), rng.standard_normal(8), rng.standard_normal(6),
            rng.standard_normal(4)]  # fmt: skip
    gamma = np.geomspace(0.01, 100, 8)[rng.permutation(8)]
    beta, mean, var = rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.2, 3.0, 8)
    if bn == "folded":
        factor = gamma / np.sqrt(var + 1e-5)
        w[bn_after] = w[bn_after] * factor[:, None, None, None]
        bias[bn_after] = (bias[bn_after] - mean) * factor + beta
    for i, s in (scales or {}).items():
        w[i] = w[i] * s[:, None, None, None]
        bias[i] = bias[i] * s
        w[i + 1] = w[i + 1] / (s[None, :, None, None] if w[i + 1].ndim == 4 else s[None, :])
    b = GraphBuilder(0)
    h = b.input("x", ["N", 3, 8, 8])

    def param(array: np.ndarray, name: str) -> str:
        return b.weight(array.shape, name=name, array=array.astype(np.float32))

    for i in range(3):
        h = b.node("Conv", [h, param(w[i], f"W{i + 1}"), param(bias[i], f"B{i + 1}")],
                   pads=[1] * 4, strides=[2, 2] if i == 2 else [1, 1])  # fmt: skip
        if bn == "unfolded" and i == bn_after:
            h = b.node("BatchNormalization", [h, param(gamma, "gamma"), param(beta, "beta"),
                                              param(mean, "mean"), param(var, "var")])  # fmt: skip
        h = b.node("Relu", [h])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.node("Gemm", [h, param(w[3], "W4"), param(bias[3], "B4")], out="y", transB=1)
    b.output("y", shape=["N", 4])
    return b.model()


def kept_channels(plan: ChannelPlan) -> dict[str, tuple[int, ...]]:
    """The kept output channels of every producer, by weight name."""
    return {
        layer.member.value.name: tuple(np.flatnonzero(~plan.removed[layer.classes]).tolist())
        for layer in plan.graph.layers
    }


def cnn_samples(seed: int, n: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((n, 3, 8, 8)) + 0.2).astype(np.float32)}


SCALES = np.geomspace(0.01, 100, 8)[np.random.default_rng(42).permutation(8)]


def twins_choose_alike(
    first: onnx.ModelProto, second: onnx.ModelProto, sparsity: float, data: Arrays, **options
) -> None:
    """Both twins compute the same function; pruned, they keep the same channels of every layer
    and still compute the same function."""
    held_out = {k: v[::-1] + 0.1 for k, v in data.items()}
    assert_same_outputs(run(second, held_out), run(first, held_out), rtol=1e-5)
    kept, results = [], []
    for proto in (first, second):
        model, plan = calibrated(proto, sparsity, data, **options)
        kept.append(kept_channels(plan))
        results.append(outputs(model, held_out))
    assert kept[0] == kept[1]
    assert any(len(k) < 8 for k in kept[0].values())  # channels did go
    assert_same_outputs(results[1], results[0], rtol=1e-4)


CHOICES = [("sparsegpt", "sequential"), ("sparsegpt", "one-pass"), ("wanda", "one-pass")]


@pytest.mark.parametrize(("criterion", "mode"), CHOICES)
def test_rescaled_producer_twin_loses_the_same_channels(criterion: str, mode: str) -> None:
    """The first Conv's output channels times 0.01..100, the second Conv's inputs divided."""
    twins_choose_alike(twin_cnn(), twin_cnn({0: SCALES}), 0.4, cnn_samples(44, 16),
                       criterion=criterion, mode=mode)  # fmt: skip


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_batchnorm_folded_or_not_loses_the_same_channels(mode: str) -> None:
    """A BatchNorm (gammas 0.01..100) after the first Conv, or folded into it."""
    twins_choose_alike(twin_cnn(bn="unfolded"), twin_cnn(bn="folded"), 0.4, cnn_samples(46, 16),
                       mode=mode)  # fmt: skip


def test_twins_do_differ_for_weight_magnitude() -> None:
    """The twins are a real test: the weight norms alone choose differently."""

    def kept(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
        plan = pipeline.prune(ir.serde.deserialize_model(proto), 0.4, structured=True)[1].channels
        return kept_channels(plan)

    assert kept(twin_cnn()) != kept(twin_cnn({0: SCALES}))
    assert kept(twin_cnn(bn="unfolded")) != kept(twin_cnn(bn="folded"))


def test_rescaled_consumer_twin_loses_the_same_channels() -> None:
    """The second Conv's output channels times 0.01..100, the third Conv's inputs divided: the
    second Conv reads the first's channels, so their scores must not see its output scale."""
    twins_choose_alike(twin_cnn(), twin_cnn({1: SCALES}), 0.4, cnn_samples(44, 16),
                       criterion="sparsegpt", mode="one-pass")  # fmt: skip


def bn_head(bn: str) -> onnx.ModelProto:
    """Gemm 6 -> 8, Relu, Gemm 8 -> 2, then a BatchNorm of gammas 30 and 0.03 (or folded into
    the second Gemm). Hidden channels 0-3 feed mostly output 0, 4-7 mostly output 1."""
    rng = np.random.default_rng(61)
    w1, b1 = rng.standard_normal((8, 6)), rng.standard_normal(8) + 1
    w2 = np.array([[1.0] * 4 + [0.3] * 4, [0.3] * 4 + [1.0] * 4])
    w2 = w2 * rng.choice([-1, 1], (2, 8)) * rng.uniform(0.8, 1.2, (2, 8))
    b2 = rng.standard_normal(2)
    gamma, var = np.array([30.0, 0.03]), np.array([1.0, 2.0])
    beta, mean = rng.standard_normal(2), rng.standard_normal(2)
    if bn == "folded":
        factor = gamma / np.sqrt(var + 1e-5)
        w2, b2 = w2 * factor[:, None], (b2 - mean) * factor + beta
    b = GraphBuilder(0)

    def param(array: np.ndarray, name: str) -> str:
        return b.weight(array.shape, name=name, array=array.astype(np.float32))

    x = b.input("x", ["N", 6])
    h = b.node("Relu", [b.node("Gemm", [x, param(w1, "W1"), param(b1, "B1")], transB=1)])
    if bn == "unfolded":
        h = b.node("Gemm", [h, param(w2, "W2"), param(b2, "B2")], transB=1)
        b.node("BatchNormalization", [h, param(gamma, "gamma"), param(beta, "beta"),
                                      param(mean, "mean"), param(var, "var")], out="y")  # fmt: skip
    else:
        b.node("Gemm", [h, param(w2, "W2"), param(b2, "B2")], out="y", transB=1)
    b.output("y", shape=["N", 2])
    return b.model()


def test_batchnorm_after_the_reading_layer_folded_or_not_loses_the_same_channels() -> None:
    rng = np.random.default_rng(62)
    data = {"x": rng.standard_normal((64, 6)).astype(np.float32)}
    twins_choose_alike(bn_head("unfolded"), bn_head("folded"), 0.5, data)


# ---------------------------------------------------------------------------------------------
# 5. exact counts, options, validity, determinism, the zero-channel invariant


def counted_params(path: Path) -> int:
    """Parameters of the stored 2+-D weights that Conv, Gemm and MatMul read, from the file."""
    proto = onnx.load(str(path))
    tensors = {t.name: t for t in proto.graph.initializer}
    names = {
        name
        for node in proto.graph.node
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for name in node.input[:2]
        if name in tensors and len(tensors[name].dims) >= 2
    }
    return sum(int(np.prod(tensors[n].dims)) for n in names)


def counted_macs(path: Path) -> int:
    """MACs of a Conv/Gemm-only model for one sample, from the file's inferred shapes."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    tensors = {t.name: t for t in proto.graph.initializer}
    shapes = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim
        ]
        for v in [*proto.graph.value_info, *proto.graph.output]
    }
    total = 0
    for node in proto.graph.node:
        assert node.op_type not in ("MatMul", "ConvTranspose")
        if node.op_type in ("Conv", "Gemm"):
            size = int(np.prod(tensors[node.input[1]].dims))
            positions = np.prod(shapes[node.output[0]][2:]) if node.op_type == "Conv" else 1
            total += size * int(positions)
    return total


def test_achieved_sparsity_is_what_the_file_holds(tmp_path: Path) -> None:
    proto = combined()
    src = save(proto, tmp_path / "in.onnx")
    data = {"x": np.random.default_rng(51).standard_normal((12, 3, 8, 8)).astype(np.float32)}
    out = tmp_path / "params.onnx"
    _, plan = calibrated(src, 0.4, data, output=out)
    before, after = plan.params
    assert before == counted_params(src) and after == counted_params(out)
    assert plan.achieved == pytest.approx(1 - after / before) and plan.achieved >= 0.4
    # the shortest prefix: without its last channel the target would not have been reached
    largest = 0
    for c in np.flatnonzero(plan.removed):
        alone = np.zeros_like(plan.removed)
        alone[c] = True
        largest = max(largest, before - ChannelPlan(plan.graph, alone, plan.counted).params[1])
    assert before - after - largest < round(0.4 * before)
    out = tmp_path / "macs.onnx"
    _, plan = calibrated(src, 0.4, data, output=out, target="macs")
    assert plan.metric == "macs"
    before, after = plan.macs
    assert before == counted_macs(src) and after == counted_macs(out)
    assert plan.achieved == pytest.approx(1 - after / before) and plan.achieved >= 0.4


def test_round_to_and_min_keep(tmp_path: Path) -> None:
    b = GraphBuilder(52)
    h = b.input("x", ["N", 3, 6, 6])
    for c_in, c_out in ((3, 32), (32, 24), (24, 16)):
        h = b.node("Relu", [b.node("Conv", [h, b.weight((c_out, c_in, 3, 3), scale=0.3)],
                                   pads=[1] * 4)])  # fmt: skip
    b.node("Conv", [h, b.weight((2, 16, 1, 1))], out="y")
    b.output("y", shape=["N", 2, 6, 6])
    proto = b.model()
    data = {"x": np.random.default_rng(53).standard_normal((8, 3, 6, 6)).astype(np.float32)}
    _, plan = calibrated(proto, 0.5, data, round_to=8)
    kept = [plan.kept_of(layer.classes) for layer in plan.graph.layers]
    assert all(k % 8 == 0 and k > 0 for k in kept[:3]), kept
    assert plan.achieved >= 0.5
    _, plan = calibrated(proto, 0.3, data, min_keep=0.75)
    for layer in plan.graph.layers:
        n = len(np.unique(layer.classes))
        assert plan.kept_of(np.unique(layer.classes)) >= math.ceil(0.75 * n)
    assert plan.achieved >= 0.3


def transformer_samples(seed: int, n: int) -> Arrays:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 6)).astype(np.float32)}


@pytest.mark.parametrize("name", ["combined", "transformer"])
def test_every_criterion_and_mode_is_valid_and_deterministic(tmp_path: Path, name: str) -> None:
    if name == "combined":
        proto = combined()
        data = {"x": np.random.default_rng(54).standard_normal((10, 3, 8, 8)).astype(np.float32)}
    else:  # attention's Q and K dims: read by no weight
        proto = random_transformer(1)
        data = transformer_samples(55, 10)
    src = save(proto, tmp_path / "in.onnx")
    for criterion, mode in itertools.product(("sparsegpt", "wanda", "magnitude"),
                                             ("one-pass", "sequential")):  # fmt: skip
        files = []
        for attempt in range(2):
            out = tmp_path / f"{criterion}-{mode}-{attempt}.onnx"
            _, report = calibrated_run(src, 0.3, data, output=out, criterion=criterion, mode=mode)
            files.append(out.read_bytes())
        plan = report.channels
        assert report.calibration is not None
        assert (report.calibration.criterion, report.calibration.mode) == (criterion, mode)
        assert report.calibration.samples == 10
        assert plan.achieved >= 0.3 and plan.removed.any()
        assert files[0] == files[1], (criterion, mode)
        got = checked(out, data)
        assert [g.shape for g in got] == [e.shape for e in run(proto, data)]
        assert all(math.isfinite(e) for e in report.errors.values())


DEAD = {
    "gemm_mlp": gemm_mlp,
    "mlp_transformer": mlp_transformer,
    "squeeze_excite": squeeze_excite,
    "combined": combined,
    **{f"random_cnn_{s}": (lambda s=s: random_cnn(s)) for s in range(4)},
    **{f"random_transformer_{s}": (lambda s=s: random_transformer(s)) for s in range(2)},
}


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("name", sorted(DEAD))
def test_dead_channels_go_first_and_outputs_stay(name: str, mode: str) -> None:
    """Channels whose producers are all zero cost nothing: asked for exactly their share, the
    calibrated choice removes only channels that cost nothing on the samples, and the outputs
    stay the dense ones. (Besides the killed ones, a channel its ReLU silences on every sample
    costs nothing too: the two tie, and either may go.)"""
    model, graph = analyse(DEAD[name]())
    removed = choose(graph, fraction=0.3, seed=1)
    kill(graph, removed)
    dead = ir.serde.serialize_model(model)
    share = ChannelPlan(graph, removed, counted_weights(model, graph)).achieved
    data = batch_feeds(dead, 16, seed=2)
    pruned, plan = calibrated(dead, share, data, mode=mode)
    assert plan.graph.n_classes == graph.n_classes  # the same analysis, the same class numbers
    assert plan.achieved >= share - 1e-12
    extra = plan.removed & ~removed
    if extra.any():  # silent on the samples: killing them too changes nothing there
        silenced, again = analyse(dead)
        kill(again, extra)
        assert_same_outputs(outputs(silenced, data), run(dead, data), rtol=1e-6)
    else:
        np.testing.assert_array_equal(plan.removed, removed)
        held_out = batch_feeds(dead, 4, seed=3)
        assert_same_outputs(outputs(pruned, held_out), run(dead, held_out), rtol=1e-4)
    assert_same_outputs(outputs(pruned, data), run(dead, data), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 6. calibration beats magnitude on the digits model


def digits_accuracy(model: ir.Model, val: Arrays) -> float:
    logits = outputs(model, {"input": val["input"]})[0]
    return float((logits.argmax(axis=1) == val["labels"]).mean())


@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
def test_digits_calibrated_channels_keep_accuracy(mode: str) -> None:
    source = MODELS_DIR / "digits_cnn.onnx"
    if not source.exists():
        pytest.skip("models/digits_cnn.onnx is not there")
    calib = dict(np.load(MODELS_DIR / "digits_calib.npz"))
    val = dict(np.load(MODELS_DIR / "digits_val.npz"))
    magnitude, plain = pipeline.prune(source, 0.5, structured=True)
    model, plan = calibrated(source, 0.5, calib, mode=mode)
    assert plan.achieved >= 0.5 and plain.channels.achieved >= 0.5
    dense = digits_accuracy(ir.serde.deserialize_model(onnx.load(str(source))), val)
    low, high = digits_accuracy(magnitude, val), digits_accuracy(model, val)
    assert high >= 0.98 and high > low, (dense, low, high)


# ---------------------------------------------------------------------------------------------
# 7. the command line


@pytest.fixture
def digits(tmp_path: Path) -> tuple[Path, Path, Path]:
    source = MODELS_DIR / "digits_cnn.onnx"
    if not source.exists():
        pytest.skip("models/digits_cnn.onnx is not there")
    calib = np.load(MODELS_DIR / "digits_calib.npz")
    val = np.load(MODELS_DIR / "digits_val.npz")
    return (
        source,
        npz(tmp_path / "calib.npz", input=calib["input"][:64], labels=calib["labels"][:64]),
        npz(tmp_path / "val.npz", input=val["input"][:64], labels=val["labels"][:64]),
    )


def test_cli_structured_calibration_writes_a_valid_model(tmp_path: Path, digits) -> None:
    source, calib, val = digits
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke(source, "--structured", "-s", "0.3", "--calibration", calib,
                    "--device", "cpu", "-o", out, "--report", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "channels" in result.output and "sparsegpt" in result.output
    got = checked(out, {"input": np.load(val)["input"]})
    assert got[0].shape == (64, 10)
    data = json.loads(report.read_text())
    assert data["structured"] and data["criterion"] == "sparsegpt"
    assert data["calibration"]["samples"] == 64 and data["calibration"]["mode"] == "sequential"
    assert data["params"] == {"before": counted_params(source), "after": counted_params(out)}
    assert data["achieved_sparsity"] >= 0.3 and data["channels_removed"] > 0
    assert data["output_errors"] and all(math.isfinite(e) for e in data["output_errors"].values())


def test_cli_heads_without_structured_is_a_one_line_error(tmp_path: Path, digits) -> None:
    source, calib, _ = digits
    out = tmp_path / "out.onnx"
    for extra in ([], ["--calibration", calib]):
        result = invoke(source, "-s", "0.3", "--heads", *extra, "-o", out)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), result.stderr
        assert "--structured" in lines[0] and "Traceback" not in result.output
        assert not out.exists()


def test_cli_sweep_structured_with_calibration(tmp_path: Path, digits) -> None:
    source, calib, val = digits
    report = tmp_path / "sweep.json"
    result = invoke("sweep", source, "--structured", "--data", val, "--calibration", calib,
                    "--sparsities", "0.3", "--device", "cpu", "--report", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(report.read_text())["rows"]}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        row = rows[f"{criterion}+calibration"]
        assert row["error"] is None and row["achieved"] >= 0.3, row
        assert row["accuracy"] is not None and row["accuracy"] >= 0.9, row


@pytest.mark.parametrize("target", ["params", "macs"])
def test_class_costs_are_what_removing_each_class_alone_saves(target: str) -> None:
    """The per-cost ranking divides by these: each equals the drop in the plan's own count."""
    model, graph = analyse(combined())
    counted = counted_weights(model, graph)
    costs = class_costs(graph, counted, target)
    nothing = ChannelPlan(graph, np.zeros(graph.n_classes, dtype=bool), counted)
    before = (nothing.macs if target == "macs" else nothing.params)[0]
    for c in np.flatnonzero(graph.produced):
        alone = np.zeros(graph.n_classes, dtype=bool)
        alone[c] = True
        plan = ChannelPlan(graph, alone, counted)
        after = (plan.macs if target == "macs" else plan.params)[1]
        assert costs[c] == pytest.approx(before - after)


def test_per_cost_ranking_prefers_cheap_error_per_saving() -> None:
    """Equal scores: per_cost removes the channels that save the most first."""
    model, graph = analyse(random_cnn(1))
    scores = np.ones(graph.n_classes)
    plain = plan_channels(model, graph, 0.2, scores=scores)
    costly = plan_channels(model, graph, 0.2, scores=scores, per_cost=True)
    costs = class_costs(graph, costly.counted, "params")
    assert len(np.unique(costs[graph.prunable])) > 1
    assert costs[costly.removed].max() == costs[graph.prunable].max()
    assert costs[costly.removed].mean() > costs[plain.removed].mean()
    assert costly.removed.sum() < plain.removed.sum()


def test_inverse_factor_of_a_slightly_indefinite_matrix() -> None:
    """float32 sums of near-constant inputs can leave C with a negative eigenvalue that no
    per-column damping fixes: an identity term joins until the factor exists."""
    rng = np.random.default_rng(91)
    a = rng.standard_normal((6, 6))
    c = a @ a.T
    c[0, :] = c[:, 0] = 0.0
    c[0, 0] = -1e-7  # a constant input's variance after cancellation
    c[1, 0] = c[0, 1] = 1e-4
    upper = reconstruct.inverse_factor(c, 0.01)
    assert np.all(np.isfinite(upper))
    cov = reconstruct.covariance(c + 4.0, np.full(6, 2.0))
    assert np.all(np.diag(cov) >= 0)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("structured", [True, False])
def test_near_constant_channels_prune(tmp_path: Path, mode: str, structured: bool) -> None:
    """Channels a large bias holds nearly constant (saturated activations, SE paths) once made
    the covariance indefinite and calibration raise LinAlgError."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    b1 = np.zeros(16, np.float32)
    w1[:4] *= 1e-4
    b1[:4] = 3.0
    b = GraphBuilder(0)
    x = b.input("x", ["N", 8, 16, 16])
    h = b.node("Conv", [x, b.weight(w1.shape, name="W1", array=w1), b.weight((16,), array=b1)])
    h = b.node("Relu", [h])
    b.node("Conv", [h, b.weight((8, 16, 1, 1), name="W2")], out="y")
    b.output("y")
    data = {"x": rng.standard_normal((8, 8, 16, 16)).astype(np.float32)}
    source = save(b.model(), tmp_path / "in.onnx")
    _, report = pipeline.prune(
        source, 0.3, structured=structured, output=tmp_path / "o.onnx", force=True,
        calibration=Calibration(data=data, device="cpu", mode=mode),
    )  # fmt: skip
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)
    if structured:  # the constant channels cost nothing once their mean is in the bias
        plan = report.channels
        (first,) = [layer for layer in plan.graph.layers if layer.member.value.name == "W1"]
        assert plan.removed[first.classes[:4]].all() and plan.achieved >= 0.3


def test_selection_steps_follow_the_layers_sizes() -> None:
    """As many steps as the factorization budget allows: the most for small models, a few for
    ResNet-50-sized layers, one for wanda (its scores ignore what else goes); always fixed by the
    model, never by the clock, so reruns write the same file."""
    from onnxprune.scoring import channels as calibration_channels
    from onnxprune.scoring import importance

    class Sized:
        def __init__(self, k: int) -> None:
            self.name = f"w{k}"
            self.design = type("D", (), {"in_features": k})()

    class Stats:
        def __init__(self, found) -> None:
            self.layers = {c.name: None for c in found}

    small = [Sized(64), Sized(128)]
    big = [Sized(4608)] * 3 + [Sized(2304)] * 6 + [Sized(1152)] * 4
    sparsegpt, wanda = importance.get("sparsegpt"), importance.get("wanda")

    def steps(criterion, mode, found, given=None):
        return calibration_channels.selection_steps(criterion, mode, given, found, Stats(found))

    assert steps(sparsegpt, "sequential", small) == calibration_channels.MAX_STEPS
    assert steps(sparsegpt, "one-pass", small) == calibration_channels.MAX_STEPS
    assert 4 <= steps(sparsegpt, "sequential", big) <= 8
    assert steps(sparsegpt, "one-pass", big) == 1
    assert steps(wanda, "sequential", small) == 1
    assert steps(sparsegpt, "sequential", big, given=3) == 3


def test_sequential_pairs_conv_rows_chunked_at_other_samples(tmp_path: Path, monkeypatch) -> None:
    """A Conv's rows come in chunks of as many samples as its patch budget holds: the pruned
    input (fewer channels) is cut at other samples than the dense one, and the pairs must still
    line up sample by sample (ResNet-50 raised a shape mismatch in sequential mode)."""
    from onnxprune.ops import conv as conv_ops

    proto = random_cnn(2)
    (name,) = [i.name for i in proto.graph.input]
    shape = [d.dim_value or 6 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    data = {name: np.random.default_rng(3).standard_normal(shape).astype(np.float32)}
    source = save(proto, tmp_path / "in.onnx")
    reference, plan = calibrated(source, 0.4, data, batch_size=6)
    for budget in (600, 1200, 2400, 4800, 9600):  # one sample to a few per chunk, layer by layer
        monkeypatch.setattr(conv_ops, "PATCH_ELEMENTS", budget)
        chunked, again = calibrated(source, 0.4, data, batch_size=6)
        assert np.array_equal(plan.removed, again.removed)
        assert_same_outputs(outputs(chunked, data), outputs(reference, data), rtol=1e-4)
