"""Constant compensation in structured pruning: removing channels whose producers (weights and
bias) are zero changes no output, whatever f(0) != 0 lies between producer and reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune import channels, pipeline
from onnxprune.core.tensors import const_tensor
from onnxprune.repair import compensation
from onnxprune.report.weights import format_report
from onnxprune.rewrite.structured import apply_channel_plan
from onnxprune.selection.channels import ChannelPlan
from onnxprune.storage import io
from tests.builders import GraphBuilder, run, save
from tests.channel_models import MODELS, analyse, choose, counted_weights, feeds

# Element-wise steps with f(0) != 0 (or a stored shift) between a producer and its reader.
BETWEEN = {
    "batchnorm": lambda b, h, c: b.node(
        "BatchNormalization",
        [h, b.weight((c,), scale=0.5), b.weight((c,)), b.weight((c,)), b.weight((c,), scale=0)],
        epsilon=1.0,
    ),
    "add_const": lambda b, h, c: b.node("Add", [h, b.weight((c, 1, 1))]),
    "sub_const": lambda b, h, c: b.node("Sub", [b.weight((c, 1, 1)), h]),
    "sigmoid": lambda b, h, c: b.node("Sigmoid", [h]),
    "hard_sigmoid": lambda b, h, c: b.node("HardSigmoid", [h], alpha=0.3, beta=0.4),
    "hard_swish_shifted": lambda b, h, c: b.node(
        "HardSwish", [b.node("Add", [h, b.weight((c, 1, 1))])]
    ),
    "clip_min": lambda b, h, c: b.node(
        "Clip", [h, b.constant(np.array(0.25, np.float32)), b.constant(np.array(3, np.float32))]
    ),
    "softplus": lambda b, h, c: b.node("Softplus", [h]),
    "add_relu_mul": lambda b, h, c: b.node(
        "Mul",
        [
            b.node(
                "Relu",
                [
                    b.node(
                        "Add", [h, b.weight((c, 1, 1), array=np.full((c, 1, 1), 0.5, np.float32))]
                    )
                ],
            ),
            b.weight((c, 1, 1)),
        ],
    ),
}
# Readers of the producer's channels whose response to a constant channel is one value per
# output: 1x1 and unpadded Convs, Flatten into Gemm, MatMul over the channel axis.
READERS = ("conv1x1", "conv3x3_valid", "flatten_gemm", "transpose_matmul")


def model_with(between: str, reader: str, seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Conv", [x, b.weight((8, 3, 3, 3)), b.weight((8,))], pads=[1, 1, 1, 1])
    h = BETWEEN[between](b, h, 8)
    if reader == "conv1x1":
        h = b.node("Conv", [h, b.weight((5, 8, 1, 1)), b.weight((5,))])
    elif reader == "conv3x3_valid":
        h = b.node("Conv", [h, b.weight((5, 8, 3, 3))])
    elif reader == "flatten_gemm":
        h = b.node("Gemm", [b.node("Flatten", [h]), b.weight((5, 288)), b.weight((5,))], transB=1)
    else:
        h = b.node("MatMul", [b.node("Transpose", [h], perm=[0, 2, 3, 1]), b.weight((8, 5))])
    b.node("Relu", [h], out="y")
    b.output("y")
    return b.model()


def zero_producers(graph: channels.ChannelGraph, removed: np.ndarray) -> None:
    """Zero the removed classes' producer weights and biases only: shifts stay."""
    for m in graph.members:
        if m.role not in compensation.PRODUCER_ROLES or not removed[m.ids].any():
            continue
        array = np.array(const_tensor(m.value).numpy(), copy=True)
        index = [slice(None)] * array.ndim
        index[m.axis] = removed[m.ids]
        array[tuple(index)] = 0
        node = m.value.producer()
        if node is not None and node.op_type == "Constant":
            node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(array, name=m.value.name))
        else:
            m.value.const_value = ir.Tensor(array, name=m.value.name)


