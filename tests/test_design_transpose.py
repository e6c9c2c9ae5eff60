"""ConvTranspose's calibration design against the ONNX reference implementation and ONNX Runtime.

rows(x) @ to_matrix(W)[g].T must be the node's output less its bias, position by position, for
strides, pads, dilations, output_padding, output_shape, auto_pad and groups; and calibration then
measures ConvTranspose weights like any other layer.

The reference implementation covers groups only when every group is one channel in and out, and
an explicit output_shape only with auto_pad SAME_*: a grouped node is checked there as one
single-group node per group (a grouped transposed convolution is that, concatenated), and every
node is checked in ONNX Runtime too, which computes the padding of output_shape as the spec says.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import GraphBuilder, save
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxprune
from onnxprune import ops
from onnxprune.calibration import Calibration
from onnxprune.ops import conv as conv_ops
from onnxprune.weights import find_weights

IR_VERSION = 10
OPSET = 17


def node_model(
    x_shape: tuple[int, ...], w: np.ndarray, *, transposed: bool = False, **attrs: object
) -> onnx.ModelProto:
    """One ConvTranspose reading input x and weight W (stored transposed behind a Transpose
    node, with `transposed`); the output is declared without a shape."""
    nodes = []
    weight = "W"
    stored = w
    if transposed:
        stored = np.ascontiguousarray(np.swapaxes(w, 0, 1))
        perm = [1, 0, *range(2, w.ndim)]
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=perm))
        weight = "Wt"
    nodes.append(helper.make_node("ConvTranspose", ["x", weight], ["y"], name="ct", **attrs))
    graph = helper.make_graph(
        nodes,
        "ct",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(stored, "W")],
    )
    return helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )


def ort_output(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def reference_output(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """The reference implementation's output; grouped nodes one group at a time."""
    groups = int(attrs.get("group", 1))
    single = {k: v for k, v in attrs.items() if k != "group"}
    cg = x.shape[1] // groups
    outs = []
    for g in range(groups):
        xg, wg = x[:, g * cg : (g + 1) * cg], w[g * cg : (g + 1) * cg]
        proto = node_model(xg.shape, wg, **single)
        outs.append(ReferenceEvaluator(proto).run(None, {"x": xg})[0])
    return np.concatenate(outs, axis=1)


def design_of_node(proto: onnx.ModelProto) -> tuple[ops.Design | None, str | None]:
    weights = find_weights(ir.serde.deserialize_model(proto)).weights
    assert [w.name for w in weights] == ["W"]
    designs, why = ops.design_of(weights[0])
    return (designs[0] if designs else None), why


def design_output(d: ops.Design, x: np.ndarray, w: np.ndarray, out_shape) -> np.ndarray:
    """rows(x) @ W[g].T for every group, laid out as the node's output [N, O, *spatial]."""
    chunks = d.rows(x)
    assert all(c.ndim == 3 and c.shape[0] == d.groups for c in chunks)
    assert all(c.shape[2] == d.in_features for c in chunks)
    rows = np.concatenate(chunks, axis=1).astype(np.float64)
    matrix = d.to_matrix(w)
    assert matrix.shape == (d.groups, d.out_features, d.in_features)
    got = np.matmul(rows, matrix.astype(np.float64).transpose(0, 2, 1))  # [G, n*P, O/G]
    n, spatial = out_shape[0], tuple(out_shape[2:])
    assert got.shape[1] == n * math.prod(spatial)
    got = got.reshape(d.groups, n, *spatial, d.out_features)
    got = np.moveaxis(got, -1, 1)  # [G, O/G, N, *spatial]
    return np.moveaxis(got.reshape(d.groups * d.out_features, n, *spatial), 0, 1)


def full_length(size: int, k: int, s: int, dil: int, extra: int) -> int:
    return s * (size - 1) + extra + (k - 1) * dil + 1


