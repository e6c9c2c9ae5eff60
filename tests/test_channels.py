"""Channel groups: which channels are coupled, which are frozen and why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxprune.channels import components
from onnxprune.ops.conv import GroupFix
from tests.builders import GraphBuilder
from tests.channel_models import (
    analyse,
    channel_shuffle,
    combined,
    concat_split_slice,
    embedding_lookup,
    grouped,
    unknown_op,
)


def _layer(graph, name):
    return next(layer for layer in graph.layers if layer.name == name)


def _groups_by_layer(graph):
    return {graph.layers[i].name: g for g in graph.groups for i in g.layers}


@pytest.mark.parametrize("seed", range(5))
def test_components_match_a_plain_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for x, y in zip(a, b, strict=True):
        rx, ry = find(int(x)), find(int(y))
        parent[max(rx, ry)] = min(rx, ry)
    expected = [min(j for j in range(n) if find(j) == find(i)) for i in range(n)]
    assert components(n, a, b).tolist() == expected


def test_residual_add_couples_layers_into_one_group() -> None:
    _, graph = analyse(combined())
    groups = _groups_by_layer(graph)
    # stem Conv (+BN) and the residual branch's last Conv feed the same Add
    stem, branch_end = graph.layers[0].name, graph.layers[2].name
    assert groups[stem] is groups[branch_end]
    assert np.array_equal(np.sort(graph.layers[0].classes), np.sort(graph.layers[2].classes))
    assert groups[graph.layers[1].name] is not groups[stem]


def test_concat_places_groups_at_offsets_and_split_slice_cut_them() -> None:
    model, graph = analyse(concat_split_slice())
    a, c = graph.layers[0], graph.layers[1]
    cat = next(n for n in model.graph if n.op_type == "Concat").outputs[0]
    assert np.array_equal(graph.spaces[cat][1], np.concatenate([a.classes, c.classes]))
    split = next(n for n in model.graph if n.op_type == "Split")
    assert np.array_equal(graph.spaces[split.outputs[0]][1], a.classes[:4])
    assert np.array_equal(
        graph.spaces[split.outputs[1]][1], np.concatenate([a.classes[4:], c.classes])
    )
    sliced = next(n for n in model.graph if n.op_type == "Slice").outputs[0]
    assert np.array_equal(graph.spaces[sliced][1], np.concatenate([a.classes[3:], c.classes[:5]]))
    assert graph.prunable[a.classes].all() and graph.prunable[c.classes].all()


def test_depthwise_ties_input_and_output_and_grouped_prunes_whole_groups() -> None:
    _, graph = analyse(grouped())
    first, depthwise, multiplier, group4 = graph.layers[:4]
    assert np.array_equal(depthwise.classes, first.classes)
    assert np.array_equal(multiplier.classes, np.repeat(first.classes, 2))
    # group=4 over 16 inputs: each group of 4 input channels is one class with its 2 outputs
    assert len(np.unique(group4.classes)) == 4
    assert len(np.unique(first.classes)) == 4  # 8 channels, paired by the grouped Conv
    fixes = [f for f in graph.fixes if isinstance(f, GroupFix)]
    assert len(fixes) == 3


def test_flatten_turns_a_channel_into_a_block_of_rows() -> None:
    _, graph = analyse(combined())
    gemm_in = next(m for m in graph.members if m.node.op_type == "Gemm" and m.role == "in")
    blocks = gemm_in.ids.reshape(10, 16)
    assert (blocks == blocks[:, :1]).all()
    assert len(np.unique(gemm_in.ids)) == 10


def test_op_without_rule_freezes_what_it_touches_with_the_reason() -> None:
    _, graph = analyse(unknown_op())
    groups = _groups_by_layer(graph)
    before_lrn, after_lrn = graph.layers[0].name, graph.layers[1].name
    assert groups[before_lrn].frozen == len(groups[before_lrn].classes)
    assert any("LRN" in r and "no channel rule" in r for r in groups[before_lrn].reasons)
    assert groups[after_lrn].frozen == 0
    head = graph.layers[-1].name
    assert any("model output" in r for r in groups[head].reasons)


def _single(op: str, *extra_nodes, **attrs):
    """Conv -> op -> Conv: is the first Conv's group frozen, and why?"""
    b = GraphBuilder(0)
    x = b.input("x", [1, 3, 4, 4])
    h = b.node("Conv", [x, b.weight((8, 3, 1, 1))])
    h = b.node(op, [h, *extra_nodes], **attrs) if not callable(op) else op(b, h)
    b.node("Conv", [h, b.weight((2, 8, 1, 1))], out="y")
    b.output("y", shape=[1, 2, 4, 4])
    return analyse(b.model())[1]


