"""Sensitivity: how far the model's outputs move when one layer alone is pruned by magnitude.

The dense model runs once (`baseline`); then, for every prunable layer and every sparsity, only
that layer's smallest-magnitude weights are zeroed (the same exact count and ties as `prune`:
`selection.plan` of that one weight, `ZeroWeightsPass`), the model runs on the same batches and
its outputs are compared with the reference's as `validate` compares them (min cosine, relative
L2 error, top-1 agreement). One model is loaded; each run swaps one weight for a lazily pruned
view of itself, serialises the model into a session and puts the original back, so no copy of
the model and at most one pruned copy of one weight exists at a time.

`protected_keep` turns the result into per-layer minimum retention for `prune` (the rule is its
docstring): layers that break when pruned alone keep more, the global ranking takes the rest.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxprune import selection
from onnxprune.calibration.segments import session_of
from onnxprune.core.progress import step
from onnxprune.errors import InvalidArgumentError
from onnxprune.inputs.readers import Samples
from onnxprune.options import Device, parse_sparsities
from onnxprune.rewrite import ZeroWeightsPass
from onnxprune.storage import io
from onnxprune.validate.measure import (
    Baseline,
    ModelResult,
    agreement,
    agreement_note,
    baseline,
    compare,
    run_model,
)
from onnxprune.weights import Weight, find_weights

DEFAULT_SPARSITIES = (0.5, 0.8, 0.95)
# A layer whose alone-pruned relative output error exceeds this is protected by `prune
# --sensitivity` (its --sensitivity-tolerance).
DEFAULT_TOLERANCE = 0.05
# The table marks this many layers as the most sensitive.
MOST_SENSITIVE = 3


@dataclass
class Point:
    """One layer pruned alone at one sparsity, against the dense reference: the smallest cosine
    and the largest relative L2 error over the outputs, and top-1 agreement where there is one."""

    sparsity: float
    achieved: float  # the layer's own share of zeros after pruning (its zeros before included)
    min_cosine: float | None
    rel_error: float | None  # None where every reference output is all zero
    agreement: float | None


@dataclass
class LayerSensitivity:
    name: str
    op: str
    params: int
    points: list[Point]

    def error(self, sparsity: float) -> float | None:
        """The relative error measured at `sparsity` (None if not measured there)."""
        return next((p.rel_error for p in self.points if p.sparsity == sparsity), None)


@dataclass
class Sensitivity:
    """Every layer's points in graph order, the tensors left alone (with why), the inputs."""

    reference: ModelResult
    sparsities: list[float]
    layers: list[LayerSensitivity]
    skipped: list[tuple[str, str]]
    inputs: str
    samples: int
    generated: bool = False
    agreement_note: str | None = None
    notices: list[str] = field(default_factory=list)

    def most_sensitive(self, count: int = MOST_SENSITIVE) -> list[str]:
        """The layers whose outputs move most at the highest sparsity (largest relative error,
        NaN first, ties in graph order), most sensitive first; none that moved nothing."""
        top = max(self.sparsities)
        harms = []
        for index, layer in enumerate(self.layers):
            error = next(p.rel_error for p in layer.points if p.sparsity == top)
            if error is not None and (math.isnan(error) or error > 0):
                harms.append((-math.inf if math.isnan(error) else -error, index, layer.name))
        return [name for _, _, name in sorted(harms)[:count]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference.to_dict(),
            "sparsities": self.sparsities,
            "inputs": self.inputs,
            "samples": self.samples,
            "generated_inputs": self.generated,
            "top1_agreement_note": self.agreement_note,
            "layers": [
                {
                    "name": layer.name,
                    "op": layer.op,
                    "params": layer.params,
                    "points": [asdict(p) for p in layer.points],
                }
                for layer in self.layers
            ],
            "most_sensitive": self.most_sensitive(),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "notices": self.notices,
        }


def sensitivity(
    model: str | os.PathLike,
    sparsities: str | Sequence[float] = DEFAULT_SPARSITIES,
    *,
    data: Samples | None = None,
    batch_size: int | None = None,
    device: str | Device = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    batch_axes: dict[str, int] | None = None,
) -> Sensitivity:
    """Prune each prunable layer of `model` alone, by magnitude, at each of `sparsities`, and
    measure how far the outputs move from the dense model's on `data` (an .npz, a folder of
    shards, arrays, an iterable of input dicts; generated inputs without it)."""
    sparsities = sorted(set(parse_sparsities(sparsities)))
    graph = io.load_model(model)
    found = find_weights(graph)
    if not found.weights:
        selection.plan(found.weights)  # NothingToPruneError, naming the ops looked for
    with baseline(
        model, data=data, batch_size=batch_size, device=device, input_shapes=input_shapes,
        seed=seed, batch_axes=batch_axes, cost=False,
    ) as base:  # fmt: skip
        layers = []
        runs = len(found.weights) * len(sparsities)
        what = f"pruning {len(found.weights)} layers alone at {len(sparsities)} sparsities"
        with step(what, total=runs) as meter:
            for weight in found.weights:
                points = []
                for sparsity in sparsities:
                    points.append(_point(graph, weight, sparsity, base))
                    meter.advance()
                layers.append(LayerSensitivity(weight.name, weight.op_type, weight.size, points))
        reference, inputs = base.reference, base.inputs
        return Sensitivity(
            reference=reference.result,
            sparsities=sparsities,
            layers=layers,
            skipped=list(found.skipped),
            inputs=inputs.source,
            samples=inputs.samples,
            generated=inputs.generated,
            agreement_note=agreement_note(reference),
            notices=list(inputs.notices),
        )