def random_case(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...], dict]:
    """(x shape, weight shape, attributes) of a valid ConvTranspose."""
    dims = int(rng.integers(1, 3))
    groups = int(rng.integers(1, 3))
    channels = groups * int(rng.integers(1, 4))
    o_group = int(rng.integers(1, 4))
    spatial = [int(v) for v in rng.integers(1, 7, dims)]
    kernel = [int(v) for v in rng.integers(1, 5, dims)]
    strides = [int(v) for v in rng.integers(1, 4, dims)]
    dilations = [int(v) for v in rng.integers(1, 3, dims)]
    # output_padding must be smaller than the stride (ONNX Runtime checks it)
    extra = [int(rng.integers(0, s)) for s in strides]
    mode = str(
        rng.choice(["pads", "pads", "none", "valid", "same_upper", "same_lower", "shape", "shape"])
    )
    attrs: dict = {"strides": strides, "dilations": dilations, "group": groups}
    if any(extra):
        attrs["output_padding"] = extra
    full = [full_length(*v) for v in zip(spatial, kernel, strides, dilations, extra, strict=True)]
    if mode == "pads":  # any split that leaves an output, cropping past the kernel's reach too
        begin, end = [], []
        for f in full:
            total = int(rng.integers(0, f))
            b = int(rng.integers(0, total + 1))
            begin.append(b)
            end.append(total - b)
        attrs["pads"] = begin + end
    elif mode == "valid":
        attrs["auto_pad"] = "VALID"
    elif mode in ("same_upper", "same_lower"):
        attrs["auto_pad"] = mode.upper()
        if rng.random() < 0.3:
            attrs["output_shape"] = [int(rng.integers(1, f + 1)) for f in full]
    elif mode == "shape":
        attrs["output_shape"] = [int(rng.integers(1, f + 1)) for f in full]
    if rng.random() < 0.2:
        attrs["kernel_shape"] = kernel
    if groups == 1 and rng.random() < 0.5:
        del attrs["group"]
    n = int(rng.integers(1, 4))
    return (n, channels, *spatial), (channels, o_group, *kernel), attrs


def same_is_clamped(w_shape: tuple[int, ...], attrs: dict) -> bool:
    """SAME_* whose input * stride outgrows the full output: the design refuses it."""
    if attrs.get("auto_pad") not in ("SAME_UPPER", "SAME_LOWER") or "output_shape" in attrs:
        return False
    kernel = w_shape[2:]
    extra = attrs.get("output_padding", [0] * len(kernel))
    return any(
        full_length(1, k, s, dil, e) < s
        for k, s, dil, e in zip(kernel, attrs["strides"], attrs["dilations"], extra, strict=True)
    )


def reference_covers(attrs: dict) -> bool:
    """The reference implementation ignores the output_shape padding rule without auto_pad."""
    return "output_shape" not in attrs or attrs.get("auto_pad") in ("SAME_UPPER", "SAME_LOWER")


@pytest.mark.parametrize("seed", range(8))
def test_random_conv_transposes_match_the_reference(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    checked = 0
    while checked < 25:
        x_shape, w_shape, attrs = random_case(rng)
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        proto = node_model(x_shape, w, **attrs)
        d, why = design_of_node(proto)
        if same_is_clamped(w_shape, attrs):
            assert d is None and why is not None
            continue
        assert why is None, (why, attrs)
        assert d is not None
        expected = ort_output(proto, x)
        if reference_covers(attrs):
            np.testing.assert_allclose(
                reference_output(x, w, attrs), expected, rtol=1e-4, atol=1e-4
            )
        got = design_output(d, x, w, expected.shape)
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=str(attrs))
        back = d.from_matrix(d.to_matrix(w))
        assert back.shape == w.shape and back.dtype == w.dtype
        np.testing.assert_array_equal(back, w)
        assert d.activation.name == "x" and d.out_axis == 1
        assert d.groups == attrs.get("group", 1)
        assert d.out_features == w_shape[1]
        assert d.in_features == math.prod(w_shape[2:]) * w_shape[0] // d.groups
        checked += 1


