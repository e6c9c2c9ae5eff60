"""Segments and the sequential walk: cuts where little is alive, and statistics identical to
rerunning the whole model for every wave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from builders import GraphBuilder, small_cnn
from channel_models import random_transformer

import onnxprune
from onnxprune.calibration import capture, load_samples
from onnxprune.calibration.segments import Store, find_segments, live_elements
from onnxprune.calibration.walk import SequentialWalk
from onnxprune.core.graphs import copy_model
from onnxprune.options import Calibration
from onnxprune.runtime import select_runtime
from onnxprune.weights import find_weights

DECODER = Path(__file__).parent.parent / "models" / "decoder"


def chain(layers: int = 4, width: int = 12) -> ir.Model:
    b = GraphBuilder(5)
    h = b.input("x", ["N", width])
    for i in range(layers):
        h = b.node("Gemm", [h, b.weight((width, width), name=f"W{i}")], transB=1)
        h = b.node("Relu", [h], out="y" if i == layers - 1 else None)
    b.output("y")
    return ir.serde.deserialize_model(b.model())


def layer_nodes(model: ir.Model) -> dict[int, list[ir.Node]]:
    found = find_weights(model).weights
    return {i: [u.node for u in w.uses] for i, w in enumerate(found)}


def test_a_chain_is_cut_between_every_layer() -> None:
    model = chain()
    segments = find_segments(model, layer_nodes(model))
    assert [s.layers for s in segments] == [[0], [1], [2], [3]]


def test_a_residual_block_is_not_cut_inside() -> None:
    """small_cnn: Conv-BN-ReLU, then a Conv whose output is added to the ReLU's: the residual
    keeps two values alive inside the block, so the cuts fall around it."""
    model = ir.serde.deserialize_model(small_cnn())
    nodes = layer_nodes(model)
    segments = find_segments(model, nodes)
    live = live_elements(model)
    order = {n: i for i, n in enumerate(model.graph)}
    for s in segments[1:]:
        # every cut is a boundary where no more is alive than at the other candidates
        assert live[s.start] <= max(live[order[n[0]] + 1] for n in nodes.values())
    assert sorted(i for s in segments for i in s.layers) == sorted(nodes)


def test_store_spills_past_its_budget_and_reads_back() -> None:
    store = Store(budget=0)
    arrays = [np.random.default_rng(i).standard_normal((300, 1000)) for i in range(3)]
    for i, a in enumerate(arrays):
        store.put("v", i, a)
    assert store.used == 0 and store._folder is not None
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(store.get("v", i), a)
    store.close()


def zero_half(weight) -> None:
    array = np.array(weight.numpy(), copy=True)
    array.reshape(-1)[::2] = 0
    weight.set_values(array)


@pytest.mark.parametrize("name", ["transformer", "cnn", "decoder"])
def test_walk_statistics_equal_whole_model_reruns(name: str) -> None:
    """Each wave's paired statistics from the segment walk equal those of running the whole
    pruned and dense models again (capture.collect), while layers change between waves."""
    if name == "transformer":
        model = ir.serde.deserialize_model(random_transformer(1))
        data = {"x": np.random.default_rng(55).standard_normal((12, 4, 6)).astype(np.float32)}
    elif name == "cnn":
        model = ir.serde.deserialize_model(small_cnn())
        data = {"x": np.random.default_rng(3).standard_normal((12, 3, 8, 8)).astype(np.float32)}
    else:
        model = onnxprune.load_model(DECODER / "tiny.legacy.onnx")
        tokens = np.load(DECODER / "tokens.npz")
        data = {k: tokens[k][:6, :32] for k in tokens.files}
    options = Calibration(data=data, device="cpu", batch_size=4)
    samples = load_samples(model, options)
    runtime = select_runtime("cpu")
    dense = copy_model(model)
    weights = find_weights(model).weights
    chosen = list(range(len(weights)))
    walk = SequentialWalk(model, dense, weights, chosen, samples, runtime, {})
    assert len(walk.segments) >= 2
    waves = 0
    for wave, stats in walk.rounds():
        batch = [weights[i] for i in wave]
        expected = capture.collect(
            model, batch, samples, runtime, budget_bytes=1 << 30, dense=dense
        )
        for weight in batch:
            got, want = stats.layers[weight.name], expected.layers[weight.name]
            assert got.rows == want.rows
            for a, b in ((got.gram, want.gram), (got.cross, want.cross), (got.sums, want.sums)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
            zero_half(weight)  # the next waves see it changed
        waves += 1
    assert waves >= 2