def _point(graph: ir.Model, weight: Weight, sparsity: float, base: Baseline) -> Point:
    """`weight` alone pruned to `sparsity` in `graph`, run and compared; the graph is left as
    it was (the weight's stored tensor put back)."""
    plan = selection.plan([weight], sparsity)
    original = weight.stored()
    label = f"{base.path} with {weight.name} pruned to {sparsity:g}"
    try:
        ZeroWeightsPass(plan)(graph)
        with session_of(graph, base.runtime, label) as session:
            run = run_model(
                label, base.inputs, base.runtime, base.specs, latency=False, cost=False,
                session=session,
            )  # fmt: skip
    finally:
        weight.set_tensor(original)
    diffs = compare(base.reference, run)
    errors = [d.rel_l2 for d in diffs if d.rel_l2 is not None]
    return Point(
        sparsity=sparsity,
        achieved=plan.sparsity,
        min_cosine=min((d.cosine for d in diffs), default=None),
        rel_error=max(errors) if errors else None,
        agreement=agreement(base.reference, run),
    )


def protected_keep(
    measured: Sensitivity | Mapping[str, Any] | str | os.PathLike,
    sparsity: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, float]:
    """Per-layer minimum kept fraction for pruning to `sparsity`, from a sensitivity analysis
    (the result, its JSON report as a dict, or the report's path).

    The rule: a layer's error at `sparsity` is its relative error at the smallest measured
    sparsity at or above it (the highest measured where `sparsity` is above them all); errors
    grow with sparsity, so this errs on the side of protecting. A layer whose error exceeds
    `tolerance` keeps at least 1 - s of its weights, s the highest measured sparsity not above
    `sparsity` at which its error stayed within `tolerance` (1.0, the whole layer, where none
    did). Every other layer gets 0. Every measured layer is named, so that a file measured on
    another model is recognised.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise InvalidArgumentError(
            f"--sensitivity-tolerance {tolerance!r}: a relative error, at least 0 (0.05 = 5%)"
        )
    layers = _measured_layers(measured)
    keep: dict[str, float] = {}
    for name, points in layers.items():
        at = sorted(points)
        above = [e for s, e in at if s >= sparsity] or [at[-1][1]]
        error = above[0]
        if error is None or error <= tolerance:
            keep[name] = 0.0
            continue
        safe = [s for s, e in at if s <= sparsity and e is not None and e <= tolerance]
        keep[name] = round(1.0 - max(safe), 12) if safe else 1.0
    return keep


def _measured_layers(
    measured: Sensitivity | Mapping[str, Any] | str | os.PathLike,
) -> dict[str, list[tuple[float, float | None]]]:
    """name -> [(sparsity, relative error)] from a result, its JSON dict or its file."""
    if isinstance(measured, Sensitivity):
        return {
            layer.name: [(p.sparsity, p.rel_error) for p in layer.points]
            for layer in measured.layers
        }
    where = "the sensitivity report"
    if isinstance(measured, str | os.PathLike):
        where = f"--sensitivity {measured}"
        try:
            measured = json.loads(Path(measured).read_text())
        except FileNotFoundError:
            raise InvalidArgumentError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(
                f"{where}: not a JSON report of `onnxprune sensitivity` ({exc})"
            ) from None
    try:
        layers = {
            str(layer["name"]): [
                (float(p["sparsity"]), None if p["rel_error"] is None else float(p["rel_error"]))
                for p in layer["points"]
            ]
            for layer in measured["layers"]  # type: ignore[index]
        }
    except (KeyError, TypeError, ValueError):
        raise InvalidArgumentError(
            f"{where}: not a JSON report of `onnxprune sensitivity` (write one with "
            "`onnxprune sensitivity MODEL --report FILE.json`)"
        ) from None
    if not layers or any(not points for points in layers.values()):
        raise InvalidArgumentError(f"{where}: it measured no layer")
    return layers