def test_reshape_moving_channels_onto_a_spatial_axis_freezes() -> None:
    def scramble(b, h):
        r = b.node("Reshape", [h, b.constant(np.array([1, 2, 4, 16], np.int64))])
        t = b.node("Transpose", [r], perm=[0, 1, 3, 2])
        return b.node("Reshape", [t, b.constant(np.array([1, 8, 4, 4], np.int64))])

    graph = _single(scramble)
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("mixed by a convolution" in r for r in graph.reasons)


def test_channel_shuffle_couples_channels_across_groups() -> None:
    _, graph = analyse(channel_shuffle())
    first = graph.layers[0].classes
    assert graph.prunable[first].all()
    # channel d of both groups is one class: 8 channels, 4 classes
    assert len(np.unique(first)) == 4
    assert np.array_equal(first[:4], first[4:])


@pytest.mark.parametrize(
    ("op", "needle"),
    [("Softmax", "normalises over channels"), ("ReduceMax", "reduces over channels")],
)
def test_ops_that_mix_channels_freeze(op: str, needle: str) -> None:
    """A max over channels (and Softmax across them) changes with any channel removed; a mean
    or a sum is kept exact instead (tests/test_norms.py)."""
    attrs = {"axis": 1} if op == "Softmax" else {"axes": [1], "keepdims": 1}

    def mix(b, h):
        m = b.node(op, [h], **attrs)
        return b.node("Mul", [h, m])

    graph = _single(mix)
    assert graph.frozen[graph.layers[0].classes].all()
    assert any(needle in r for r in graph.reasons)


def test_shape_of_channels_freezes_and_slice_with_step_freezes() -> None:
    def shape(b, h):
        size = b.node("ConstantOfShape", [b.node("Shape", [h])])  # the count escapes
        return b.node("Add", [h, b.node("Cast", [size], to=TensorProto.FLOAT)])

    graph = _single(shape)
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("reads the channel count" in r for r in graph.reasons)

    def stepped(b, h):
        s = b.node("Slice", [h, *(b.constant(np.array([v], np.int64)) for v in (0, 8, 1, 2))])
        return b.node("Concat", [s, s], axis=1)

    graph = _single(stepped)
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("step" in r for r in graph.reasons)


def test_constant_operand_broadcast_shapes() -> None:
    def consts(b, h):
        h = b.node("Add", [h, b.weight((1, 8, 1, 1))])  # sliced
        h = b.node("Mul", [h, b.weight((1,))])  # broadcasts
        return b.node("Div", [h, b.weight((8, 1, 1))])  # sliced

    graph = _single(consts)
    assert graph.prunable[graph.layers[0].classes].all()
    roles = sorted(m.role for m in graph.members if m.node.op_type in ("Add", "Div"))
    assert roles == ["scale", "shift"]


def test_model_input_added_to_channels_freezes_them() -> None:
    b = GraphBuilder(0)
    x = b.input("x", [1, 8, 4, 4])
    h = b.node("Add", [b.node("Conv", [x, b.weight((8, 8, 1, 1))]), x])
    b.node("Conv", [h, b.weight((2, 8, 1, 1))], out="y")
    b.output("y", shape=[1, 2, 4, 4])
    graph = analyse(b.model())[1]
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("model input 'x'" in r for r in graph.reasons)