def removal_error(
    proto: onnx.ModelProto, tmp: Path, *, compensate: bool, seed: int = 0
) -> tuple[float, compensation.Compensation | None]:
    """Zero some channels' producers, remove exactly those channels; the largest output change
    relative to the output's scale."""
    model, graph = analyse(proto)
    removed = choose(graph, seed=seed)
    assert removed.any()
    zero_producers(graph, removed)
    data = feeds(proto, seed)
    expected = run(ir.serde.serialize_model(model), data)
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    found = compensation.measure(model, graph, plan) if compensate else None
    apply_channel_plan(model, plan)
    if found is not None:
        compensation.apply(model, found)
    path = io.save_model(model, tmp / f"pruned_{seed}_{compensate}.onnx", force=True, check=True)
    got = run(path, data)
    error = max(
        float(np.abs(e - g).max()) / max(float(np.abs(e).max()), 1e-30)
        for e, g in zip(expected, got, strict=True)
    )
    return error, found


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("between", sorted(BETWEEN))
def test_removing_zeroed_channels_changes_no_output(between, reader, tmp_path) -> None:
    proto = model_with(between, reader)
    error, found = removal_error(proto, tmp_path, compensate=True)
    assert error < 1e-5, (between, reader, error, found.notices)
    assert found.layers == 1 and found.bordered == 0
    without, _ = removal_error(proto, tmp_path, compensate=False)
    assert without > 1e-3  # the constant mattered


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_reader_is_exact_inside_and_better_overall(tmp_path, seed) -> None:
    """A zero-padded 3x3 reader sees a constant channel as constant in the interior only."""
    b = GraphBuilder(seed)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Conv", [x, b.weight((8, 3, 3, 3)), b.weight((8,))], pads=[1, 1, 1, 1])
    h = BETWEEN["batchnorm"](b, h, 8)
    b.node("Conv", [h, b.weight((5, 8, 3, 3))], out="y", pads=[1, 1, 1, 1])
    b.output("y")
    proto = b.model()
    model, graph = analyse(proto)
    removed = choose(graph, seed=seed)
    zero_producers(graph, removed)
    data = feeds(proto, seed)
    expected = run(ir.serde.serialize_model(model), data)[0]
    plan = ChannelPlan(graph, removed, counted_weights(model, graph))
    found = compensation.measure(model, graph, plan)
    assert found.bordered == 1
    apply_channel_plan(model, plan)
    compensation.apply(model, found)
    got = run(ir.serde.serialize_model(model), data)[0]
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5 * scale)
    uncompensated, _ = removal_error(proto, tmp_path, compensate=False, seed=seed)
    assert float(np.abs(got - expected).max()) / scale < uncompensated


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compensation_never_makes_removal_worse(name, tmp_path) -> None:
    """On every channel-rule model: with producers zeroed, compensation leaves each output at
    least as close to the unpruned one as plain removal does (exact where nothing pads)."""
    proto = MODELS[name]()
    with_, found = removal_error(proto, tmp_path, compensate=True)
    without, _ = removal_error(proto, tmp_path, compensate=False)
    assert with_ <= without + 1e-6, (name, with_, without, found.notices)
    if found.layers and not found.bordered and not found.notices:
        assert with_ < 1e-5, (name, with_)


def test_nearly_dead_channels_are_repaired_too(tmp_path) -> None:
    """A channel removed for its small producer weights carries little more than its constant:
    folding the constant brings the pruned model much closer to the dense one."""
    proto = model_with("add_relu_mul", "flatten_gemm")
    model, graph = analyse(proto)
    removed = choose(graph, seed=0)
    for m in graph.members:  # shrink, not zero, the removed channels' producers
        if m.role in compensation.PRODUCER_ROLES and removed[m.ids].any():
            array = np.array(const_tensor(m.value).numpy(), copy=True)
            index = [slice(None)] * array.ndim
            index[m.axis] = removed[m.ids]
            array[tuple(index)] *= 0.001
            m.value.const_value = ir.Tensor(array, name=m.value.name)
    data = feeds(proto)
    dense = run(ir.serde.serialize_model(model), data)[0]
    errors = []
    for compensate in (True, False):
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        copy_graph = channels.build(copy)
        plan = ChannelPlan(copy_graph, removed, counted_weights(copy, copy_graph))
        found = compensation.measure(copy, copy_graph, plan) if compensate else None
        apply_channel_plan(copy, plan)
        if found is not None:
            compensation.apply(copy, found)
        errors.append(float(np.abs(run(ir.serde.serialize_model(copy), data)[0] - dense).max()))
    assert errors[0] < 0.1 * errors[1], errors


def test_pipeline_compensates_by_default_and_says_so(tmp_path) -> None:
    source = save(model_with("add_relu_mul", "flatten_gemm"), tmp_path / "m.onnx")
    _, report = pipeline.prune(source, 0.3, structured=True, output=tmp_path / "a.onnx")
    assert report.compensation.layers == 1
    assert "constants:" in format_report(report)
    assert report.to_dict()["compensation"]["layers"] == 1
    _, plain = pipeline.prune(
        source, 0.3, output=tmp_path / "b.onnx", structured=onnxprune.Structured(compensate=False)
    )
    assert plain.compensation is None
    assert plain.to_dict()["compensation"] is None


def test_model_that_will_not_run_is_left_uncompensated_with_a_notice(tmp_path) -> None:
    b = GraphBuilder(0)
    x = b.input("x", ["N", 3, "H", "W"])
    # a Reshape that needs H*W == 36: only the given shape runs
    h = b.node("Reshape", [x, b.constant(np.array([-1, 3, 6, 6], np.int64))])
    h = b.node("Conv", [h, b.weight((8, 3, 3, 3)), b.weight((8,))], pads=[1, 1, 1, 1])
    h = b.node("Sigmoid", [h])
    b.node("Conv", [h, b.weight((5, 8, 1, 1))], out="y")
    b.output("y")
    source = save(b.model(), tmp_path / "m.onnx")
    _, report = pipeline.prune(source, 0.3, structured=True, output=tmp_path / "o.onnx")
    found = report.compensation
    assert found.layers == 0 and "did not run on generated inputs" in found.notices[0]
    _, report = pipeline.prune(
        source,
        0.3,
        output=tmp_path / "p.onnx",
        force=True,
        structured=onnxprune.Structured(input_shapes={"x": (1, 3, 6, 6)}),
    )
    assert report.compensation.layers == 1
