"""Calibrated pruning: designs, statistics, SparseGPT, bias correction, counts, invariance, errors.

Calibration runs on the CPU here (exact comparisons, byte-identical reruns) except in one CLI
test that keeps the default --device auto.

Every reference here is written independently of onnxprune: the ONNX reference implementation for
what a layer computes, a loop-per-position im2col for the statistics, plain sequential OBS with
explicit inverses for SparseGPT.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder, mlp, run, save
from click.testing import CliRunner, Result
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxprune
from onnxprune import ops
from onnxprune.calibration import Calibration, capture, load_samples
from onnxprune.calibration import solvers as reconstruct
from onnxprune.cli import main
from onnxprune.ops import conv as conv_ops
from onnxprune.options import Selection
from onnxprune.runtime import select_runtime
from onnxprune.scoring import importance
from onnxprune.weights import find_weights

Arrays = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# helpers


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored(path: Path) -> Arrays:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def ir_weights(model: ir.Model, names: Sequence[str]) -> Arrays:
    """The named initializers of an in-memory model (the pruned weights keep their names)."""
    out = {}
    for name in names:
        value = model.graph.initializers[name]
        assert value.const_value is not None
        out[name] = value.const_value.numpy()
    return out


def checked_run(path: Path, feeds: Arrays) -> list[np.ndarray]:
    """The full checker passes on a written model, and ONNX Runtime runs it."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    outputs = run(path, feeds)
    assert all(np.isfinite(o).all() for o in outputs)
    return outputs


def prune_calibrated(
    tmp_path: Path,
    proto: onnx.ModelProto,
    sparsity: float,
    data: Arrays,
    *,
    out: str = "out.onnx",
    min_keep: str | None = None,
    pattern: str | None = None,
    **options,
) -> tuple[Path, onnxprune.Report]:
    src = tmp_path / "model.onnx"
    if not src.exists():
        save(proto, src)
    path = tmp_path / out
    _, report = onnxprune.prune(
        src,
        Selection(sparsity, min_keep=min_keep, pattern=pattern),
        calibration=Calibration(data=data, **{"device": "cpu", **options}),
        output=path,
        force=True,
    )
    return path, report


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# 1. designs against the ONNX reference implementation


def one_node(
    op: str,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    *,
    seed: int,
    bias: int | None = None,
    weight_first: bool = False,
    transposed: bool = False,
    **attrs,
) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    """A model of one node reading input x and a weight (stored transposed, behind a Transpose
    node, with `transposed`); (model, x, bias or None)."""
    b = GraphBuilder(seed)
    x = b.input("x", list(x_shape))
    w = b.weight(tuple(w_shape)[::-1] if transposed else w_shape, name="W")
    if transposed:
        w = b.node("Transpose", [w], perm=[1, 0])
    inputs = [w, x] if weight_first else [x, w]
    bias_array = None
    if bias is not None:
        bias_array = b.rng.standard_normal(bias).astype(np.float32)
        inputs.append(b.weight((bias,), name="B", array=bias_array))
    b.node(op, inputs, out="y", **attrs)
    b.output("y")
    x_array = b.rng.standard_normal(x_shape).astype(np.float32)
    return b.model(), x_array, bias_array


def conv(x_shape: Sequence[int], w_shape: Sequence[int], **attrs: object) -> dict:
    return {"op": "Conv", "x_shape": x_shape, "w_shape": w_shape, **attrs}


DESIGN_CASES = {
    "conv-plain": conv((2, 3, 6, 5), (4, 3, 3, 3), bias=4),
    "conv-strides-pads-dilations": conv(
        (2, 3, 9, 8), (5, 3, 3, 2), strides=[2, 3], pads=[1, 0, 2, 1], dilations=[2, 1], bias=5
    ),
    "conv-grouped": conv((2, 6, 7, 7), (4, 3, 2, 3), group=2, strides=[1, 2], pads=[1, 1, 0, 2]),
    "conv-depthwise": conv((3, 4, 6, 6), (8, 1, 3, 3), group=4, pads=[1, 1, 1, 1], bias=8),
    "conv-same-upper": conv(
        (2, 3, 7, 6), (4, 3, 3, 2), auto_pad="SAME_UPPER", strides=[2, 2], dilations=[1, 2]
    ),
    "conv-same-lower": conv(
        (2, 4, 7, 6), (6, 2, 4, 3), auto_pad="SAME_LOWER", strides=[2, 3], group=2
    ),
    "conv-valid": conv((2, 3, 7, 6), (4, 3, 3, 2), auto_pad="VALID", strides=[2, 1], bias=4),
    "conv-1d": conv((3, 4, 11), (5, 4, 3), strides=[2], pads=[2, 1], dilations=[2], bias=5),
    "conv-3d": conv((2, 2, 5, 4, 6), (3, 2, 2, 3, 2), strides=[1, 2, 2], pads=[1, 0, 1, 0, 1, 1]),
    "gemm-nn": {"op": "Gemm", "x_shape": (5, 7), "w_shape": (7, 4), "bias": 4},
    "gemm-nt": {"op": "Gemm", "x_shape": (5, 7), "w_shape": (4, 7), "transB": 1, "bias": 4},
    "gemm-tn": {"op": "Gemm", "x_shape": (7, 5), "w_shape": (7, 4), "transA": 1},
    "gemm-tt": {"op": "Gemm", "x_shape": (7, 5), "w_shape": (4, 7), "transA": 1, "transB": 1},
    # the constant is A: Y = W X, the outputs are W's rows, the inputs X's columns
    "gemm-constant-a": {"op": "Gemm", "x_shape": (7, 5), "w_shape": (4, 7), "weight_first": True},
    "gemm-constant-a-trans": {
        "op": "Gemm",
        "x_shape": (5, 7),
        "w_shape": (7, 4),
        "weight_first": True,
        "transA": 1,
        "transB": 1,
    },
    "matmul-right-3d": {"op": "MatMul", "x_shape": (2, 3, 6), "w_shape": (6, 4)},
    "matmul-right-2d": {"op": "MatMul", "x_shape": (5, 6), "w_shape": (6, 4)},
    "matmul-left": {"op": "MatMul", "x_shape": (2, 6, 5), "w_shape": (4, 6), "weight_first": True},
    "matmul-via-transpose": {
        "op": "MatMul",
        "x_shape": (2, 3, 6),
        "w_shape": (6, 4),
        "transposed": True,
    },
    "gemm-via-transpose": {
        "op": "Gemm",
        "x_shape": (5, 6),
        "w_shape": (4, 6),
        "transB": 1,
        "transposed": True,
        "bias": 4,
    },
}


def design_of_single(proto: onnx.ModelProto) -> tuple[ops.Design, np.ndarray]:
    model = to_ir(proto)
    weights = find_weights(model).weights
    assert [w.name for w in weights] == ["W"]
    designs, why = ops.design_of(weights[0])
    assert why is None, why
    assert len(designs) == 1
    return designs[0], np.array(weights[0].numpy())


def layer_rows(d: ops.Design, x: np.ndarray) -> np.ndarray:
    chunks = d.rows(x)
    assert all(c.ndim == 3 and c.shape[0] == d.groups for c in chunks)
    assert all(c.shape[2] == d.in_features for c in chunks)
    return np.concatenate(chunks, axis=1)