# Hand-picked cases: each attribute on its own, and together.
CASES = {
    "plain-2d": ((2, 3, 4, 5), (3, 4, 3, 3), {}),
    "stride-2-kernel-2": ((2, 4, 3, 3), (4, 2, 2, 2), {"strides": [2, 2]}),
    "strides-pads-dilations": (
        (2, 3, 5, 4),
        (3, 2, 3, 2),
        {"strides": [3, 2], "pads": [1, 0, 2, 1], "dilations": [2, 1]},
    ),
    "pads-past-the-kernel": ((1, 2, 5), (2, 3, 3), {"strides": [2], "pads": [4, 3]}),
    "output-padding": (
        (2, 2, 4, 3),
        (2, 3, 3, 2),
        {"strides": [2, 3], "output_padding": [1, 2], "pads": [1, 1, 0, 0]},
    ),
    "output-shape": ((2, 3, 5), (3, 2, 3), {"strides": [2], "output_shape": [8]}),
    "output-shape-with-padding": (
        (1, 3, 5),
        (3, 2, 3),
        {"strides": [2], "output_shape": [9], "output_padding": [1]},
    ),
    "output-shape-same-lower": (
        (2, 2, 4, 4),
        (2, 2, 3, 3),
        {"strides": [2, 2], "output_shape": [7, 6], "auto_pad": "SAME_LOWER"},
    ),
    "same-upper-odd": ((2, 2, 5), (2, 3, 3), {"strides": [2], "auto_pad": "SAME_UPPER"}),
    "same-lower-odd": ((2, 2, 5), (2, 3, 3), {"strides": [2], "auto_pad": "SAME_LOWER"}),
    "same-dilated-output-padding": (
        (1, 2, 5),
        (2, 3, 2),
        {"strides": [3], "dilations": [2], "auto_pad": "SAME_LOWER", "output_padding": [2]},
    ),
    "valid": ((2, 3, 4, 4), (3, 2, 2, 3), {"strides": [2, 1], "auto_pad": "VALID"}),
    "grouped": (
        (2, 4, 3, 4),
        (4, 3, 2, 3),
        {"group": 2, "strides": [2, 1], "pads": [0, 1, 1, 0], "dilations": [1, 2]},
    ),
    "depthwise": ((2, 3, 4, 4), (3, 1, 3, 3), {"group": 3, "strides": [2, 2]}),
}