@pytest.mark.parametrize("axis", range(4))
def test_channel_squares_match_a_plain_sum(axis: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxprune.scoring import magnitude as scoring

    monkeypatch.setattr(scoring, "SQUARES_CHUNK", 7)  # several slabs even for a tiny tensor
    array = np.random.default_rng(axis).standard_normal((7, 5, 3, 2)).astype(np.float32)
    moved = np.moveaxis(array.astype(np.float64), axis, 0).reshape(array.shape[axis], -1)
    np.testing.assert_allclose(scoring.channel_squares(array, axis), np.square(moved).sum(1))


def test_intermediate_graph_output_keeps_its_channels() -> None:
    b = GraphBuilder(0)
    x = b.input("x", [1, 3, 4, 4])
    h = b.node("Conv", [x, b.weight((8, 3, 1, 1))], out="mid")
    b.node("Conv", [b.node("Relu", [h]), b.weight((2, 8, 1, 1))], out="y")
    b.output("mid", shape=[1, 8, 4, 4])
    b.output("y", shape=[1, 2, 4, 4])
    graph = analyse(b.model())[1]
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("model output 'mid'" in r for r in graph.reasons)


def test_subgraph_reading_channels_freezes_them() -> None:
    b = GraphBuilder(0)
    x = b.input("x", [1, 3, 4, 4])
    h = b.node("Relu", [b.node("Conv", [x, b.weight((8, 3, 1, 1))])])
    branch = helper.make_graph(
        [helper.make_node("Neg", [h], ["inner"])],
        "branch",
        [],
        [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [1, 8, 4, 4])],
    )
    cond = b.constant(np.array(True))
    picked = b.node("If", [cond], then_branch=branch, else_branch=branch)
    b.node("Conv", [picked, b.weight((2, 8, 1, 1))], out="y")
    b.output("y", shape=[1, 2, 4, 4])
    graph = analyse(b.model())[1]
    assert graph.frozen[graph.layers[0].classes].all()
    assert any("If" in r for r in graph.reasons)


def test_one_channel_broadcast_against_many_is_no_space_of_the_output() -> None:
    b = GraphBuilder(0)
    x = b.input("x", [1, 8, 4, 4])
    gate = b.node("Sigmoid", [b.node("Conv", [x, b.weight((1, 8, 1, 1))])])
    h = b.node("Mul", [x, gate])  # [1, 8, 4, 4]: the gate's single channel is broadcast
    b.node("Conv", [h, b.weight((2, 8, 1, 1))], out="y")
    b.output("y", shape=[1, 2, 4, 4])
    model, graph = analyse(b.model())
    mul = next(n for n in model.graph if n.op_type == "Mul").outputs[0]
    assert len(graph.spaces[mul][1]) == 8


@pytest.mark.parametrize("through_identity", [False, True])
def test_stored_tensor_shared_with_a_frozen_reader(through_identity: bool) -> None:
    """A prunable layer's bias also read by a LayerNorm where no channels are followed: read
    directly, it is frozen with the layer; handed on by an Identity (the TorchScript exporter
    shares equal initializers, zero biases, that way), each reader gets its own copy (prepare)
    and the layer stays prunable."""
    b = GraphBuilder(0)
    x, u = b.input("x", [1, 8]), b.input("u", [1, 6])
    bias = b.weight((6,), array=np.zeros(6, np.float32))
    h = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, b.weight((8, 6))]), bias])])
    b.node("MatMul", [h, b.weight((6, 4))], out="y")
    alias = b.node("Identity", [bias]) if through_identity else bias
    normed = b.node("LayerNormalization", [u, b.weight((6,)), alias])
    b.node("MatMul", [normed, b.weight((6, 3))], out="z")
    b.output("y", shape=[1, 4])
    b.output("z", shape=[1, 3])
    graph = analyse(b.model())[1]
    if through_identity:
        assert not graph.frozen[graph.layers[0].classes].any()
    else:
        assert graph.frozen[graph.layers[0].classes].all()
        assert any("also read by LayerNormalization" in r for r in graph.reasons)


