"""Structured targets say plainly how much whole channels can reach, and warn when a layer is
cut down to a sliver of its channels (channel collapse)."""

from __future__ import annotations

import numpy as np

from onnxprune import pipeline
from onnxprune.options import Selection
from onnxprune.report.weights import format_report
from tests.builders import GraphBuilder, save


def wide_head_model() -> GraphBuilder:
    """A small conv trunk (prunable) beside a big MatMul that reads the model input and feeds an
    output (frozen both ways): most parameters sit where channels cannot go."""
    b = GraphBuilder(0)
    x = b.input("x", ["N", 3, 4, 4])
    h = b.node(
        "Relu", [b.node("Conv", [x, b.weight((16, 3, 3, 3)), b.weight((16,))], pads=[1] * 4)]
    )
    h = b.node("Relu", [b.node("Conv", [h, b.weight((16, 16, 1, 1)), b.weight((16,))])])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.node("Gemm", [h, b.weight((10, 16)), b.weight((10,))], out="y", transB=1)
    b.output("y")
    b.node("MatMul", [b.node("Flatten", [x]), b.weight((48, 200))], out="side")
    b.output("side")
    return b


def test_reach_is_reported_and_collapse_warned(tmp_path) -> None:
    source = save(wide_head_model().model(), tmp_path / "m.onnx")
    _, report = pipeline.prune(source, 0.075, structured=True, output=tmp_path / "o.onnx")
    plan = report.channels
    before = plan.params[0]
    assert 0 < plan.reach < before
    text = format_report(report)
    share = plan.reach / before
    assert f"whole channels can remove at most {share:.0%} of the params" in text
    assert report.to_dict()["reach"] == plan.reach
    collapse = [w for w in plan.warnings if w.startswith("channel collapse")]
    assert collapse, plan.warnings
    assert "--min-keep 10%" in collapse[0]
    # a per-layer minimum spreads the removal: no collapse, and the target still met
    _, kept = pipeline.prune(
        source, Selection(0.04, min_keep="25%"), structured=True, output=tmp_path / "p.onnx"
    )
    assert not [w for w in kept.channels.warnings if w.startswith("channel collapse")]
    assert kept.channels.achieved >= 0.04


def test_no_collapse_warning_for_a_gentle_cut(tmp_path) -> None:
    source = save(wide_head_model().model(), tmp_path / "m.onnx")
    _, report = pipeline.prune(source, 0.02, structured=True)
    assert not [w for w in report.channels.warnings if w.startswith("channel collapse")]
    assert np.isclose(report.channels.target, 0.02)
