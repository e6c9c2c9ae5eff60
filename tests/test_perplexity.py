"""Perplexity as a metric: every tiny decoder export scores 9.0672 on the held-out tokens (as
bench/torch_reference.py's ONNX helper does), in the table and the JSON of validate, prune and
sweep; the --max-perplexity-ratio gate; KV-cache exports fed as their first step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune import Validation
from onnxprune.cli import main
from onnxprune.errors import DataError, InvalidArgumentError
from onnxprune.validate import validate
from onnxprune.validate.metrics import PerplexityAccumulator

DECODERS = Path(__file__).resolve().parent.parent / "models" / "decoder"
HELDOUT = DECODERS / "heldout.npz"
DENSE = 9.0672


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "name", ["tiny.legacy", "tiny.dynamo", "tiny.kv.legacy", "tiny.kv.dynamo", "tiny.optimum"]
)
def test_every_tiny_export_scores_the_reference_perplexity(name) -> None:
    path = DECODERS / f"{name}.onnx"
    result = validate(path, path, data=HELDOUT, device="cpu", latency=False, metric="perplexity")
    assert result.reference.perplexity == pytest.approx(DENSE, abs=5e-5)
    assert result.perplexity_ratio == 1.0
    assert result.reference.tokens == 16 * 63  # every pair of neighbours, no padding


def test_accumulator_leaves_out_padding_and_matches_a_direct_sum() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    acc = PerplexityAccumulator()
    acc.update(logits, ids, mask)
    nll, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t] and mask[b, t + 1]:
                z = logits[b, t].astype(np.float64)
                nll += math.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[b, t + 1]]
                n += 1
    assert acc.tokens == n == 6
    assert acc.result() == pytest.approx(math.exp(nll / n))
    with pytest.raises(DataError, match="vocabulary"):
        acc.update(logits, np.full((2, 5), 9), None)


def test_validate_command_prints_and_reports_perplexity(tmp_path) -> None:
    model = DECODERS / "tiny.legacy.onnx"
    pruned = tmp_path / "p.onnx"
    assert invoke(model, "-s", "0.5", "-o", pruned, "-q").exit_code == 0
    report = tmp_path / "v.json"
    result = invoke(
        "validate", model, pruned, "--data", HELDOUT, "--metric", "perplexity",
        "--device", "cpu", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("perplexity "))
    assert "9.0672" in line
    data = json.loads(report.read_text())
    assert data["reference"]["perplexity"] == pytest.approx(DENSE, abs=5e-5)
    assert data["candidate"]["perplexity"] > DENSE and data["metric"] == "perplexity"
    assert data["perplexity_ratio"] == pytest.approx(
        data["candidate"]["perplexity"] / data["reference"]["perplexity"]
    )
    gated = invoke(
        "validate", model, pruned, "--data", HELDOUT, "--metric", "perplexity",
        "--device", "cpu", "--max-perplexity-ratio", "1.0001", "-q",
    )  # fmt: skip
    assert gated.exit_code == 1
    assert "--max-perplexity-ratio 1.0001" in gated.stderr


def test_perplexity_needs_token_ids_and_data(tmp_path) -> None:
    model = DECODERS / "tiny.legacy.onnx"
    result = invoke("validate", model, model, "--metric", "perplexity", "--device", "cpu")
    assert result.exit_code == 2 and "needs token ids" in result.stderr
    ratio = invoke("validate", model, model, "--data", HELDOUT, "--max-perplexity-ratio", "1.1")
    assert ratio.exit_code == 2 and "needs --metric perplexity" in ratio.stderr
    with pytest.raises(InvalidArgumentError, match="needs --metric perplexity"):
        Validation(data=HELDOUT, max_perplexity_ratio=1.1)


def test_prune_api_validates_with_perplexity(tmp_path) -> None:
    import onnxprune

    _, report = onnxprune.prune(
        DECODERS / "tiny.legacy.onnx",
        0.3,
        output=tmp_path / "o.onnx",
        validation=Validation(
            data=HELDOUT, device="cpu", metric="perplexity", max_perplexity_ratio=5.0
        ),
    )
    validation = report.to_dict()["validation"]
    assert validation["reference"]["perplexity"] == pytest.approx(DENSE, abs=5e-5)
    assert 1.0 <= validation["perplexity_ratio"] <= 5.0


def test_sweep_has_a_perplexity_column() -> None:
    result = invoke(
        "sweep", DECODERS / "tiny.legacy.onnx", "--data", HELDOUT, "--metric", "perplexity",
        "--sparsities", "0.3", "--min-keep", "0", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    assert "perplexity" in header
    dense = next(x for x in result.stdout.splitlines() if x.startswith("dense"))
    assert "9.0672" in dense