def test_shape_arithmetic_on_symbolic_dims_is_not_folded() -> None:
    """H // 7 with H symbolic is 1 for both H = 7 and H = 11: folding must not trust that."""
    from onnxprune import channels
    from tests.builders import run

    b = GraphBuilder(0)
    x = b.input("x", [1, 2, "H", 7])
    dims = b.node("Shape", [x])
    rows = b.node("Div", [b.node("Gather", [dims, b.constant(np.array([2]))], axis=0),
                          b.constant(np.array([7]))])  # fmt: skip
    target = b.node("Concat", [b.constant(np.array([2])), rows, b.constant(np.array([49]))], axis=0)
    b.node("Reshape", [x, target], out="y")
    b.output("y", shape=[2, None, 49])
    proto = b.model()
    model = ir.serde.deserialize_model(proto)
    channels.prepare(model)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    folded_target = reshape.inputs[1].const_value
    if folded_target is not None:  # only with H's entry left to the Reshape (-1)
        assert folded_target.numpy().tolist() == [2, -1, 49]
    folded = ir.serde.serialize_model(model)
    for h in (7, 14, 21):
        data = {"x": np.ones((1, 2, h, 7), np.float32)}
        assert run(folded, data)[0].shape == run(proto, data)[0].shape


def test_embedding_tables_are_sliced_with_the_residual_channels() -> None:
    """BERT's stem: token and position tables looked up by Gather give the residual stream its
    channels, so it stays prunable (it froze at the lookup before)."""
    _, graph = analyse(embedding_lookup())
    tables = [m for m in graph.members if m.node.op_type == "Gather"]
    assert [(m.role, m.axis) for m in tables] == [("shift", 1), ("shift", 1)]
    assert np.array_equal(tables[0].ids, tables[1].ids)
    out = next(layer for layer in graph.layers if len(layer.classes) == 8)
    assert np.array_equal(out.classes, tables[0].ids) and graph.prunable[out.classes].all()


def test_remainder_of_a_symbolic_dim_is_not_folded() -> None:
    """Swin pads to whole windows, (7 - H % 7) % 7: three stand-ins for H can leave the same
    remainder by chance, so a remainder of a symbolic dim is never taken for a constant."""
    from onnxprune import channels
    from onnxprune.channels import shapemath
    from tests.builders import run

    b = GraphBuilder(0)
    x = b.input("x", [1, 2, "H", 7])
    h = b.node("Gather", [b.node("Shape", [x]), b.constant(np.array(2))], axis=0)
    seven = b.constant(np.array(7))
    pad = b.node("Mod", [b.node("Sub", [seven, b.node("Mod", [h, seven])]), seven])
    zero = b.constant(np.array([0]))
    pads = b.node("Concat", [zero, zero, zero, zero, zero, zero,
                             b.node("Unsqueeze", [pad, zero]), zero], axis=0)  # fmt: skip
    b.node("Pad", [x, pads], out="y")
    b.output("y", shape=[1, 2, None, 7])
    proto = b.model()
    model = ir.serde.deserialize_model(proto)
    channels.prepare(model)
    node = next(n for n in model.graph if n.op_type == "Pad")
    walk = channels.Walk(model)
    assert shapemath.shape_value(walk, node.inputs[1], 0, walk.memos[0]) is None
    folded = ir.serde.serialize_model(model)
    for rows in (7, 10, 12):
        data = {"x": np.ones((1, 2, rows, 7), np.float32)}
        assert run(folded, data)[0].shape == run(proto, data)[0].shape


def test_slice_with_computed_bounds_off_the_channel_axis_carries_channels() -> None:
    """x[:, :, :H] with H read from a symbolic dim: the channels on axis 1 pass."""
    b = GraphBuilder(0)
    x = b.input("x", [1, 3, "H", 4])
    h = b.node("Conv", [x, b.weight((8, 3, 1, 1))])
    end = b.node("Gather", [b.node("Shape", [x]), b.constant(np.array([2]))], axis=0)
    h = b.node("Slice", [h, b.constant(np.array([0])), end, b.constant(np.array([2]))])
    b.node("Conv", [b.node("Relu", [h]), b.weight((2, 8, 1, 1))], out="y")
    b.output("y", shape=[1, 2, None, 4])
    graph = analyse(b.model())[1]
    assert graph.prunable[graph.layers[0].classes].all()
