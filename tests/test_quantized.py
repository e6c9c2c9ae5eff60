"""Quantized (QDQ) models: integer weights behind DequantizeLinear found, ranked by their
dequantized magnitudes, pruned to their zero points (unstructured) or sliced with their scales
and zero points (structured); activations' QuantizeLinear/DequantizeLinear between layers."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import GraphBuilder, initializers, run, save
from channel_models import analyse, check_invariant
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import channels, weights
from onnxprune.cli import main
from onnxprune.options import Selection
from onnxprune.selection import plan

TYPES = {"int8": (np.int8, TensorProto.INT8), "uint8": (np.uint8, TensorProto.UINT8)}


def quantize(
    w: np.ndarray, dtype: str, axis: int | None, block: int = 0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero point) of w. Zero points are never 0 (uint8 near 128, int8 a few steps
    off), so a test that reads 0 where the zero point belongs fails."""
    rng = np.random.default_rng(seed)
    low, high = (0, 255) if dtype == "uint8" else (-128, 127)
    if dtype == "int4":
        low, high = -8, 7
    if axis is None:
        shape = ()
    elif block:
        shape = list(w.shape)
        shape[axis] = -(-w.shape[axis] // block)
    else:
        shape = (w.shape[axis],)
    centre = (low + high + 1) // 2
    zero = centre + rng.integers(-2, 3, size=shape)
    span = max(high - centre - 2, 1)
    if axis is None:
        scale = np.array(np.abs(w).max() / span, dtype=np.float32)
        full_scale, full_zero = scale, zero
    else:
        moved = np.moveaxis(np.abs(w), axis, 0)
        if block:
            pad = shape[axis] * block - w.shape[axis]
            moved = np.pad(moved, [(0, pad)] + [(0, 0)] * (w.ndim - 1))
            moved = moved.reshape(shape[axis], block, *moved.shape[1:]).max(axis=1)
            scale = np.moveaxis(moved, 0, axis) / span
            full = np.repeat(scale, block, axis=axis)
            full_scale = np.take(full, range(w.shape[axis]), axis=axis)
            full_zero = np.take(np.repeat(zero, block, axis=axis), range(w.shape[axis]), axis)
        else:
            scale = moved.reshape(w.shape[axis], -1).max(axis=1) / span
            view = [1] * w.ndim
            view[axis] = -1
            full_scale, full_zero = scale.reshape(view), zero.reshape(view)
        scale = np.maximum(scale, 1e-6).astype(np.float32)
        full_scale = np.maximum(full_scale, 1e-6).astype(np.float32)
    q = np.clip(np.round(w / full_scale) + full_zero, low, high)
    return q, scale.astype(np.float32), np.asarray(zero)


def _tensor(name: str, array: np.ndarray, dtype: str) -> onnx.TensorProto:
    if dtype == "int4":
        flat = np.asarray(array, dtype=np.int8).reshape(-1).tolist()
        return helper.make_tensor(name, TensorProto.INT4, list(np.shape(array)), flat)
    return numpy_helper.from_array(np.asarray(array).astype(TYPES[dtype][0]), name)


def qweight(
    b: GraphBuilder,
    w: np.ndarray,
    dtype: str | None,
    axis: int | None,
    block: int = 0,
    name: str | None = None,
) -> str:
    """A weight as the layer reads it: w stored as float (dtype None), or DequantizeLinear of q."""
    name = name or b.name("W")
    if dtype is None:
        return b.weight(w.shape, array=w.astype(np.float32), name=name)
    q, scale, zero = quantize(w, dtype, axis, block, seed=len(b.initializers))
    b.initializers += [
        _tensor(f"{name}_q", q, dtype),
        numpy_helper.from_array(scale, f"{name}_scale"),
        _tensor(f"{name}_zp", zero, dtype),
    ]
    attrs = {} if axis is None else {"axis": axis}
    if block:
        attrs["block_size"] = block
    return b.node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], **attrs)


def qdq(b: GraphBuilder, x: str, on: bool, scale: float = 0.05, channels: int = 0) -> str:
    """Quantize an activation to uint8 and back (per tensor, or per channel on axis 1)."""
    if not on:
        return x
    if channels:
        s = b.weight((channels,), array=np.linspace(scale, 2 * scale, channels, dtype=np.float32))
        z = b.weight((channels,), array=np.full(channels, 128, np.uint8))
        q = b.node("QuantizeLinear", [x, s, z], axis=1)
        return b.node("DequantizeLinear", [q, s, z], axis=1)
    s = b.weight((), array=np.array(scale, np.float32))
    z = b.weight((), array=np.array(128, np.uint8))
    return b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, s, z]), s, z])


