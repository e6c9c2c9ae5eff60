"""Selection: exact counts, a brute-force reference, minimum retention, uniform, N:M, ties."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from builders import PATHS, GraphBuilder, threshold_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.errors import InfeasibleError, InvalidArgumentError, NothingToPruneError
from onnxprune.options import MinKeep
from onnxprune.rewrite.unstructured import pruned_array
from onnxprune.scoring.magnitude import magnitude_keys
from onnxprune.selection import plan
from onnxprune.selection import threshold as global_threshold
from onnxprune.weights import find_weights


def weights_of(arrays: list[np.ndarray]):
    """One MatMul per 2-D array, each on its own input, in list order."""
    b = GraphBuilder()
    for i, arr in enumerate(arrays):
        x = b.input(f"x{i}", [1, arr.shape[0]])
        b.node("MatMul", [x, b.weight(arr.shape, name=f"w{i}", array=arr)], out=f"y{i}")
        b.output(f"y{i}")
    return find_weights(ir.serde.deserialize_model(b.model())).weights


def masks(p) -> list[np.ndarray]:
    """Zero masks after pruning, as the rewrite would produce them."""
    out = []
    for layer in p.layers:
        arr = layer.weight.numpy()
        new = pruned_array(layer, layer.weight.tensor(), p.keys) if layer.changed else arr
        out.append(new == 0)
    return out


def reference_global(
    arrays: list[np.ndarray], sparsity: float, keep: list[int]
) -> list[np.ndarray]:
    """Walk the global order (|w|, layer, index), skipping full layers, until the count is met."""
    total = sum(a.size for a in arrays)
    target = round(sparsity * total)
    mags = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in arrays])
    layer = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)])
    index = np.concatenate([np.arange(a.size) for a in arrays])
    zeros = [int((a == 0).sum()) for a in arrays]
    caps = [max(a.size - k, z) for a, k, z in zip(arrays, keep, zeros, strict=True)]
    target = max(target, sum(zeros))
    out = [np.zeros(a.size, bool) for a in arrays]
    counts = [0] * len(arrays)
    taken = 0
    for j in np.lexsort((index, layer, mags)):
        if taken == target:
            break
        if counts[layer[j]] < caps[layer[j]]:
            out[layer[j]][index[j]] = True
            counts[layer[j]] += 1
            taken += 1
    return [m.reshape(a.shape) | (a == 0) for m, a in zip(out, arrays, strict=True)]


def random_arrays(seed: int, n_layers: int = 4, ties: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(1, 12, size=2)) for _ in range(n_layers)]
    if ties:
        return [rng.integers(-3, 4, size=s).astype(np.float32) for s in shapes]
    return [(rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999])
def test_global_count_is_exact(sparsity: float) -> None:
    arrays = random_arrays(0, 6)
    p = plan(weights_of(arrays), sparsity)
    total = sum(a.size for a in arrays)
    assert p.pruned == round(sparsity * total)
    assert sum(int(m.sum()) for m in masks(p)) == p.pruned
    assert p.total == total


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    sparsity=st.floats(0, 0.999),
    ties=st.booleans(),
    keep=st.one_of(st.none(), st.floats(0.0, 0.3), st.integers(0, 20)),
)
def test_global_matches_brute_force_reference(seed, sparsity, ties, keep) -> None:
    arrays = random_arrays(seed, 1 + seed % 5, ties=ties)
    min_keep = None if keep is None else MinKeep.parse(keep)
    keeps = [min_keep.for_layer(a.size) if min_keep else 0 for a in arrays]
    expected = reference_global(arrays, sparsity, keeps)
    for path in PATHS:
        with threshold_path(path):
            try:
                p = plan(weights_of(arrays), sparsity, min_keep=min_keep)
            except InfeasibleError:
                caps = sum(
                    max(a.size - k, int((a == 0).sum())) for a, k in zip(arrays, keeps, strict=True)
                )
                assert round(sparsity * sum(a.size for a in arrays)) > caps
                continue
            for got, want in zip(masks(p), expected, strict=True):
                np.testing.assert_array_equal(got, want, err_msg=path)


def test_float64_weights_use_exact_64_bit_keys() -> None:
    base = np.float64(1.0)
    # differ below float32 resolution: only 64-bit keys can order them
    arr = np.array([[base + 4e-16, base + 2e-16], [base, 5.0]], dtype=np.float64)
    p = plan(weights_of([arr]), 0.5)
    assert p.keys == np.uint64
    np.testing.assert_array_equal(masks(p)[0], [[False, True], [True, False]])


def test_ties_go_to_the_earlier_layer_then_lower_index() -> None:
    arrays = [np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)]
    p = plan(weights_of(arrays), 0.375)  # 3 of 8, all equal
    m = masks(p)
    np.testing.assert_array_equal(m[0].ravel(), [True, True, True, False])
    assert not m[1].any()


def test_existing_zeros_count_as_pruned() -> None:
    arr = np.arange(1, 11, dtype=np.float32).reshape(2, 5)
    arr[0, :3] = 0
    p = plan(weights_of([arr]), 0.5)
    assert p.zeros_before == 3 and p.pruned == 5
    np.testing.assert_array_equal(masks(p)[0].ravel(), [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_target_below_existing_zeros_warns_and_prunes_nothing() -> None:
    arr = np.zeros((2, 5), np.float32)
    arr[0, 0] = 1
    p = plan(weights_of([arr]), 0.5)
    assert p.pruned == 9 and not any(layer.changed for layer in p.layers)
    assert "already has 9 zero weights" in p.warnings[0]


def test_min_keep_fraction_and_count() -> None:
    rng = np.random.default_rng(1)
    arrays = [
        rng.uniform(0.001, 0.01, (10, 10)).astype(np.float32),
        rng.uniform(1, 10, (10, 10)).astype(np.float32),
    ]
    collapsed = plan(weights_of(arrays), 0.5)
    assert collapsed.layers[0].kept == 0
    assert any("layer collapse" in w for w in collapsed.warnings)
    kept = plan(weights_of(arrays), 0.5, min_keep="0.1")
    assert [layer.kept for layer in kept.layers] == [10, 90]
    assert kept.pruned == 100 and not kept.warnings
    counted = plan(weights_of(arrays), 0.5, min_keep=25)
    assert [layer.kept for layer in counted.layers] == [25, 75]


def test_min_keep_larger_than_layer_keeps_layer_dense() -> None:
    arrays = [np.ones((2, 2), np.float32), np.full((10, 10), 2, np.float32)]
    p = plan(weights_of(arrays), 0.5, min_keep=10)
    assert p.layers[0].kept == 4 and p.pruned == 52


def test_infeasible_min_keep_names_highest_sparsity() -> None:
    arrays = [np.ones((10, 10), np.float32)]
    with pytest.raises(InfeasibleError, match=r"highest sparsity it allows is 0\.9000"):
        plan(weights_of(arrays), 0.95, min_keep="0.1")


def test_uniform_same_sparsity_every_layer_and_exact_total() -> None:
    arrays = random_arrays(3, 5)
    p = plan(weights_of(arrays), 0.7, method="uniform")
    assert p.pruned == round(0.7 * p.total)
    for layer in p.layers:
        assert abs(layer.prune - 0.7 * layer.size) < 1
    for layer, m in zip(p.layers, masks(p), strict=True):
        kept = np.abs(layer.weight.numpy())[~m]
        gone = np.abs(layer.weight.numpy())[m]
        if kept.size and gone.size:
            assert gone.max() <= kept.min()  # the smallest of each layer go


def test_uniform_with_min_keep_moves_the_excess_elsewhere() -> None:
    arrays = [np.ones((2, 5), np.float32), np.ones((10, 10), np.float32)]
    p = plan(weights_of(arrays), 0.8, method="uniform", min_keep=5)
    assert p.layers[0].kept >= 5 and p.pruned == round(0.8 * 110)


def test_two_runs_identical() -> None:
    arrays = random_arrays(7, 4, ties=True)
    a = masks(plan(weights_of(arrays), 0.6, min_keep="0.05"))
    b = masks(plan(weights_of(arrays), 0.6, min_keep="0.05"))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_two_four_pattern() -> None:
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((8, 6)).astype(np.float32)  # MatMul B: input axis 0
    p = plan(weights_of([arr, rng.standard_normal((6, 3)).astype(np.float32)]), pattern="2:4")
    m = masks(p)[0]
    groups = np.moveaxis(m, 0, -1).reshape(-1, 4)
    assert (groups.sum(axis=1) == 2).all()
    kept = np.moveaxis(np.abs(arr), 0, -1).reshape(-1, 4)
    g = groups
    assert (kept[g].reshape(-1, 2).max(axis=1) <= kept[~g].reshape(-1, 2).min(axis=1)).all()
    assert p.layers[1].pattern is None and "not a multiple of 4" in p.warnings[0]
    assert p.pruned == 24


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range(bad: float) -> None:
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\)"):
        plan(weights_of([np.ones((2, 2), np.float32)]), bad)


def test_errors_for_method_pattern_and_empty() -> None:
    w = weights_of([np.ones((2, 2), np.float32)])
    with pytest.raises(InvalidArgumentError, match="--method"):
        plan(w, 0.5, method="random")
    with pytest.raises(InvalidArgumentError, match="--pattern"):
        plan(w, pattern="4:2")
    with pytest.raises(NothingToPruneError, match="Conv, ConvTranspose, Gemm, MatMul"):
        plan([], 0.5)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0.02", MinKeep(fraction=0.02)),
        ("2%", MinKeep(fraction=0.02)),
        ("100", MinKeep(count=100)),
        (5, MinKeep(count=5)),
        (0.5, MinKeep(fraction=0.5)),
        (None, None),
    ],
)
def test_min_keep_parse(spec, expected) -> None:
    assert MinKeep.parse(spec) == expected


@pytest.mark.parametrize("spec", ["abc", "-1", "1.5", "150%"])
def test_min_keep_parse_errors(spec) -> None:
    with pytest.raises(InvalidArgumentError, match="--min-keep"):
        MinKeep.parse(spec)


@pytest.mark.parametrize("path", ["radix", "window"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_reads_give_the_same_masks(monkeypatch, chunk, path) -> None:
    """Ties and thresholds must carry across chunk boundaries exactly."""
    import onnxprune.core.tensors as weights

    arrays = random_arrays(11, 4, ties=True)
    expected = masks(plan(weights_of(arrays), 0.55, min_keep=3))
    monkeypatch.setattr(weights, "CHUNK", chunk)
    with threshold_path(path):
        got = masks(plan(weights_of(arrays), 0.55, min_keep=3))
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(got, reference_global(arrays, 0.55, [3] * 4), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("dtypes", "keys"),
    [
        ((np.float16, np.float16), np.uint16),
        ((ml_dtypes.bfloat16, ml_dtypes.bfloat16), np.uint16),
        ((np.float16, np.float32), np.uint32),
        ((np.float16, ml_dtypes.bfloat16), np.uint32),
        ((np.float32, np.float64), np.uint64),
    ],
    ids=["fp16", "bf16", "fp16+fp32", "fp16+bf16", "fp32+fp64"],
)
@pytest.mark.parametrize("path", PATHS)
def test_key_width_per_precision_mix_matches_reference(dtypes, keys, path) -> None:
    rng = np.random.default_rng(5)
    arrays = [
        (rng.standard_normal((9, 7)) * s).astype(d) for d, s in zip(dtypes, (0.5, 2), strict=True)
    ]
    arrays[0][0, :3] = 0  # existing zeros, and ties among them
    arrays[0][1, 0] = -0.0  # a negative zero is a zero too
    for sparsity, keep in ((0.3, None), (0.8, 4)):
        with threshold_path(path):
            p = plan(weights_of(arrays), sparsity, min_keep=keep)
        assert p.keys == keys
        expected = reference_global(arrays, sparsity, [keep or 0] * 2)
        for got, want in zip(masks(p), expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("sparsity", "keep"), [(0.5, None), (0.9, None), (0.97, 0.02)])
def test_sampled_window_finds_the_threshold_in_one_pass(dtype, sparsity, keep) -> None:
    """With a real sample the window holds the threshold: one pass, the radix path's very cuts."""
    rng = np.random.default_rng(3)
    scales = (0.02, 0.5, 0.05, 3.0)  # layers of very different scale: the floor binds at 0.97
    arrays = [(rng.standard_normal((300, 200)) * s).astype(dtype) for s in scales]
    weights = weights_of(arrays)
    keys = np.dtype(np.uint16 if dtype == np.float16 else np.uint32)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    min_keep = MinKeep.parse(keep)
    keep_counts = np.array([min_keep.for_layer(n) if min_keep else 0 for n in sizes])
    target = round(sparsity * int(sizes.sum()))
    results = {}
    for path in ("radix", "window"):
        with threshold_path(path), pytest.MonkeyPatch.context() as patch:
            patch.setattr(global_threshold, "SAMPLE_BLOCKS", 256)
            patch.setattr(global_threshold, "SAMPLE_BLOCK", 64)
            found = global_threshold.GlobalSelection(weights, keys, sizes, keep_counts, target)
            results[path] = (*found.select(target), found.passes, found.window)
    counts, cuts, passes, window = results["window"]
    assert window is not None and passes == 1
    every = np.concatenate([magnitude_keys(a, keys) for a in arrays])
    assert np.mean((every >= window[0]) & (every <= window[1])) < 0.1  # a narrow window
    np.testing.assert_array_equal(counts, results["radix"][0])
    assert cuts == results["radix"][1]
    assert results["radix"][2] == (1 if dtype == np.float16 else 2)
    if keep:
        assert (counts == sizes - keep_counts).any()  # the floor did bind somewhere