@pytest.mark.parametrize("case", CASES)
def test_conv_transpose_design_cases(case: str) -> None:
    x_shape, w_shape, attrs = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    proto = node_model(x_shape, w, **attrs)
    d, why = design_of_node(proto)
    assert why is None and d is not None
    expected = ort_output(proto, x)
    if reference_covers(attrs):
        np.testing.assert_allclose(reference_output(x, w, attrs), expected, rtol=1e-5, atol=1e-5)
    got = design_output(d, x, w, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(d.from_matrix(d.to_matrix(w)), w)


def test_a_bias_is_left_out() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    bias = rng.standard_normal(2).astype(np.float32)
    proto = node_model(x.shape, w, strides=[2, 2])
    proto.graph.node[0].input.append("B")
    proto.graph.initializer.append(numpy_helper.from_array(bias, "B"))
    d, why = design_of_node(proto)
    assert why is None and d is not None
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0] - bias[:, None, None]
    got = design_output(d, x, w, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_sampled_rows_are_a_fixed_subset_of_positions() -> None:
    """sample=True keeps statistic_positions(K) output positions, the same ones per sample,
    with the columns of the full rows."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 20, 20)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    d, _ = design_of_node(node_model(x.shape, w, strides=[2, 2]))
    assert d is not None
    full = np.concatenate(d.rows(x), axis=1)
    sampled = np.concatenate(d.rows(x, sample=True), axis=1)
    positions = 40 * 40
    cap = ops.statistic_positions(d.in_features)
    assert cap < positions
    assert full.shape == (1, 2 * positions, d.in_features)
    assert sampled.shape == (1, 2 * cap, d.in_features)
    chosen = []
    for s in range(2):
        rows = full[0, s * positions : (s + 1) * positions]
        picked = sampled[0, s * cap : (s + 1) * cap]
        equal = (picked[:, None, :] == rows[None, :, :]).all(axis=2)  # [cap, positions]
        assert equal.sum(axis=1).tolist() == [1] * cap  # every sampled row is one full row
        chosen.append(equal.argmax(axis=1))
    assert np.all(np.diff(chosen[0]) > 0)
    np.testing.assert_array_equal(chosen[0], chosen[1])


def test_rows_are_the_same_when_built_a_sample_at_a_time(monkeypatch) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    attrs = {"strides": [2, 3], "pads": [1, 0, 0, 2], "output_padding": [1, 0]}
    d, _ = design_of_node(node_model(x.shape, w, **attrs))
    assert d is not None
    whole = d.rows(x)
    assert len(whole) == 1
    monkeypatch.setattr(conv_ops, "PATCH_ELEMENTS", 1)
    chunks = d.rows(x)
    assert len(chunks) == x.shape[0]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole[0])


def test_rows_read_the_activation_width_not_the_weight() -> None:
    """A pruned layer's rows are paired with the dense model's wider input: rows follow x."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    d, _ = design_of_node(node_model((1, 2, 3, 3), w, strides=[2, 2]))
    assert d is not None
    wide = rng.standard_normal((1, 5, 3, 3)).astype(np.float32)
    assert np.concatenate(d.rows(wide), axis=1).shape == (1, 36, 4 * 5)


@pytest.mark.parametrize(
    "why",
    ["via-transpose", "same-clamped", "kernel-shape", "auto-pad-with-pads"],
)
def test_layouts_without_a_design(why: str) -> None:
    w = np.ones((2, 3, 3, 3), np.float32)
    attrs: dict = {"strides": [2, 2]}
    transposed = False
    if why == "via-transpose":
        transposed = True
    elif why == "same-clamped":
        w = np.ones((2, 3, 1, 1), np.float32)
        attrs["auto_pad"] = "SAME_UPPER"
    elif why == "kernel-shape":
        attrs["kernel_shape"] = [2, 2]
    else:
        attrs.update(auto_pad="SAME_LOWER", pads=[1, 1, 1, 1])
    d, reason = design_of_node(node_model((1, 2, 4, 4), w, transposed=transposed, **attrs))
    assert d is None and reason is not None and "ConvTranspose" in reason


# ---------------------------------------------------------------------------------------------
# end to end: calibration measures the ConvTranspose


def decoder(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose(k=2, s=2): a U-Net's up-sampling step."""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", 3, 6, 6])
    c = b.node("Conv", [x, b.weight((8, 3, 3, 3), name="Wc"), b.weight((8,), name="Bc")],
               pads=[1, 1, 1, 1])  # fmt: skip
    r = b.node("Relu", [c])
    b.node(
        "ConvTranspose",
        [r, b.weight((8, 4, 2, 2), name="Wt"), b.weight((4,), name="Bt")],
        out="y",
        strides=[2, 2],
    )
    b.output("y", shape=["N", 4, 12, 12])
    return b.model()


def samples(n: int = 64) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((n, 3, 6, 6)).astype(np.float32)}


def test_calibrated_unstructured_measures_the_conv_transpose(tmp_path: Path) -> None:
    src = save(decoder(), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    _, report = onnxprune.prune(
        src, 0.5, calibration=Calibration(data=samples(), device="cpu"), output=out
    )
    summary = report.calibration
    assert summary is not None and summary.fallback == []
    layers = {layer.weight.name: layer for layer in report.plan.layers}
    error = report.errors.get("Wt")
    assert error is not None and math.isfinite(error)
    assert layers["Wt"].prune > 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_calibrated_structured_prunes_into_a_conv_transpose(tmp_path: Path) -> None:
    src = save(decoder(), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    data = samples()
    _, report = onnxprune.prune(
        src, 0.3, structured=True, calibration=Calibration(data=data, device="cpu"), output=out
    )
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes["Wt"][0] < 8 and shapes["Wt"][0] == shapes["Wc"][0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, data)[0]
    assert y.shape == (64, 4, 12, 12) and np.isfinite(y).all()
    assert report.channels is not None and report.calibration is not None
    assert report.calibration.fallback == []
    assert not any("not re-solved" in notice for notice in report.calibration.notices)
    assert "Wt" in report.errors and math.isfinite(report.errors["Wt"])  # re-solved