def cnn(dtype: str | None, per_channel: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu, Conv (int32 quantized bias) -Relu, MaxPool, Flatten, Gemm; dtype None: the
    float model with the same weights and no activation QDQ."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed)
    on = dtype is not None
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.4
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    w3 = rng.standard_normal((10, 128)).astype(np.float32) * 0.2
    b2 = rng.standard_normal(8).astype(np.float32) * 0.1
    axis0 = 0 if per_channel else None
    h = qdq(b, b.input("x", ["N", 3, 8, 8]), on, scale=0.02)
    h = b.node("Conv", [h, qweight(b, w1, dtype, axis0, name="W1"), b.weight((8,))], pads=[1] * 4)
    h = qdq(b, b.node("Relu", [h]), on)
    if on:  # the bias as quantize_static writes it: int32 with per-channel scales, no zero point
        scale = np.full(8, 1e-4, np.float32)
        b.initializers += [
            numpy_helper.from_array(np.round(b2 / scale).astype(np.int32), "B2_q"),
            numpy_helper.from_array(scale, "B2_scale"),
        ]
        bias = b.node("DequantizeLinear", ["B2_q", "B2_scale"], axis=0)
    else:
        bias = b.weight((8,), array=np.round(b2 / 1e-4).astype(np.float32) * np.float32(1e-4))
    h = b.node("Conv", [h, qweight(b, w2, dtype, axis0, name="W2"), bias], pads=[1] * 4)
    h = qdq(b, b.node("Relu", [h]), on)
    h = b.node("Flatten", [b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])])
    w3q = qweight(b, w3, dtype, axis0, name="W3")
    b.node("Gemm", [qdq(b, h, on), w3q, b.weight((10,))], out="y", transB=1)
    b.output("y", shape=["N", 10])
    return b.model()


def mlp(dtype: str | None, per_channel_activation: bool = True) -> onnx.ModelProto:
    """MatMul, Add, Relu, an activation quantized per channel, MatMul: weights per axis 1."""
    rng = np.random.default_rng(1)
    b = GraphBuilder(1)
    on = dtype is not None
    h = qdq(b, b.input("x", ["N", 16]), on, scale=0.02)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    h = b.node("MatMul", [h, qweight(b, w1, dtype, 1, name="W1")])
    h = b.node("Add", [h, b.weight((32,), scale=0.1)])
    # quantized per channel before the Relu: ORT's MatMul kernels take per-tensor inputs only
    h = b.node("Relu", [qdq(b, h, on, channels=32 if per_channel_activation else 0)])
    w2 = rng.standard_normal((32, 8)).astype(np.float32) * 0.3
    b.node("MatMul", [h, qweight(b, w2, dtype, 1, name="W2")], out="y")
    b.output("y", shape=["N", 8])
    return b.model()


def data(shape=(16, 3, 8, 8), seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).random(shape, dtype=np.float32)}