def test_the_report_says_how_the_sparsity_spread() -> None:
    """Three layers of very different scales under one global ranking: the small one empties
    first; the report names the least and most pruned layer and the quartiles, exactly."""
    import onnxprune
    from onnxprune.report.weights import format_report

    b = GraphBuilder(5)
    h = b.input("x", ["N", 16])
    for name, scale in (("big", 10.0), ("mid", 1.0), ("small", 0.01)):
        h = b.node("MatMul", [h, b.weight((16, 16), name=name, scale=scale)])
    b.output(h)
    model = ir.serde.deserialize_model(b.model())
    _, report = onnxprune.prune(model, 0.5)
    rates = {layer["name"]: layer["sparsity"] for layer in report.to_dict()["layers"]}
    spread = report.to_dict()["spread"]
    assert spread["min"] == {"layer": "big", "sparsity": rates["big"]}
    assert spread["max"] == {"layer": "small", "sparsity": 1.0}
    assert spread["quartiles"] == pytest.approx(
        np.quantile(list(rates.values()), [0.25, 0.5, 0.75])
    )
    assert spread["weights_in_layers_above_0.9"] == pytest.approx(1 / 3)
    assert spread["how"] == "one ranking over all layers"
    assert "spread (one ranking over all layers): layers from" in format_report(report)
    from onnxprune.options import Selection

    uniform_options = Selection(0.5, method="uniform")
    _, uniform = onnxprune.prune(ir.serde.deserialize_model(b.model()), uniform_options)
    assert uniform.to_dict()["spread"]["quartiles"] == [0.5, 0.5, 0.5]