def reference_per_group(d: ops.Design, y: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The node's output as [G, n, O]: the output-feature axis last, rows in design order."""
    flat = np.moveaxis(y, d.out_axis, -1).reshape(-1, d.groups * d.out_features)
    if bias is not None:
        flat = flat - bias
    return flat.reshape(-1, d.groups, d.out_features).transpose(1, 0, 2)


@pytest.mark.parametrize("case", DESIGN_CASES)
def test_design_reproduces_the_reference_output(case: str) -> None:
    spec = dict(DESIGN_CASES[case])
    seed = sorted(DESIGN_CASES).index(case)
    proto, x, bias = one_node(
        spec.pop("op"), spec.pop("x_shape"), spec.pop("w_shape"), seed=seed, **spec
    )
    d, w = design_of_single(proto)  # w as stored (transposed, for the via-Transpose cases)
    expected = reference_per_group(d, ReferenceEvaluator(proto).run(None, {"x": x})[0], bias)
    rows = layer_rows(d, x).astype(np.float64)
    matrix = d.to_matrix(w)
    assert matrix.shape == (d.groups, d.out_features, d.in_features)
    got = np.matmul(rows, matrix.astype(np.float64).transpose(0, 2, 1))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    back = d.from_matrix(matrix)
    assert back.shape == w.shape and back.dtype == w.dtype
    np.testing.assert_array_equal(back, w)
    # the activation the design reads is the node's input, not the weight
    assert d.activation.name == "x"


def test_conv_rows_are_the_same_when_built_a_sample_at_a_time(monkeypatch) -> None:
    spec = dict(DESIGN_CASES["conv-strides-pads-dilations"])
    proto, x, _ = one_node(spec.pop("op"), spec.pop("x_shape"), spec.pop("w_shape"), seed=3, **spec)
    d, _ = design_of_single(proto)
    whole = layer_rows(d, x)
    monkeypatch.setattr(conv_ops, "PATCH_ELEMENTS", 1)
    chunks = d.rows(x)
    assert len(chunks) == x.shape[0]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)