def stored_pairs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """Each quantized weight of a saved model: (q, zero point broadcast to q's shape, axis)."""
    model = onnx.load(str(path))
    arrays = initializers(path)
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in arrays:
            continue
        q = arrays[node.input[0]]
        if q.dtype == np.int32:
            continue
        zero = arrays[node.input[2]].astype(np.int64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if zero.ndim else None
        if axis is not None:
            view = [1] * q.ndim
            view[axis] = -1
            zero = zero.reshape(view)
        out[node.input[0]] = (q.astype(np.int64), np.broadcast_to(zero, q.shape), axis)
    return out


@pytest.mark.parametrize("dtype", sorted(TYPES))
@pytest.mark.parametrize("per_channel", [True, False])
def test_finds_quantized_weights_with_dequantized_values(dtype, per_channel) -> None:
    model = ir.serde.deserialize_model(cnn(dtype, per_channel))
    found = weights.find_weights(model)
    assert [w.name for w in found.weights] == ["W1_q", "W2_q", "W3_q"]
    assert {w.dtype for w in found.weights} == {ir.DataType.from_numpy(np.dtype(dtype))}
    assert [w.op_type for w in found.weights] == ["Conv", "Conv", "Gemm"]
    assert [w.out_axis for w in found.weights] == [0, 0, 0]
    for w in found.weights:
        q = w.stored().numpy().astype(np.int64)
        assert w.quant is not None and w.quant.axis == (0 if per_channel else None)
        want = (q - w.quant.full(w.quant.zero_point)) * w.quant.full(w.quant.scale)
        np.testing.assert_array_equal(w.numpy(), want.astype(np.float32))
        assert w.numpy().dtype == np.float32
    # the int32 bias is no weight, and nothing is skipped in silence
    assert found.skipped == []


@pytest.mark.parametrize("dtype", sorted(TYPES))
@pytest.mark.parametrize("per_channel", [True, False])
def test_unstructured_zero_points_exact_and_close_to_float(dtype, per_channel, tmp_path) -> None:
    proto = cnn(dtype, per_channel)
    path = save(proto, tmp_path / "q.onnx")
    out = tmp_path / "q.pruned.onnx"
    _, report = onnxprune.prune(path, sparsity=0.7, output=out)
    total = report.plan.total
    assert report.plan.pruned == round(0.7 * total)
    pairs = stored_pairs(out)
    at_zero = sum(int(np.count_nonzero(q == z)) for q, z, _ in pairs.values())
    assert at_zero == report.plan.pruned
    # the dequantized pruned weights are exactly 0 where pruned
    pruned = ir.serde.deserialize_model(onnx.load(str(out)))
    values = {w.name: w.numpy() for w in weights.find_weights(pruned).weights}
    assert sum(int(np.count_nonzero(v == 0)) for v in values.values()) == report.plan.pruned
    # against the float model pruned at the same positions: within quantization error
    float_proto = cnn(None)
    masks = {f"W{i}": values[f"W{i}_q"] == 0 for i in (1, 2, 3)}
    for tensor in float_proto.graph.initializer:
        if tensor.name in masks:
            array = numpy_helper.to_array(tensor) * ~masks[tensor.name]
            tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    feeds = data()
    (dense_q,), (dense_f,) = run(path, feeds), run(cnn(None), feeds)
    (got,), (want,) = run(out, feeds), run(float_proto, feeds)
    scale = float(np.abs(want).max())
    dense_error = float(np.abs(dense_q - dense_f).max())
    assert float(np.abs(got - want).max()) <= 3 * dense_error + 0.02 * scale


def test_weights_at_their_zero_point_count_as_zeros(tmp_path) -> None:
    model = ir.serde.deserialize_model(cnn("uint8"))
    found = weights.find_weights(model).weights
    w = found[0]
    q = w.stored().numpy().copy()
    q[:2] = w.quant.full(w.quant.zero_point)[:2]  # two output channels already zero
    w.set_tensor(ir.Tensor(q, dtype=w.dtype))
    result = plan(found, 0.5)
    assert result.layers[0].zeros == 2 * 27
    assert result.pruned == round(0.5 * result.total)


def test_one_scale_with_float_layers() -> None:
    """A quantized layer ranks exactly as a float layer holding its dequantized values."""
    proto = cnn("int8")
    model = ir.serde.deserialize_model(proto)
    found = weights.find_weights(model).weights
    twin_weights = []
    for w in found:
        value = ir.Value(name=w.name)
        value.const_value = ir.Tensor(w.numpy(), name=w.name)
        twin_weights.append(weights.Weight(w.name, w.shape, ir.DataType.FLOAT, w.uses, value=value))
    mixed = [twin_weights[0], found[1], twin_weights[2]]  # float and quantized side by side
    for sparsity in (0.3, 0.8):
        a, b = plan(mixed, sparsity), plan(twin_weights, sparsity)
        assert [x.prune for x in a.layers] == [x.prune for x in b.layers]
        assert [x.cut for x in a.layers] == [x.cut for x in b.layers]


def test_nm_pattern_on_quantized(tmp_path) -> None:
    path = save(cnn("uint8"), tmp_path / "q.onnx")
    out = tmp_path / "p.onnx"
    _, report = onnxprune.prune(path, Selection(pattern="2:4"), output=out)
    assert report.plan.pattern == (2, 4)
    pairs = stored_pairs(out)
    q, zero, _ = pairs["W2_q"]  # [8, 8, 3, 3]: groups of 4 input channels
    alive = (q != zero).reshape(8, 2, 4, 9)
    assert (alive.sum(axis=2) <= 2).all()
    run(out, data())


def test_int4_weights(tmp_path) -> None:
    """int4 q is unpacked for pruning and packed again on save (opset 21)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    h = b.node("MatMul", [b.input("x", ["N", 16]), qweight(b, w, "int4", 1, name="W")])
    b.node("Relu", [h], out="y")
    b.output("y", shape=["N", 8])
    path = save(b.model(opset=21), tmp_path / "q4.onnx")
    out = tmp_path / "q4.pruned.onnx"
    _, report = onnxprune.prune(path, sparsity=0.5, output=out)
    assert report.plan.pruned == 64
    saved = onnx.load(str(out))
    q = next(t for t in saved.graph.initializer if t.name == "W_q")
    assert q.data_type == TensorProto.INT4 and len(q.raw_data) == 64  # two per byte
    model = ir.serde.deserialize_model(saved)
    (weight,) = weights.find_weights(model).weights
    assert weight.dtype == ir.DataType.INT4
    assert int(np.count_nonzero(weight.numpy() == 0)) == 64
    stored = weight.stored().numpy()
    assert stored.dtype == ml_dtypes.int4
    run(out, {"x": np.ones((2, 16), np.float32)})


def test_blocked_quantization(tmp_path) -> None:
    """Blocked scales (opset 21): pruned to the zero point of each entry's block; channel
    removal leaves a blocked weight whole, saying why."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(0)
    w1 = rng.standard_normal((16, 12)).astype(np.float32)
    h = b.node("MatMul", [b.input("x", ["N", 16]), qweight(b, w1, "int8", 0, block=4, name="A")])
    h = b.node("Relu", [h])
    w2 = rng.standard_normal((12, 4)).astype(np.float32)
    b.node("MatMul", [h, b.weight((12, 4), array=w2)], out="y")
    b.output("y", shape=["N", 4])
    proto = b.model(opset=21)
    model = ir.serde.deserialize_model(proto)
    found = weights.find_weights(model).weights
    assert found[0].quant.kind == "blocks of 4 along axis 0"
    path = save(proto, tmp_path / "b.onnx")
    out = tmp_path / "b.pruned.onnx"
    onnxprune.prune(path, sparsity=0.5, output=out)
    q = initializers(out)["A_q"].astype(np.int64)
    zero = found[0].quant.full(found[0].quant.zero_point)
    pruned = ir.serde.deserialize_model(onnx.load(str(out)))
    values = weights.find_weights(pruned).weights[0].numpy()
    np.testing.assert_array_equal(q[values == 0], zero[values == 0])
    run(out, {"x": np.ones((2, 16), np.float32)})
    _, graph = analyse(proto)
    (unreached,) = graph.unreached
    assert unreached.weight == "A_q"
    assert "quantized in blocks of 4 along axis 0: blocked scales are not sliced" in (
        unreached.reason
    )


@pytest.mark.parametrize(
    "proto", [cnn("int8"), cnn("uint8", per_channel=False), mlp("int8"), mlp("uint8", False)]
)
def test_zero_channel_invariant_qdq(proto, tmp_path) -> None:
    """Channels whose producers sit at their zero points come out without changing the
    outputs: quantized weights, int32 biases, activations quantized between layers."""
    for seed in range(3):
        plan_ = check_invariant(proto, tmp_path, seed=seed, sizes={"N": 4})
        assert plan_.removed.any()


def test_structured_slices_scales_and_zero_points(tmp_path) -> None:
    path = save(cnn("int8"), tmp_path / "q.onnx")
    out = tmp_path / "q.pruned.onnx"
    _, report = onnxprune.prune(path, sparsity=0.4, structured=True, output=out)
    plan_ = report.channels
    assert plan_.removed.any()
    arrays = initializers(out)
    kept1, kept2 = arrays["W1_q"].shape[0], arrays["W2_q"].shape[0]
    assert kept1 < 8 or kept2 < 8
    assert arrays["W1_scale"].shape == arrays["W1_zp"].shape == (kept1,)
    assert arrays["W2_q"].shape[1] == kept1
    assert arrays["W2_scale"].shape == (kept2,) and arrays["B2_q"].shape == (kept2,)
    assert arrays["B2_scale"].shape == (kept2,)
    assert arrays["W3_q"].shape == (10, kept2 * 16)
    assert arrays["W3_scale"].shape == (10,)  # per output row: the removed inputs leave it
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    (got,) = run(out, data())
    assert got.shape == (16, 10)


def test_structured_per_channel_activation_scale(tmp_path) -> None:
    path = save(mlp("int8"), tmp_path / "m.onnx")
    out = tmp_path / "m.pruned.onnx"
    onnxprune.prune(path, sparsity=0.5, structured=True, output=out)
    arrays = initializers(out)
    kept = arrays["W1_q"].shape[1]
    assert kept < 32
    sliced = [a for a in arrays.values() if a.shape == (kept,)]
    assert len(sliced) >= 5  # W1 scale and zp, the Add's bias, the activation's scale and zp
    assert arrays["W2_q"].shape == (kept, 8) and arrays["W2_scale"].shape == (8,)
    run(out, {"x": np.ones((3, 16), np.float32)})


def static_model(tmp_path: Path) -> tuple[Path, Path]:
    """A float CNN and onnxruntime.quantization.quantize_static's QDQ model of it (per-channel
    int8 weights, uint8 activations, calibrated on random inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    float_path = save(cnn(None), tmp_path / "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([data((4, 3, 8, 8), seed) for seed in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantized = tmp_path / "int8.onnx"
    quantize_static(
        str(float_path),
        str(quantized),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return float_path, quantized


def test_quantize_static_model(tmp_path) -> None:
    float_path, path = static_model(tmp_path)
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    found = weights.find_weights(model)
    assert len(found.weights) == 3 and found.skipped == []
    out = tmp_path / "u.onnx"
    _, report = onnxprune.prune(path, sparsity=0.6, output=out)
    assert report.plan.pruned == round(0.6 * report.plan.total)
    assert sum(int(np.count_nonzero(q == z)) for q, z, _ in stored_pairs(out).values()) == (
        report.plan.pruned
    )
    feeds = data()
    (got,) = run(out, feeds)
    (want,) = run(float_path, feeds)
    assert np.isfinite(got).all() and got.shape == want.shape
    structured = tmp_path / "s.onnx"
    _, report = onnxprune.prune(path, sparsity=0.3, structured=True, output=structured)
    assert report.channels.removed.any()
    onnx.checker.check_model(onnx.load(str(structured)), full_check=True)
    assert run(structured, feeds)[0].shape == (16, 10)


def test_calibrated_paths_fall_back_for_quantized_weights(tmp_path) -> None:
    """Calibration cannot re-solve values on a quantization grid: quantized weights are ranked
    by magnitude and zeroed (unstructured) or their layers left un-solved (structured), said in
    the report, never a crash."""
    path = save(cnn("int8"), tmp_path / "q.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=data((32, 3, 8, 8), seed=5)["x"])
    out = tmp_path / "c.onnx"
    _, report = onnxprune.prune(path, sparsity=0.5, calibration=calib, output=out)
    fallback = dict(report.calibration.fallback)
    assert set(fallback) == {"W1_q", "W2_q", "W3_q"}
    assert all("quantized weights (int8 behind DequantizeLinear)" in r for r in fallback.values())
    assert report.plan.pruned == round(0.5 * report.plan.total)
    pairs = stored_pairs(out)
    assert sum(int(np.count_nonzero(q == z)) for q, z, _ in pairs.values()) == report.plan.pruned
    run(out, data())
    out = tmp_path / "s.onnx"
    _, report = onnxprune.prune(
        path,
        sparsity=0.3,
        calibration=calib,
        output=out,
        structured=onnxprune.Structured(target="macs"),
    )
    assert report.channels.removed.any()
    notices = " ".join(report.calibration.notices)
    assert "not re-solved" in notices and "quantized weights" in notices
    run(out, data())


def test_inspect_lists_quantized_weights(tmp_path) -> None:
    path = save(cnn("uint8"), tmp_path / "q.onnx")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("W")]
    assert len(rows) == 3 and all("uint8" in row for row in rows)


def test_channels_see_dequantized_values() -> None:
    model = ir.serde.deserialize_model(cnn("uint8"))
    channels.prepare(model)
    graph = channels.build(model)
    member = next(m for m in graph.members if m.role == "out" and m.value.name == "W1_q")
    found = weights.find_weights(model).weights[0]
    np.testing.assert_array_equal(channels.stored_values(member.value), found.numpy())


def test_external_data_same_as_in_memory(tmp_path) -> None:
    """q memory-mapped from a data file and streamed out gives the very same bytes."""
    proto = cnn("uint8")
    inline = save(proto, tmp_path / "inline.onnx")
    external = tmp_path / "external.onnx"
    onnx.save(proto, str(external), save_as_external_data=True, size_threshold=0)
    outs = []
    for source in (inline, external):
        out = tmp_path / f"{source.stem}.pruned.onnx"
        onnxprune.prune(
            source, sparsity=0.6, output=out, save=onnxprune.Save(external_data=source == external)
        )
        outs.append(initializers(out))
    assert outs[0].keys() == outs[1].keys()
    for name, array in outs[0].items():
        np.testing.assert_array_equal(array, outs[1][name])