def test_gemm_alpha_is_part_of_the_design() -> None:
    """Gemm computes alpha * A'B' + beta * C: rows @ W^T must be the output less beta * C."""
    proto, x, bias = one_node(
        "Gemm", (5, 7), (4, 7), seed=11, transB=1, bias=4, alpha=0.5, beta=2.0
    )
    assert bias is not None
    d, w = design_of_single(proto)
    y = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    expected = reference_per_group(d, y, 2.0 * bias)
    got = np.matmul(layer_rows(d, x).astype(np.float64), d.to_matrix(w).transpose(0, 2, 1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_matmul_left_with_a_vector_activation() -> None:
    b = GraphBuilder(12)
    x = b.input("x", ["N", 16])
    v = b.node("ReduceMean", [x], axes=[0], keepdims=0)
    b.node("MatMul", [b.weight((8, 16), name="W"), v], out="y")
    b.output("y")
    proto = b.model()
    data = {"x": (np.random.default_rng(13).standard_normal((30, 16)) + 0.5).astype(np.float32)}
    want = run(proto, data)[0]
    calibrated, _ = onnxprune.prune(
        to_ir(proto),
        0.5,
        calibration=Calibration(data=data, criterion="sparsegpt", batch_size=30, device="cpu"),
    )
    plain, _ = onnxprune.prune(to_ir(proto), 0.5)
    # One activation row: the weights kept can carry the whole output, which they do only
    # when the design reads the weight on the left with the vector as its single row.
    err = np.abs(run(ir.serde.serialize_model(calibrated), data)[0] - want).max()
    err_plain = np.abs(run(ir.serde.serialize_model(plain), data)[0] - want).max()
    assert err < 0.05 * err_plain


# ---------------------------------------------------------------------------------------------
# 2. Gram accumulation against a brute-force im2col


def brute_im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    groups: int,
) -> np.ndarray:
    """Rows [G, n, K] of a 2-D Conv input, one output position at a time; row order (sample,
    output position), column order (kernel position, channel in the group)."""
    n, c, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    cg = c // groups
    rows: list[list[list[float]]] = [[] for _ in range(groups)]
    for s in range(n):
        for oh in range(out_h):
            for ow in range(out_w):
                for g in range(groups):
                    row = []
                    for i in range(kh):
                        for j in range(kw):
                            ih = oh * sh - top + i * dh
                            iw = ow * sw - left + j * dw
                            inside = 0 <= ih < height and 0 <= iw < width
                            for ch in range(g * cg, (g + 1) * cg):
                                row.append(float(x[s, ch, ih, iw]) if inside else 0.0)
                    rows[g].append(row)
    return np.array(rows, dtype=np.float64)


def two_conv_model() -> tuple[onnx.ModelProto, dict, dict]:
    """Conv -> Relu -> grouped Conv; the Relu output is a graph output too, to read it back."""
    b = GraphBuilder(5)
    x = b.input("x", ["N", 4, 6, 5])
    first = {"kernel": (3, 2), "strides": (2, 1), "pads": (1, 0, 1, 1), "dilations": (1, 2)}
    second = {"kernel": (2, 2), "strides": (1, 1), "pads": (0, 1, 1, 0), "dilations": (1, 1)}
    c1 = b.node(
        "Conv",
        [x, b.weight((6, 4, 3, 2), name="W1"), b.weight((6,), name="B1")],
        strides=list(first["strides"]),
        pads=list(first["pads"]),
        dilations=list(first["dilations"]),
    )
    r1 = b.node("Relu", [c1], out="r1")
    b.node(
        "Conv",
        [r1, b.weight((4, 3, 2, 2), name="W2")],
        out="y",
        group=2,
        pads=list(second["pads"]),
    )
    b.output("y")
    b.output("r1")
    return b.model(), {**first, "groups": 1}, {**second, "groups": 2}


def test_gram_sums_and_rows_match_brute_force_im2col() -> None:
    proto, first, second = two_conv_model()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((7, 4, 6, 5)) + 0.3).astype(np.float32)
    model = to_ir(proto)
    weights = find_weights(model).weights
    assert [w.name for w in weights] == ["W1", "W2"]
    data = load_samples(model, Calibration(data={"x": x}, batch_size=3))
    assert [len(next(iter(b.values()))) for b in data.batches] == [3, 3, 1]
    runtime = select_runtime("cpu")
    stats = capture.collect(model, weights, data, runtime, budget_bytes=1 << 30)
    assert stats.missing == [] and stats.passes == 1 and stats.samples == 7
    r1 = run(proto, {"x": x})[1]
    for name, activation, conf in (("W1", x, first), ("W2", r1, second)):
        rows = brute_im2col(activation, **conf)
        layer = stats.layers[name]
        assert layer.rows == rows.shape[1]
        expected_gram = np.matmul(rows.transpose(0, 2, 1), rows)
        scale = float(np.abs(expected_gram).max())  # float32 products: errors of ~1e-7 of it
        np.testing.assert_allclose(layer.gram, expected_gram, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(layer.sums, rows.sum(axis=1), rtol=1e-6, atol=1e-6)
    # a budget that holds one layer at a time: two passes, the same sums
    split = capture.collect(model, weights, data, runtime, budget_bytes=1)
    assert split.passes == 2
    for name in ("W1", "W2"):
        np.testing.assert_allclose(split.layers[name].gram, stats.layers[name].gram, rtol=1e-12)
        np.testing.assert_allclose(split.layers[name].sums, stats.layers[name].sums, rtol=1e-12)
        assert split.layers[name].rows == stats.layers[name].rows


def test_split_passes_respects_the_budget() -> None:
    assert capture.split_passes([4, 4, 4], 8) == [[0, 1], [2]]
    assert capture.split_passes([10, 1, 1], 4) == [[0], [1, 2]]
    assert capture.split_passes([3, 3], 1) == [[0], [1]]


# ---------------------------------------------------------------------------------------------
# 3. SparseGPT against plain sequential OBS


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + damp * diag(H), each diagonal floored at 1e-6 of the mean (reconstruct.py's rule)."""
    diagonal = np.maximum(np.diag(h), 1e-6 * float(np.mean(np.diag(h))))
    return h + damp * np.diag(diagonal)


def obs_saliency(w: np.ndarray, hd: np.ndarray, q: int) -> np.ndarray:
    """w[:, q]^2 / [H_F^-1]_qq, F the columns from q on: OBS's cost of removing column q."""
    return np.square(w[:, q]) / np.linalg.inv(hd[q:, q:])[0, 0]


def obs_reference(
    w: np.ndarray,
    h: np.ndarray,
    damp: float,
    choose: Callable[[np.ndarray, int], np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Sequential OBS: columns left to right, each pruned weight's error spread over the columns
    not yet processed with the inverse of H restricted to them. `choose(w, q)` may set the
    mask of some columns from q on (given the weights as updated so far)."""
    hd = damped(h, damp)
    w = np.array(w, dtype=np.float64)
    mask = np.zeros(w.shape, dtype=bool)
    k = w.shape[1]
    for q in range(k):
        chosen = choose(w, q)
        if chosen is not None:
            mask[:, q : q + chosen.shape[1]] = chosen
        hinv = np.linalg.inv(hd[q:, q:])
        for r in range(w.shape[0]):
            if mask[r, q]:
                w[r, q + 1 :] -= w[r, q] / hinv[0, 0] * hinv[0, 1:]
                w[r, q] = 0.0
    return w, mask


def layer_problem(seed: int, o: int = 6, k: int = 12, n: int = 40) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) @ (np.eye(k) + 0.4 * rng.standard_normal((k, k)))
    x += rng.standard_normal(k)  # non-zero means
    w = rng.standard_normal((o, k))
    return w, x, x.T @ x / n


def output_norm(delta: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(delta @ x.T))


def test_sparsegpt_pattern_is_sequential_obs() -> None:
    w, x, h = layer_problem(1, o=6, k=12)
    hd = damped(h, 0.01)
    new, mask = reconstruct.sparsegpt(w, h, pattern=(2, 4), damp=0.01)

    def choose(current: np.ndarray, q: int) -> np.ndarray | None:
        if q % 4:
            return None
        saliency = np.stack([obs_saliency(current, hd, j) for j in range(q, q + 4)], axis=1)
        chosen = np.zeros(saliency.shape, dtype=bool)
        np.put_along_axis(chosen, np.argsort(saliency, axis=1)[:, :2], True, axis=1)
        return chosen

    expected, expected_mask = obs_reference(w, h, 0.01, choose)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(new, expected, rtol=1e-8, atol=1e-8)
    assert (mask.reshape(6, 3, 4).sum(axis=2) == 2).all()
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    # with the mask given, the reference is the same algebra
    fixed, _ = obs_reference(w, h, 0.01, lambda cur, q: mask if q == 0 else None)
    np.testing.assert_allclose(new, fixed, rtol=1e-8, atol=1e-8)
    zeroed = np.where(mask, 0.0, w)
    assert output_norm(w - new, x) <= output_norm(w - zeroed, x)


@pytest.mark.parametrize("block", [128, 12, 4], ids=["one-block", "k-block", "three-blocks"])
def test_sparsegpt_counts_are_sequential_obs(block: int) -> None:
    w, x, h = layer_problem(2, o=6, k=12)
    hd = damped(h, 0.01)
    counts = [31] if block >= 12 else [9, 12, 8]
    new, mask = reconstruct.sparsegpt(w, h, counts=counts, damp=0.01, block=block)

    def choose(current: np.ndarray, q: int) -> np.ndarray | None:
        if q % block:
            return None
        cols = range(q, min(q + block, 12))
        saliency = np.stack([obs_saliency(current, hd, j) for j in cols], axis=1)
        chosen = np.zeros(saliency.shape, dtype=bool)
        chosen.reshape(-1)[np.argsort(saliency.reshape(-1))[: counts[q // block]]] = True
        return chosen

    expected, expected_mask = obs_reference(w, h, 0.01, choose)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(new, expected, rtol=1e-8, atol=1e-8)
    assert int(mask.sum()) == sum(counts)
    assert reconstruct.block_counts(mask, block) == counts
    zeroed = np.where(mask, 0.0, w)
    assert output_norm(w - new, x) <= output_norm(w - zeroed, x)
    # the given inverse is the same as the one computed inside
    again, _ = reconstruct.sparsegpt(
        w, h, counts=counts, block=block, factor=reconstruct.inverse_factor(h, 0.01)
    )
    np.testing.assert_allclose(again, new, rtol=1e-12, atol=1e-12)


def test_damped_inverse_and_scores() -> None:
    w, _, h = layer_problem(4, o=5, k=8)
    hinv = reconstruct.damped_inverse(h, 0.01)
    np.testing.assert_allclose(hinv, np.linalg.inv(damped(h, 0.01)), rtol=1e-9, atol=1e-12)
    r = np.einsum("ok,kl,ol->o", w, h, w) + reconstruct.DELTA * (np.square(w) @ np.diag(h))
    np.testing.assert_allclose(reconstruct.output_energy(w, h), r, rtol=1e-12)
    wanda = importance.get("wanda").weight_scores(w[None], h[None], lambda g: np.eye(8))[0]
    np.testing.assert_allclose(wanda, np.square(w) * np.diag(h), rtol=1e-12)
    upper = reconstruct.inverse_factor(h, 0.01)
    np.testing.assert_array_equal(upper, np.triu(upper))  # U is upper triangular
    obs = importance.get("sparsegpt").weight_scores(w[None], h[None], lambda g: upper)[0]
    np.testing.assert_allclose(obs, np.square(w) / np.diag(hinv), rtol=1e-9)


@pytest.mark.parametrize("k", [5, 128, 129, 300])
def test_inverse_factor_on_sizes_the_recursion_splits(k: int) -> None:
    h = np.cov(np.random.default_rng(k).standard_normal((k, 2 * k + 3)))
    upper = reconstruct.inverse_factor(h, 0.01)
    np.testing.assert_allclose(
        upper.T @ upper, np.linalg.inv(damped(h, 0.01)), rtol=1e-7, atol=1e-9
    )


# ---------------------------------------------------------------------------------------------
# 4. bias correction is exact on linear models


def linear_model(kind: str) -> tuple[onnx.ModelProto, Arrays, int]:
    """One linear layer, its calibration samples (non-zero means), and its output-feature axis."""
    b = GraphBuilder(21)
    rng = np.random.default_rng(22)
    if kind == "gemm-left":  # the constant is A: Y = W X^T, outputs along axis 0
        x = b.input("x", ["N", 16])
        b.node(
            "Gemm", [b.weight((8, 16), name="W"), x, b.weight((1,), name="C")], out="y", transB=1
        )
        shape, axis = (40, 16), 0
    elif kind.startswith("gemm"):
        x = b.input("x", ["N", 16])
        inputs = [x, b.weight((8, 16), name="W")]
        if kind == "gemm-c":
            inputs.append(b.weight((8,), name="C"))
        b.node("Gemm", inputs, out="y", transB=1)
        shape, axis = (40, 16), 1
    elif kind.startswith("conv"):
        x = b.input("x", ["N", 4, 6, 6])
        inputs = [x, b.weight((6, 4, 3, 3), name="W")]
        if kind == "conv-bias":
            inputs.append(b.weight((6,), name="B"))
        b.node("Conv", inputs, out="y", pads=[1, 1, 1, 1])
        shape, axis = (24, 4, 6, 6), 1
    elif kind == "matmul-add":
        x = b.input("x", ["N", 16])
        h = b.node("MatMul", [x, b.weight((16, 8), name="W")])
        b.node("Add", [h, b.weight((8,), name="b")], out="y")
        shape, axis = (40, 16), 1
    elif kind == "matmul-left":  # W @ X on a 3-D input, outputs along axis -2
        x = b.input("x", ["N", 16, 5])
        b.node("MatMul", [b.weight((8, 16), name="W"), x], out="y")
        shape, axis = (12, 16, 5), 1
    else:  # a bare MatMul on a 3-D input: an Add must be inserted
        x = b.input("x", ["N", 5, 16])
        b.node("MatMul", [x, b.weight((16, 8), name="W")], out="y")
        shape, axis = (12, 5, 16), 2
    b.output("y")
    offsets = rng.uniform(-1.0, 2.0, shape[1:])
    data = {"x": (rng.standard_normal(shape) + offsets).astype(np.float32)}
    return b.model(), data, axis


def feature_means(y: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis]).astype(np.float64).mean(axis=0)


LINEAR = ["gemm-c", "gemm", "gemm-left", "conv-bias", "conv", "matmul-add", "matmul", "matmul-left"]


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", LINEAR)
def test_bias_correction_keeps_the_mean_output(tmp_path, kind: str, criterion: str) -> None:
    """Into the bias the layer has a place for (Conv's B, Gemm's C, the Add after a MatMul);
    a bare MatMul keeps its shift (said in the report): no node is added for it."""
    proto, data, axis = linear_model(kind)
    dense = feature_means(run(proto, data)[0], axis)
    scale = float(np.abs(dense).max())
    bare = kind in ("matmul", "matmul-left")
    means = {}
    for correct in (True, False):
        out, report = prune_calibrated(
            tmp_path,
            proto,
            0.5,
            data,
            out=f"{correct}.onnx",
            criterion=criterion,
            bias_correction=correct,
        )
        means[correct] = feature_means(checked_run(out, data)[0], axis)
        assert report.calibration.bias_corrected == int(correct and not bare)
        said = any("no bias to correct" in n for n in report.calibration.notices)
        assert said == (correct and bare)
    if bare:
        np.testing.assert_array_equal(means[True], means[False])
    else:
        np.testing.assert_allclose(means[True], dense, rtol=1e-4, atol=1e-4 * scale)
    assert np.abs(means[False] - dense).max() > 1e-2 * scale
    nodes = [n.op_type for n in onnx.load(str(tmp_path / "True.onnx")).graph.node]
    assert nodes == [n.op_type for n in proto.graph.node]  # the Add that follows is reused
    assert [o.name for o in onnx.load(str(tmp_path / "True.onnx")).graph.output] == ["y"]


def test_gemm_alpha_beta_bias(tmp_path) -> None:
    """Y = alpha A B' + beta C: the mean shift of alpha A (B - B') must reach Y unscaled."""
    b = GraphBuilder(31)
    x = b.input("x", ["N", 16])
    b.node(
        "Gemm",
        [x, b.weight((8, 16), name="W"), b.weight((8,), name="C")],
        out="y",
        transB=1,
        alpha=0.5,
        beta=2.0,
    )
    b.output("y")
    proto = b.model()
    rng = np.random.default_rng(32)
    data = {"x": (rng.standard_normal((40, 16)) + rng.uniform(-1, 2, 16)).astype(np.float32)}
    dense = feature_means(run(proto, data)[0], 1)
    out, _ = prune_calibrated(tmp_path, proto, 0.5, data, criterion="wanda")
    got = feature_means(checked_run(out, data)[0], 1)
    # today the residual is (1 - beta / alpha) = -3 times the uncorrected shift
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def two_linear(kind: str) -> tuple[onnx.ModelProto, Arrays]:
    """Two linear layers with no non-linearity between: the mean passes through both."""
    b = GraphBuilder(33)
    x = b.input("x", ["N", 16])
    if kind == "gemm":
        h = b.node("Gemm", [x, b.weight((12, 16), name="W1"), b.weight((12,))], transB=1)
        b.node("Gemm", [h, b.weight((8, 12), name="W2"), b.weight((8,))], out="y", transB=1)
    else:  # MatMuls each followed by the Add of a bias, as exporters write Linear
        h = b.node("MatMul", [x, b.weight((16, 12), name="W1")])
        h = b.node("Add", [h, b.weight((12,))])
        h = b.node("MatMul", [h, b.weight((12, 8), name="W2")])
        b.node("Add", [h, b.weight((8,))], out="y")
    b.output("y")
    rng = np.random.default_rng(34)
    data = {"x": (rng.standard_normal((40, 16)) + rng.uniform(-1, 2, 16)).astype(np.float32)}
    return b.model(), data


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_bias_correction_through_two_linear_layers(tmp_path, kind: str, mode: str) -> None:
    proto, data = two_linear(kind)
    dense = feature_means(run(proto, data)[0], 1)
    out, report = prune_calibrated(tmp_path, proto, 0.5, data, criterion="sparsegpt", mode=mode)
    assert report.calibration.bias_corrected == 2
    got = feature_means(checked_run(out, data)[0], 1)
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def test_sequential_after_an_inserted_add_on_a_graph_output(tmp_path) -> None:
    """Structured, sequential: W2's re-solve puts an Add after it (a bare MatMul) whose output
    takes the model output's name; W3, in a later segment, reads it under that name."""
    b = GraphBuilder(35)
    x = b.input("x", ["N", 16])
    h = b.node("MatMul", [x, b.weight((16, 12), name="W1")])
    h = b.node("Relu", [h])
    y = b.node("MatMul", [h, b.weight((12, 8), name="W2")], out="y")
    b.node("MatMul", [y, b.weight((8, 6), name="W3")], out="z")
    b.output("y")
    b.output("z")
    proto = b.model()
    rng = np.random.default_rng(36)
    data = {"x": (rng.standard_normal((40, 16)) + 0.5).astype(np.float32)}
    out = tmp_path / "out.onnx"
    _, report = onnxprune.prune(
        to_ir(proto),
        0.3,
        structured=True,
        calibration=Calibration(data=data, device="cpu", mode="sequential"),
        output=out,
    )
    assert report.calibration.bias_corrected >= 1
    names = [o.name for o in onnx.load(str(out)).graph.output]
    assert names == ["y", "z"]
    outputs = checked_run(out, data)
    for got, dense in zip(outputs, run(proto, data), strict=True):
        np.testing.assert_allclose(got.mean(axis=0), dense.mean(axis=0), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("op", ["MatMul", "Conv", "Gemm"])
def test_bias_of_a_float16_weight_cast_to_float(tmp_path, op: str) -> None:
    b = GraphBuilder(37)
    if op == "Conv":
        x, shape, w_shape = b.input("x", ["N", 3, 5, 5]), (10, 3, 5, 5), (4, 3, 3, 3)
    else:
        x, shape, w_shape = b.input("x", ["N", 16]), (30, 16), (8, 16)
    w = b.weight(w_shape if op != "MatMul" else w_shape[::-1], name="W", dtype=np.float16)
    w = b.node("Cast", [w], to=onnx.TensorProto.FLOAT)
    if op == "MatMul":  # with the Add of its bias, as exporters write a Linear
        h = b.node(op, [x, w])
        b.node("Add", [h, b.weight((8,))], out="y")
    else:
        b.node(op, [x, w], out="y", **({"transB": 1} if op == "Gemm" else {}))
    b.output("y")
    proto = b.model()
    rng = np.random.default_rng(38)
    data = {"x": (rng.standard_normal(shape) + 0.5).astype(np.float32)}
    out, _ = prune_calibrated(tmp_path, proto, 0.5, data, criterion="wanda")
    got = feature_means(checked_run(out, data)[0], 1)
    dense = feature_means(run(proto, data)[0], 1)
    np.testing.assert_allclose(got, dense, rtol=1e-3, atol=1e-3 * np.abs(dense).max())


def test_a_replaced_constant_node_bias_leaves_no_dead_node(tmp_path) -> None:
    b = GraphBuilder(39)
    rng = np.random.default_rng(40)
    x = b.input("x", ["N", 16])
    h = b.node("MatMul", [x, b.constant(rng.standard_normal((16, 8)).astype(np.float32))])
    b.node("Add", [h, b.constant(rng.standard_normal(8).astype(np.float32))], out="y")
    b.output("y")
    data = {"x": (rng.standard_normal((30, 16)) + 0.5).astype(np.float32)}
    out, report = prune_calibrated(tmp_path, b.model(), 0.5, data, criterion="wanda")
    assert report.calibration.bias_corrected == 1
    graph = onnx.load(str(out)).graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n.output[0] for n in graph.node if not set(n.output) & read]
    assert dead == []


# ---------------------------------------------------------------------------------------------
# 5. exact counts for every criterion and mode


def cnn_mlp(seed: int = 0, zeros: bool = False) -> onnx.ModelProto:
    """Conv-Relu-Conv(stride 2)-Relu-Flatten-Gemm-Relu-MatMul-Add; with `zeros`, some weights
    are zero already."""
    b = GraphBuilder(seed)
    rng = np.random.default_rng(seed + 100)

    def weight(shape: tuple[int, ...], name: str) -> str:
        array = rng.standard_normal(shape).astype(np.float32)
        if zeros and name in ("W1", "W3"):
            array[rng.random(shape) < 0.1] = 0
        return b.weight(shape, name=name, array=array)

    x = b.input("x", ["N", 4, 6, 6])
    h = b.node("Conv", [x, weight((8, 4, 3, 3), "W1"), b.weight((8,))], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    h = b.node("Conv", [h, weight((8, 8, 3, 3), "W2")], strides=[2, 2], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    h = b.node("Flatten", [h])
    h = b.node("Gemm", [h, weight((16, 72), "W3"), b.weight((16,))], transB=1)
    h = b.node("Relu", [h])
    h = b.node("MatMul", [h, weight((16, 10), "W4")])
    b.node("Add", [h, b.weight((10,))], out="y")
    b.output("y")
    return b.model()


CNN_WEIGHTS = ["W1", "W2", "W3", "W4"]


def cnn_data(seed: int = 0, samples: int = 20, dead: bool = False) -> Arrays:
    x = np.random.default_rng(seed).standard_normal((samples, 4, 6, 6)).astype(np.float32)
    if dead:
        x[:, 2] = 0  # one input channel is always zero: dead columns in the first Conv
    return {"x": x}


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_exact_counts_min_keep_and_determinism(tmp_path, criterion: str, mode: str) -> None:
    opts = {"criterion": criterion, "mode": mode, "batch_size": 8}
    for zeros in (False, True):
        proto = cnn_mlp(zeros=zeros)
        data = cnn_data(dead=zeros)
        save(proto, tmp_path / "model.onnx")
        original = stored(tmp_path / "model.onnx")
        total = sum(int(np.prod(d)) for d in ((8, 4, 3, 3), (8, 8, 3, 3), (16, 72), (16, 10)))
        for sparsity in (0.3, 0.75):
            out, report = prune_calibrated(tmp_path, proto, sparsity, data, **opts)
            assert report.plan.total == total
            tensors = stored(out)
            zero_count = sum(int((tensors[n] == 0).sum()) for n in CNN_WEIGHTS)
            assert zero_count == round(sparsity * total) == report.plan.pruned
            for layer in report.plan.layers:
                assert int((tensors[layer.weight.name] == 0).sum()) == layer.prune
            # zeros rank first and stay zero (sequential sparsegpt re-solves, zeros included)
            if not (criterion == "sparsegpt" and mode == "sequential"):
                for name in CNN_WEIGHTS:
                    assert (tensors[name][original[name] == 0] == 0).all(), name
            if zeros and criterion == "wanda":
                # what reads the dead channel scores zero: in each output row (wanda compares
                # within rows) pruned before anything live the row reads
                w1, before = tensors["W1"].reshape(8, -1), original["W1"].reshape(8, -1)
                dead = np.zeros((4, 3, 3), bool)
                dead[2] = True
                dead = np.broadcast_to(dead.reshape(1, -1), w1.shape)
                live_pruned = (w1 == 0) & ~dead & (before != 0)
                dead_kept = (w1 != 0) & dead
                assert not (live_pruned.any(axis=1) & dead_kept.any(axis=1)).any()
            assert checked_run(out, data)[0].shape == (20, 10)
        (tmp_path / "model.onnx").unlink()
    # --min-keep holds per layer; the same run twice writes the same bytes
    paths = []
    for name in ("a.onnx", "b.onnx"):
        out, report = prune_calibrated(
            tmp_path, proto, 0.75, data, out=name, min_keep="0.1", **opts
        )
        paths.append(out)
        tensors = stored(out)
        for layer in report.plan.layers:
            size = layer.size
            assert int((tensors[layer.weight.name] != 0).sum()) >= math.ceil(0.1 * size)
        assert sum(int((tensors[n] == 0).sum()) for n in CNN_WEIGHTS) == round(0.75 * total)
    assert digest(paths[0]) == digest(paths[1])


# ---------------------------------------------------------------------------------------------
# 6. scale invariance: the same masks for a model and its rescaled twin


def bn_model(fold: bool) -> onnx.ModelProto:
    """Conv-BN-Relu-Conv-Relu-Flatten-Gemm, or the same with BN folded into the first Conv."""
    rng = np.random.default_rng(41)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    gamma = rng.uniform(0.3, 3.0, 6) * np.where(np.arange(6) == 2, -1, 1)
    beta, mean = rng.standard_normal(6), rng.standard_normal(6)
    var, eps = rng.uniform(0.2, 4.0, 6), 1e-5
    w2 = rng.standard_normal((6, 6, 3, 3)).astype(np.float32)
    w3 = rng.standard_normal((10, 54)).astype(np.float32)
    b = GraphBuilder(0)
    x = b.input("x", ["N", 3, 6, 6])
    if fold:
        s = gamma / np.sqrt(var + eps)
        w1f = (w1.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
        b1f = ((b1 - mean) * s + beta).astype(np.float32)
        h = b.node("Conv", [x, b.weight(w1.shape, name="W1", array=w1f), b.weight((6,), array=b1f)])
    else:
        h = b.node("Conv", [x, b.weight(w1.shape, name="W1", array=w1), b.weight((6,), array=b1)])
        params = [gamma, beta, mean, var]
        h = b.node(
            "BatchNormalization",
            [h, *(b.weight((6,), array=p.astype(np.float32)) for p in params)],
            epsilon=eps,
        )
    h = b.node("Relu", [h])
    h = b.node("Conv", [h, b.weight(w2.shape, name="W2", array=w2)], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    h = b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[1, 1])
    h = b.node("Flatten", [h])
    b.node("Gemm", [h, b.weight(w3.shape, name="W3", array=w3)], out="y", transB=1)
    b.output("y")
    return b.model()


def gemm_twin(scaled: bool) -> onnx.ModelProto:
    """Gemm-Relu-Gemm-Relu-Gemm; the twin scales the first Gemm's outputs by c > 0 and the
    second Gemm's inputs by 1/c (the Relu between commutes with the scaling)."""
    rng = np.random.default_rng(51)
    w1, c1 = rng.standard_normal((16, 12)), rng.standard_normal(16)
    w2, c2 = rng.standard_normal((12, 16)), rng.standard_normal(12)
    w3 = rng.standard_normal((6, 12))
    if scaled:
        c = np.exp(rng.uniform(-1.5, 1.5, 16))
        w1, c1, w2 = w1 * c[:, None], c1 * c, w2 / c[None, :]
    b = GraphBuilder(0)

    def f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)

    h = b.input("x", ["N", 12])
    h = b.node(
        "Gemm",
        [h, b.weight((16, 12), name="W1", array=f32(w1)), b.weight((16,), array=f32(c1))],
        transB=1,
    )
    h = b.node("Relu", [h])
    h = b.node(
        "Gemm",
        [h, b.weight((12, 16), name="W2", array=f32(w2)), b.weight((12,), array=f32(c2))],
        transB=1,
    )
    h = b.node("Relu", [h])
    b.node("MatMul", [h, b.weight((12, 6), name="W3", array=f32(w3.T))], out="y")
    b.output("y")
    return b.model()


def zero_masks(proto: onnx.ModelProto, data: Arrays, names: Sequence[str], **options) -> Arrays:
    options = {"device": "cpu", **options}
    model, _ = onnxprune.prune(to_ir(proto), 0.5, calibration=Calibration(data=data, **options))
    return {n: w == 0 for n, w in ir_weights(model, names).items()}


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_bn_folded_twin_gets_the_same_masks(criterion: str) -> None:
    data = {"x": np.random.default_rng(42).standard_normal((16, 3, 6, 6)).astype(np.float32)}
    plain, folded = bn_model(fold=False), bn_model(fold=True)
    # the twins compute the same function
    np.testing.assert_allclose(run(plain, data)[0], run(folded, data)[0], rtol=1e-4, atol=1e-3)
    names = ["W1", "W2", "W3"]
    a = zero_masks(plain, data, names, criterion=criterion)
    b = zero_masks(folded, data, names, criterion=criterion)
    same_masks(a, b, criterion)
    assert sum(int(m.sum()) for m in a.values()) == round(0.5 * (162 + 324 + 540))


def same_masks(a: dict[str, np.ndarray], b: dict[str, np.ndarray], criterion: str) -> None:
    """Twins get the same masks under wanda; under sparsegpt the same count per layer (the global
    ranking divides by each output's energy), while the mask inside a layer follows the published
    choice, the layer's own output error in its own units, which a rescaled output changes."""
    for name in a:
        if criterion == "sparsegpt":
            assert int(a[name].sum()) == int(b[name].sum()), name
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_relu_rescaled_twin_gets_the_same_masks(criterion: str) -> None:
    data = {"x": np.random.default_rng(52).standard_normal((64, 12)).astype(np.float32)}
    plain, scaled = gemm_twin(False), gemm_twin(True)
    np.testing.assert_allclose(run(plain, data)[0], run(scaled, data)[0], rtol=1e-4, atol=1e-4)
    names = ["W1", "W2", "W3"]
    a = zero_masks(plain, data, names, criterion=criterion)
    b = zero_masks(scaled, data, names, criterion=criterion)
    same_masks(a, b, criterion)


# ---------------------------------------------------------------------------------------------
# 7. N:M with calibration


def nm_model() -> onnx.ModelProto:
    b = GraphBuilder(61)
    x = b.input("x", ["N", 8, 5, 5])
    h = b.node("Conv", [x, b.weight((8, 8, 3, 3), name="Wc"), b.weight((8,))], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    h = b.node("Conv", [h, b.weight((8, 4, 3, 3), name="Wg")], group=2)
    h = b.node("Flatten", [h])
    h = b.node("Gemm", [h, b.weight((72, 12), name="Wn")])  # transB=0: the input axis is 0
    h = b.node("Relu", [h])
    b.node("Gemm", [h, b.weight((6, 12), name="Wt"), b.weight((6,))], out="y", transB=1)
    b.output("y")
    return b.model()


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_two_of_four_along_the_input_axis(tmp_path, criterion: str, mode: str) -> None:
    data = {"x": np.random.default_rng(62).standard_normal((12, 8, 5, 5)).astype(np.float32)}
    out, report = prune_calibrated(
        tmp_path, nm_model(), 0.0, data, pattern="2:4", criterion=criterion, mode=mode
    )
    tensors = stored(out)
    in_axes = {"Wc": 1, "Wg": 1, "Wn": 0, "Wt": 1}
    for name, axis in in_axes.items():
        w = np.moveaxis(tensors[name], axis, -1)
        groups = (w.reshape(*w.shape[:-1], -1, 4) == 0).sum(axis=-1)
        assert (groups == 2).all(), name
    assert report.plan.pruned == sum(t.size for n, t in tensors.items() if n in in_axes) // 2
    checked_run(out, data)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_zero_weights_stay_zero_under_a_pattern(tmp_path, criterion: str) -> None:
    b = GraphBuilder(63)
    w = np.random.default_rng(64).standard_normal((4, 8)).astype(np.float32)
    w[0, :3] = 0  # a group of four with three zeros: the pattern keeps one of them
    b.node("Gemm", [b.input("x", ["N", 8]), b.weight((4, 8), name="W", array=w)], out="y", transB=1)
    b.output("y")
    data = {"x": np.random.default_rng(65).standard_normal((30, 8)).astype(np.float32)}
    out, report = prune_calibrated(
        tmp_path, b.model(), 0.0, data, pattern="2:4", criterion=criterion
    )
    pruned = stored(out)["W"]
    assert (pruned[w == 0] == 0).all()
    _, plain = onnxprune.prune(to_ir(b.model()), Selection(pattern="2:4"))
    assert report.plan.pruned == plain.plan.pruned


# ---------------------------------------------------------------------------------------------
# 8. magnitude fallback for a layer without a design


def test_uncovered_layout_falls_back_to_magnitude(tmp_path) -> None:
    """A Conv weight read through a Transpose has no design: ranked by magnitude, not repaired."""
    b = GraphBuilder(71)
    x = b.input("x", ["N", 4, 5, 5])
    view = b.node("Transpose", [b.weight((4, 6, 3, 3), name="Wt")], perm=[1, 0, 2, 3])
    h = b.node("Conv", [x, view, b.weight((6,))], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    b.node("Conv", [h, b.weight((8, 6, 3, 3), name="Wc")], out="y")
    b.output("y")
    data = {"x": np.random.default_rng(72).standard_normal((6, 4, 5, 5)).astype(np.float32)}
    for mode in ("one-pass", "sequential"):
        out, report = prune_calibrated(
            tmp_path, b.model(), 0.6, data, out=f"{mode}.onnx", mode=mode
        )
        fallback = dict(report.calibration.fallback)
        assert list(fallback) == ["Wt"] and "layout" in fallback["Wt"]
        tensors = stored(out)
        total = 4 * 6 * 9 + 8 * 6 * 9
        assert sum(int((tensors[n] == 0).sum()) for n in ("Wt", "Wc")) == round(0.6 * total)
        errors = {
            layer.weight.name: report.errors.get(layer.weight.name) for layer in report.plan.layers
        }
        assert errors["Wt"] is None and errors["Wc"] is not None
        assert checked_run(out, data)[0].shape == (6, 8, 3, 3)


# ---------------------------------------------------------------------------------------------
# 9 and 10. the command line: user errors, thin data, the JSON report


def small_model(tmp_path: Path, sqrt: bool = False) -> Path:
    b = GraphBuilder(81)
    h = b.input("x", ["N", 3, 6, 6])
    if sqrt:
        h = b.node("Sqrt", [h])
    h = b.node("Conv", [h, b.weight((8, 3, 3, 3), name="W1"), b.weight((8,))], pads=[1, 1, 1, 1])
    h = b.node("Relu", [h])
    h = b.node("Flatten", [h])
    b.node("Gemm", [h, b.weight((10, 288), name="W2"), b.weight((10,))], out="y", transB=1)
    b.output("y")
    return save(b.model(), tmp_path / ("sqrt.onnx" if sqrt else "model.onnx"))


def samples(n: int = 8, dtype: type = np.float32, shape: tuple[int, ...] = (3, 6, 6)) -> np.ndarray:
    return np.random.default_rng(82).standard_normal((n, *shape)).astype(dtype)


def npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


CLI_ERRORS = {
    "missing": "no such file",
    "wrong-name": "no array for model input 'x'",
    "wrong-shape": "has shape",
    "wrong-dtype": "is float64",
    "no-samples": "hold no samples",
    "nan-data": "NaN or Inf",
    "nan-activation": "NaN or Inf",
    "criterion-without-data": "needs calibration samples",
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_calibration_errors(tmp_path, case: str) -> None:
    model = small_model(tmp_path)
    out = tmp_path / "out.onnx"
    args: list[object] = [model, "-s", "0.5", "--device", "cpu", "-o", out]
    calib = None
    if case == "missing":
        calib = tmp_path / "nope.npz"
    elif case == "wrong-name":
        calib = npz(tmp_path, input=samples(), other=samples())
    elif case == "wrong-shape":
        calib = npz(tmp_path, x=samples(shape=(3, 6, 5)))
    elif case == "wrong-dtype":
        calib = npz(tmp_path, x=samples(dtype=np.float64))
    elif case == "no-samples":
        calib = npz(tmp_path, x=samples(0))
    elif case == "nan-data":
        x = samples()
        x[5, 1, 2, 3] = np.nan
        calib = npz(tmp_path, x=x)
    elif case == "nan-activation":
        args[0] = small_model(tmp_path, sqrt=True)
        calib = npz(tmp_path, x=samples())  # negative samples: the Sqrt makes NaN
    elif case == "criterion-without-data":
        args += ["--criterion", "wanda"]
    if calib is not None:
        args += ["--calibration", calib]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), result.stderr
    assert CLI_ERRORS[case] in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_fewer_samples_than_input_width_works_and_says_so(tmp_path) -> None:
    model = small_model(tmp_path)
    calib = npz(tmp_path, x=samples(20), labels=np.arange(20))
    out = tmp_path / "out.onnx"
    args = [model, "-s", "0.5", "--calibration", calib, "--calibration-samples", 4]
    result = invoke(*args, "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "fewer calibration rows than their input width" in result.stdout
    assert "4 calibration samples" in result.stdout
    checked_run(out, {"x": samples(3)})


@pytest.mark.parametrize(
    ("extra", "criterion", "corrected"),
    [
        ([], "sparsegpt", True),  # --device auto: CUDA where it runs
        (
            ["--criterion", "wanda", "--calibration-mode", "sequential", "--device", "cpu"],
            "wanda",
            True,
        ),
        (["--no-bias-correction", "--pattern", "2:4", "--device", "cpu"], "sparsegpt", False),
    ],
    ids=["default", "wanda-sequential", "nm-uncorrected"],
)
def test_cli_json_report(tmp_path, extra: list[str], criterion: str, corrected: bool) -> None:
    model = small_model(tmp_path)
    calib = npz(tmp_path, x=samples(12) + 0.5)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    sparsity = [] if "--pattern" in extra else ["-s", "0.6"]
    result = invoke(model, *sparsity, "--calibration", calib, *extra, "-o", out, "--report", rep)
    assert result.exit_code == 0, result.output
    data = json.loads(rep.read_text())
    assert data["criterion"] == criterion
    calibration = data["calibration"]
    assert calibration["criterion"] == criterion and calibration["samples"] == 12
    assert calibration["magnitude_fallback"] == []
    assert (calibration["bias_corrected_layers"] > 0) == corrected
    changed = [layer for layer in data["layers"] if layer["sparsity"] > 0]
    assert [layer["name"] for layer in changed] == (
        ["W2"] if "--pattern" in extra else ["W1", "W2"]
    )
    for layer in data["layers"]:
        error = layer["output_error"]
        if layer in changed:
            assert isinstance(error, float) and math.isfinite(error) and 0 < error < 1.5
        else:  # W1 has 3 input channels: not a multiple of 4, left dense under 2:4
            assert error is None
    checked_run(out, {"x": samples(3)})


def test_calibrated_output_of_every_criterion_and_mode_is_valid(tmp_path) -> None:
    proto = cnn_mlp(seed=3)
    data = cnn_data(seed=4, samples=10)
    for criterion, mode in itertools.product(
        ("magnitude", "wanda", "sparsegpt"), ("one-pass", "sequential")
    ):
        out, report = prune_calibrated(
            tmp_path,
            proto,
            0.9,
            data,
            out=f"{criterion}-{mode}.onnx",
            criterion=criterion,
            mode=mode,
        )
        summary = report.to_dict()
        assert summary["criterion"] == criterion
        assert summary["calibration"]["mode"] == mode
        checked_run(out, data)


def test_magnitude_with_calibration_and_no_correction_is_plain_magnitude(tmp_path) -> None:
    proto = cnn_mlp(seed=5)
    data = cnn_data(seed=6, samples=8)
    out, _ = prune_calibrated(
        tmp_path, proto, 0.7, data, criterion="magnitude", bias_correction=False
    )
    onnxprune.prune(tmp_path / "model.onnx", 0.7, output=tmp_path / "plain.onnx")
    a, b = stored(out), stored(tmp_path / "plain.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("compare", ["row", "layer", "lamp"])
def test_every_way_of_comparing_layers_counts_exactly(compare: str) -> None:
    proto = cnn_mlp(seed=7, zeros=True)
    data = cnn_data(seed=8, samples=8, dead=True)
    model, report = onnxprune.prune(
        to_ir(proto),
        Selection(0.6, min_keep="0.05"),
        calibration=Calibration(data=data, criterion="sparsegpt", compare=compare, device="cpu"),
    )
    tensors = ir_weights(model, CNN_WEIGHTS)
    assert sum(int((t == 0).sum()) for t in tensors.values()) == round(0.6 * report.plan.total)
    for layer in report.plan.layers:
        assert int((tensors[layer.weight.name] != 0).sum()) >= math.ceil(0.05 * layer.size)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_float16_model_counts_exactly_and_runs(tmp_path, criterion: str) -> None:
    proto = mlp(dims=(16, 24, 8), dtype=np.float16)
    data = {"x": np.random.default_rng(9).standard_normal((30, 16)).astype(np.float16)}
    out, report = prune_calibrated(tmp_path, proto, 0.6, data, criterion=criterion)
    tensors = stored(out)
    names = [layer.weight.name for layer in report.plan.layers]
    assert all(tensors[n].dtype == np.float16 for n in names)
    assert sum(int((tensors[n] == 0).sum()) for n in names) == round(0.6 * (16 * 24 + 24 * 8))
    assert report.calibration.bias_corrected == 2
    assert checked_run(out, data)[0].dtype == np.float16


def test_sequential_walks_segments_with_exact_counts(tmp_path) -> None:
    """A chain of Gemms: a segment per layer, each run alone from the activations kept at its
    start (dense once, the pruned wave, the repaired segment once more): three runs each."""
    b = GraphBuilder(81)
    h = b.input("x", ["N", 12])
    for i in range(4):
        h = b.node("Gemm", [h, b.weight((12, 12), name=f"W{i}")], transB=1)
        h = b.node("Relu", [h])
    b.node("Gemm", [h, b.weight((3, 12), name="Wout")], out="y", transB=1)
    b.output("y")
    data = {"x": np.random.default_rng(82).standard_normal((40, 12)).astype(np.float32)}
    options = Calibration(data=data, device="cpu")
    _, report = onnxprune.prune(to_ir(b.model()), 0.6, calibration=options)
    assert report.total_pruned == round(0.6 * (4 * 144 + 36))
    assert report.calibration.passes == 1 + 3 * 5


def test_conv_statistics_keep_a_fixed_subset_of_positions() -> None:
    """Statistics rows of a Conv with far more positions than inputs: a fixed-seed subset of
    positions, the same for every sample; the exact rows otherwise."""
    from onnxprune.ops.conv import conv_rows

    x = np.random.default_rng(3).standard_normal((2, 1, 40, 40)).astype(np.float32)
    full = np.concatenate(conv_rows(x, [3, 3], [1, 1], [1, 1], [1] * 4, "NOTSET", 1), axis=1)
    part = np.concatenate(conv_rows(x, [3, 3], [1, 1], [1, 1], [1] * 4, "NOTSET", 1, 100), axis=1)
    assert full.shape == (1, 2 * 1600, 9) and part.shape == (1, 2 * 100, 9)
    per_sample = full.reshape(2, 1600, 9)
    chosen = [np.flatnonzero((per_sample[s] == row).all(axis=1))[0] for s in range(2)
              for row in part.reshape(2, 100, 9)[s]]  # fmt: skip
    assert chosen[:100] == chosen[100:]  # the same positions in both samples
    again = np.concatenate(conv_rows(x, [3, 3], [1, 1], [1, 1], [1] * 4, "NOTSET", 1, 100), axis=1)
    np.testing.assert_array_equal(part, again)


def test_exposed_model_keeps_only_the_nodes_the_activations_need() -> None:
    """ONNX Runtime runs every node of a session: the calibration copy is cut to what it needs."""
    b = GraphBuilder(91)
    h = b.node("Gemm", [b.input("x", ["N", 6]), b.weight((6, 6), name="W1")], transB=1)
    h = b.node("Relu", [h], out="early")
    h = b.node("Gemm", [h, b.weight((6, 6), name="W2")], transB=1)
    b.node("Gemm", [h, b.weight((3, 6), name="W3")], out="y", transB=1)
    b.output("y")
    model = to_ir(b.model())
    early = next(n.outputs[0] for n in model.graph if n.outputs[0].name == "early")
    proto = onnx.load_from_string(capture.exposed_model(model, [early]))
    assert [o.name for o in proto.graph.output] == ["early"]
    assert [n.op_type for n in proto.graph.node] == ["Gemm", "Relu"]


@pytest.mark.parametrize(("samples", "refits"), [(10, 0), (100, 4)])
def test_sequential_refit_only_where_rows_cover_the_inputs(monkeypatch, samples, refits) -> None:
    """With fewer rows than inputs a layer is pruned on its measured inputs, not re-solved (the
    refit's correction then lives where the data never looked: DenseNet-121 on 8 samples)."""
    calls = []
    original = reconstruct.refit
    monkeypatch.setattr(reconstruct, "refit", lambda *a: calls.append(1) or original(*a))
    b = GraphBuilder(92)
    h = b.input("x", ["N", 24])
    for i in range(3):
        h = b.node("Gemm", [h, b.weight((24, 24), name=f"W{i}")], transB=1)
        h = b.node("Relu", [h])
    b.node("Gemm", [h, b.weight((4, 24), name="Wout")], out="y", transB=1)
    b.output("y")
    x = np.random.default_rng(93).standard_normal((samples, 24)).astype(np.float32)
    options = Calibration(data={"x": x}, device="cpu", mode="sequential")
    _, report = onnxprune.prune(to_ir(b.model()), 0.5, calibration=options)
    assert report.plan.pruned == round(0.5 * (3 * 576 + 96))
    assert len(calls) == refits  # every layer (the first gets W back: its input is unchanged)


# ---------------------------------------------------------------------------------------------
# 9. a layer too wide for its full statistics


def wide_model() -> onnx.ModelProto:
    b = GraphBuilder(91)
    x = b.input("x", ["N", 256])
    h = b.node("MatMul", [x, b.weight((256, 16), name="W")])
    b.node("Add", [h, b.weight((16,), name="bias")], out="y")
    b.output("y")
    return b.model()


def correlated(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs of very unequal scales (what makes calibration worth it), mixed a little."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0.0, 1.0, k))
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
    return ((rng.standard_normal((rows, k)) * scales) @ mix + 0.3).astype(np.float32)


def test_column_blocks_are_the_same_product() -> None:
    proto = wide_model()
    d, w = design_of_single(proto)
    blocked = capture.column_blocks(d, limit=64 * 256 * 8)
    assert blocked is not None and blocked.blocks == 4 and blocked.in_features == 64
    np.testing.assert_array_equal(blocked.from_matrix(blocked.to_matrix(w)), w)
    x = correlated(10, 256, 1)
    (rows,) = blocked.rows(x)
    per_block = np.matmul(rows, blocked.to_matrix(w).transpose(0, 2, 1))  # [4, n, 16]
    np.testing.assert_allclose(per_block.sum(axis=0), x @ w, rtol=1e-4, atol=1e-4)
    assert capture.column_blocks(d, limit=10) is None  # no block of 64 columns fits
    assert capture.column_blocks(d) is d  # fits whole


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_a_layer_too_wide_is_solved_in_column_blocks(monkeypatch, mode: str) -> None:
    """Statistics that would not fit (the 32 GiB X^T X of a 1-D conv reading 1024 channels
    through 64 taps) are taken in column blocks: the run finishes, says so, hits the sparsity,
    and the block solve stays far better than magnitude, close to the full solve."""
    proto = wide_model()
    rows = correlated(1536, 256, 2)  # one distribution: calibration, then held-out rows
    calib, held = {"x": rows[:1024]}, {"x": rows[1024:]}
    want = run(proto, held)[0]

    def error(model: ir.Model) -> float:
        got = run(ir.serde.serialize_model(model), held)[0]
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    options = Calibration(data=calib, criterion="sparsegpt", mode=mode, device="cpu")
    full, _ = onnxprune.prune(to_ir(proto), 0.5, calibration=options)
    plain, _ = onnxprune.prune(to_ir(proto), 0.5)
    monkeypatch.setattr(capture, "LAYER_LIMIT_BYTES", 64 * 256 * 8)
    blocked, report = onnxprune.prune(to_ir(proto), 0.5, calibration=options)
    assert report.calibration is not None
    assert any("column blocks" in n and "4 blocks of 64" in n for n in report.calibration.notices)
    assert report.total_pruned == 2048
    weights = {t.name: t.const_value.numpy() for t in blocked.graph.initializers.values()}
    assert int((weights["W"] == 0).sum()) == 2048
    # measured: full 0.113, blocks of 64 0.126, magnitude 0.255 (one-pass)
    assert error(full) <= error(blocked) < min(1.25 * error(full), 0.6 * error(plain))


def test_a_layer_too_wide_for_channel_statistics_is_named(monkeypatch, tmp_path) -> None:
    """Channel removal reads columns as channels: a layer too wide gets no statistics (named
    in the report's fallback), and the run still finishes."""
    b = GraphBuilder(92)
    x = b.input("x", ["N", 64])
    h = b.node("Gemm", [x, b.weight((64, 128), name="W1"), b.weight((128,))])
    h = b.node("Relu", [h])
    b.node("Gemm", [h, b.weight((128, 8), name="W2"), b.weight((8,))], out="y")
    b.output("y")
    monkeypatch.setattr(capture, "LAYER_LIMIT_BYTES", 100 * 100 * 8)
    options = Calibration(data={"x": correlated(64, 64, 4)}, mode="one-pass", device="cpu")
    _, report = onnxprune.prune(to_ir(b.model()), 0.3, structured=True, calibration=options)
    assert report.calibration is not None
    assert [n for n, _ in report.calibration.fallback] == ["W2"]
    assert "wider than calibration holds" in report.calibration.fallback[0][1]
