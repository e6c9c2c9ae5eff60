"""Decide which channels go: a global ranking over channel classes, as selection ranks weights.

Classes are ranked by importance (scoring.channel_scores), lowest first, ties by class number, so
the same model always gives the same file. The walk skips a class whose removal would leave some
layer with fewer channels than --min-keep (and never fewer than one). With --round-to N, the classes
of a group whose layers all share the same channels go in units that keep the count a multiple of
N. The accepted order is then cut at the shortest prefix that removes the target share of the
prunable weights' parameters (or of their multiply-accumulates with target="macs"), counted
exactly: removing an output and an input channel of one weight does not count their overlap twice.

Normalisation (scoring.channel_scores), measured with bench/channel_norms.py on
models/digits_cnn.onnx: held-out accuracy after structured pruning, no fine-tuning.

    sparsity   mean    rms   none
    0.1       0.996  0.982  0.996
    0.3       0.989  0.920  0.976
    0.5       0.953  0.438  0.953

"mean" (each member divided by its own mean channel norm) was never worse and is the default: every
layer's average channel weighs 1 whatever its fan-in or weight scale. "rms" (norm per weight
element) lost the most; "none" (raw norms) tied at 0.1 and 0.5 and lost in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxprune import macs
from onnxprune.channels import ChannelGraph
from onnxprune.core import quantized
from onnxprune.core.tensors import const_tensor
from onnxprune.errors import InfeasibleError, InvalidArgumentError
from onnxprune.options import MinKeep, check_sparsity
from onnxprune.scoring.magnitude import channel_scores
from onnxprune.weights import PRUNABLE_OPS

TARGETS = ("params", "macs")
# A layer with at least this many channels that keeps at most COLLAPSE_KEEP of them (one at
# least) is reported as collapsed: a bottleneck that no re-solve can widen again.
COLLAPSE_MIN_CHANNELS = 4
COLLAPSE_KEEP = 0.05


@dataclass(eq=False)
class Counted:
    """A weight tensor whose parameters (and MACs per parameter) the target counts."""

    value: ir.Value
    shape: tuple[int, ...]
    macs_per_param: int
    axes: dict[int, np.ndarray] = field(default_factory=dict)  # axis -> classes along it
    # nodes whose MACs depend on a size the model leaves open (counted as 1 there)
    open_dims: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def kept(self, removed: np.ndarray) -> int:
        size = self.size
        for axis, ids in self.axes.items():
            size = size * int(np.count_nonzero(~removed[ids])) // self.shape[axis]
        return size


@dataclass
class ChannelPlan:
    """Which channel classes go, and what that does to parameters and MACs."""

    graph: ChannelGraph
    removed: np.ndarray  # bool per class
    counted: list[Counted]
    target: float = 0.0
    metric: str = "params"
    min_keep: MinKeep | None = None
    round_to: int | None = None
    warnings: list[str] = field(default_factory=list)
    macs_at: dict[str, list[int]] = field(default_factory=dict)  # input shapes MACs count at
    reach: int | None = None  # the most of the target metric whole channels can remove

    def kept_of(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(~self.removed[ids]))

    @property
    def params(self) -> tuple[int, int]:
        """(before, after) over the counted weights."""
        return (
            sum(c.size for c in self.counted),
            sum(c.kept(self.removed) for c in self.counted),
        )

    @property
    def macs(self) -> tuple[int, int]:
        return (
            sum(c.size * c.macs_per_param for c in self.counted),
            sum(c.kept(self.removed) * c.macs_per_param for c in self.counted),
        )

    @property
    def macs_open(self) -> list[str]:
        """Nodes whose MACs depend on sizes the model leaves open (a symbolic height, width or
        sequence): with any, `macs` counts those sizes as 1 and is no MAC count."""
        return [name for c in self.counted for name in c.open_dims]

    @property
    def achieved(self) -> float:
        before, after = self.macs if self.metric == "macs" else self.params
        return 1 - after / before if before else 0.0


def sample_shapes(
    model: ir.Model, given: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]] | None:
    """The model's input shapes for one sample: `given` (--input-shape) where it names an input,
    else the declared ones with a symbolic dim named like one `given` sets at its size and a
    symbolic first axis (the batch) as 1; None when some other size stays open (a symbolic
    height, width or sequence)."""
    given = dict(given or {})
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    bound: dict[str, int] = {}
    for value in inputs:
        for d, n in zip(value.shape or (), given.get(str(value.name), ()), strict=False):
            if isinstance(d, ir.SymbolicDim) and d.value:
                bound.setdefault(d.value, n)
    shapes = {}
    for value in inputs:
        name = str(value.name)
        if name in given:
            shapes[name] = tuple(given[name])
            continue
        if value.shape is None:
            return None
        dims = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, ir.SymbolicDim) and d.value in bound:
                dims.append(bound[d.value])
            elif axis == 0:
                dims.append(1)
            else:
                return None
        shapes[name] = tuple(dims)
    return shapes


def _macs_at(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None) -> dict[ir.Node, int]:
    """Each Conv/ConvTranspose/Gemm/MatMul node's MACs at `shapes`, counted on a copy whose
    shapes are resolved there (macs.resolve_shapes: what validation counts); nodes that stay
    unknown are left out."""
    if shapes is None:
        return {}
    copy = model.clone()  # shares the tensors; nodes in the same order
    macs.resolve_shapes(copy, shapes)
    found = {}
    for node, twin in zip(model.graph, copy.graph, strict=True):
        if node.op_type in PRUNABLE_OPS:
            count = macs.node_macs(twin, macs.known_dims)
            if count is not None:
                found[node] = count
    return found


def _macs_per_param(node: ir.Node, size: int, at: dict[ir.Node, int]) -> tuple[int, bool]:
    """Multiply-accumulates one element of a weight of `size` elements costs in this node, for
    one sample: from `at` (_macs_at), else macs.node_macs at the model's own shapes, a symbolic
    batch counted as 1; and whether that needed a size the model leaves open (a symbolic
    height, width or sequence, counted as 1: the figure is then per unit of it, not a count)."""
    if node in at:
        return max(1, round(at[node] / size)) if size else 0, False
    open_dims = False

    def dims(value: ir.Value | None) -> tuple[int, ...] | None:
        nonlocal open_dims
        tensor = const_tensor(value)
        if tensor is not None:
            return tuple(int(d) for d in tensor.shape)
        if value is None or value.shape is None:
            return None
        out = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int) and d > 0:
                out.append(d)
            else:
                open_dims = open_dims or axis > 0
                out.append(1)
        return tuple(out)

    dense = macs.node_macs(node, dims)
    if dense is None:
        return 1, True
    return max(1, round(dense / size)) if size else 0, open_dims


def _stored_source(value: ir.Value | None) -> ir.Value | None:
    """The stored tensor behind Identity/Cast/Transpose (how exporters often hand weights over)
    and DequantizeLinear (a quantized weight's q)."""
    for _ in range(16):
        if value is None or const_tensor(value) is not None:
            return value
        node = value.producer()
        if node is None or (
            node.op_type not in ("Identity", "Cast", "Transpose") and not quantized.viewable(node)
        ):
            return value
        value = node.inputs[0]
    return value


def counted_weights(
    model: ir.Model,
    graph: ChannelGraph,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[Counted]:
    """Every stored weight of Conv, ConvTranspose, Gemm and MatMul, with the sliced axes; MACs
    per parameter at `input_shapes` (sample_shapes: the model's own for one sample where they
    leave something out)."""
    at = _macs_at(model, sample_shapes(model, input_shapes))
    found: dict[ir.Value, Counted] = {}
    for node in model.graph:
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for value in node.inputs[:2]:
            value = _stored_source(value)
            tensor = const_tensor(value)
            if tensor is None or value is None or len(tensor.shape) < 2:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            counted = found.setdefault(value, Counted(value, shape, 0))
            per_param, open_dims = _macs_per_param(node, counted.size, at)
            counted.macs_per_param += per_param
            if open_dims:
                counted.open_dims.append(node.name or node.outputs[0].name or node.op_type)
    for member in graph.members:
        if member.role in ("out", "in"):
            counted = found.get(member.value)
            if counted is None:  # read by something else than a weight slot: no MACs
                tensor = const_tensor(member.value)
                assert tensor is not None
                shape = tuple(int(d) for d in tensor.shape)
                counted = found.setdefault(member.value, Counted(member.value, shape, 0))
            counted.axes[member.axis] = member.ids
    return list(found.values())


def _units(
    graph: ChannelGraph, scores: np.ndarray, round_to: int | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Removal units (arrays of classes) and their scores, in the order they are tried."""
    prunable = graph.prunable
    units: list[np.ndarray] = []
    unit_scores: list[float] = []
    grouped = np.zeros(graph.n_classes, dtype=bool)
    if round_to and round_to > 1:
        for group in graph.groups:
            sets = {tuple(np.unique(graph.layers[i].classes)) for i in group.layers}
            if len(sets) != 1:
                continue
            classes = np.asarray(sets.pop(), dtype=np.int64)
            step = _class_step([graph.layers[i].classes for i in group.layers], round_to)
            if len(classes) < step:
                continue  # too narrow to round: its channels go one by one
            free = classes[prunable[classes]]
            free = free[np.lexsort((free, scores[free]))]
            first = len(classes) % step
            bounds = [first] if first else []
            bounds += list(range(first + step, len(free) + 1, step))
            start = 0
            for end in bounds:
                if end > len(free):
                    break
                units.append(free[start:end])
                unit_scores.append(float(scores[free[start:end]].mean()))
                start = end
            grouped[classes] = True
    rest = np.flatnonzero(prunable & ~grouped)
    units += [rest[i : i + 1] for i in range(len(rest))]
    unit_scores += scores[rest].tolist()
    order = np.lexsort(([int(u[0]) for u in units], unit_scores)) if units else np.zeros(0, int)
    return [units[i] for i in order], np.asarray(unit_scores)[order]


def class_costs(graph: ChannelGraph, counted: Sequence[Counted], target: str) -> np.ndarray:
    """What removing each class alone saves of the target metric (parameters or MACs)."""
    cost = np.zeros(graph.n_classes, dtype=np.float64)
    for c in counted:
        scale = c.size * (c.macs_per_param if target == "macs" else 1)
        for axis, ids in c.axes.items():
            np.add.at(cost, ids, scale / c.shape[axis])
    return cost


def _class_step(layers: Sequence[np.ndarray], round_to: int) -> int:
    """Classes per rounding unit: round_to channels, or fewer classes where each class is several
    channels of every layer (an attention head is head_dim of them: with head_dim 32 and N = 8,
    heads go one by one and every count stays a multiple of 8)."""
    widths = {int(w) for ids in layers for w in np.unique(ids, return_counts=True)[1]}
    if len(widths) != 1:
        return round_to
    return round_to // math.gcd(widths.pop(), round_to)


def plan_channels(
    model: ir.Model,
    graph: ChannelGraph,
    sparsity: float,
    *,
    min_keep: MinKeep | str | float | int | None = None,
    round_to: int | None = None,
    target: str = "params",
    normalize: str = "mean",
    scores: np.ndarray | None = None,
    per_cost: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ChannelPlan:
    """Choose the channel classes to remove so that `sparsity` of the target metric goes.

    `scores` (one per class, lowest removed first) replace the weight norms: calibration's;
    `per_cost` divides them by what each class saves of the target metric (class_costs), so the
    cheapest error per parameter or MAC goes first. MACs count at `input_shapes` (--input-shape;
    sample_shapes: the model's own for one sample where they leave something out)."""
    sparsity = check_sparsity(sparsity)
    if target not in TARGETS:
        raise InvalidArgumentError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise InvalidArgumentError(f"--round-to {round_to!r}: must be a positive whole number")
    if not isinstance(min_keep, MinKeep):
        min_keep = MinKeep.parse(min_keep)
    shapes = sample_shapes(model, input_shapes)
    counted = counted_weights(model, graph, shapes)
    plan = ChannelPlan(
        graph, np.zeros(graph.n_classes, dtype=bool), counted, sparsity, target, min_keep, round_to
    )
    plan.macs_at = {name: list(dims) for name, dims in (shapes or {}).items()}
    if target == "macs" and plan.macs_open:
        plan.warnings.append(
            f"--target macs: {len(plan.macs_open)} layers' MACs depend on sizes the model leaves "
            f"open (a symbolic height, width or sequence; e.g. {plan.macs_open[0]!r}), counted "
            "as 1 each: layers are weighed by MACs per unit of those sizes, not by MACs"
        )
    before = (plan.macs if target == "macs" else plan.params)[0]
    goal = round(sparsity * before)
    if goal == 0:
        return plan
    if scores is None:
        scores = channel_scores(graph, normalize)
    elif per_cost:
        scores = scores / np.maximum(class_costs(graph, counted, target), 1)
    units, _ = _units(graph, scores, round_to)
    accepted = _accept(graph, units, min_keep, round_to)

    def removed_by(count: int) -> tuple[np.ndarray, int]:
        removed = np.zeros(graph.n_classes, dtype=bool)
        if count:
            removed[np.concatenate(accepted[:count])] = True
        kept = sum(c.kept(removed) * (c.macs_per_param if target == "macs" else 1) for c in counted)
        return removed, before - kept

    lo, hi = 0, len(accepted)
    most = removed_by(hi)[1]
    plan.reach = most
    if most < goal:
        best = math.floor(most / before * 10000) / 10000
        raise InfeasibleError(
            f"only {most} of {before} {target} can be removed by whole channels (sparsity "
            f"{best:.4f}): the rest is frozen or held by --min-keep; lower --sparsity or "
            "--min-keep; `onnxprune inspect MODEL --structured` lists the frozen groups and why"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if removed_by(mid)[1] >= goal:
            hi = mid
        else:
            lo = mid + 1
    plan.removed = removed_by(lo)[0]
    if not round_to:
        ragged = [
            layer.name
            for layer in graph.layers
            if len(layer.classes) % 8 == 0 and plan.kept_of(layer.classes) % 8
        ]
        if ragged:
            plan.warnings.append(
                f"{len(ragged)} layers keep channel counts that are no longer multiples of 8 "
                f"(e.g. {ragged[0]}): ONNX Runtime's blocked (NCHWc) CPU kernels then fall back "
                "to slower ones; --round-to 8 (16 on AVX-512) avoids that"
            )
    collapsed = [
        (layer.name, plan.kept_of(layer.classes), n)
        for layer in graph.layers
        if (n := len(np.unique(layer.classes))) >= COLLAPSE_MIN_CHANNELS
        and plan.kept_of(layer.classes) <= max(1, COLLAPSE_KEEP * n)
    ]
    if collapsed:
        name, kept, n = collapsed[0]
        plan.warnings.append(
            f"channel collapse: {len(collapsed)} layer(s) keep {COLLAPSE_KEEP:.0%} of their "
            f"channels or fewer (e.g. {name}: {kept} of {n}); --sparsity {sparsity:g} asks for "
            f"{sparsity / max(most / before, 1e-12):.0%} of what whole channels can remove here "
            f"({most / before:.0%} of the {target}); a per-layer minimum (--min-keep 10%) "
            "spreads the removal"
        )
    normed = {
        m.node.name or m.node.op_type
        for m in graph.members
        if m.node.op_type == "LayerNormalization" and plan.removed[m.ids].any()
    }
    if normed:
        plan.warnings.append(
            f"{len(normed)} LayerNormalization nodes lose channels: their mean and variance then "
            "cover the channels left, an approximation (even an all-zero channel counted)"
        )
    return plan


def plan_channels_in_steps(
    model: ir.Model,
    graph: ChannelGraph,
    sparsity: float,
    scores: np.ndarray,
    rescore: Callable[[np.ndarray], np.ndarray],
    steps: int,
    **settings: object,
) -> ChannelPlan:
    """The channel plan reached in `steps` equal parts of the target: after each, the classes
    chosen so far rank first and `rescore(removed)` scores the rest again without them (what
    removing one more class costs once those are gone: conditional OBS). Scores are per unit of
    what each class saves (plan_channels's per_cost)."""
    removed = None
    plan = None
    for number in range(1, steps + 1):
        ranked = scores.copy()
        if removed is not None:
            ranked[removed] = -np.inf
        plan = plan_channels(
            model, graph, sparsity * number / steps, scores=ranked, per_cost=True, **settings
        )
        removed = plan.removed
        if number < steps:
            scores = rescore(removed)
    assert plan is not None
    return plan


def _accept(
    graph: ChannelGraph,
    units: Sequence[np.ndarray],
    min_keep: MinKeep | None,
    round_to: int | None,
) -> list[np.ndarray]:
    """Units in ranking order that every layer's minimum retention allows, and that leave every
    channel space (a Split or Slice part, a head's share of a packed projection) non-empty."""
    distinct = [np.unique(layer.classes) for layer in graph.layers]
    keep = []
    for layer, classes in zip(graph.layers, distinct, strict=True):
        n = len(classes)
        k = max(1, min_keep.for_layer(n) if min_keep else 0)
        step = _class_step([layer.classes], round_to) if round_to and round_to > 1 else 1
        if step > 1 and n >= step:
            k = min(n, -(-k // step) * step)
        keep.append(k)
    seen = {c.tobytes() for c in distinct}
    prunable = graph.prunable
    for spaces in graph.spaces.values():
        for ids in spaces.values():
            classes = np.unique(ids)
            key = classes.tobytes()
            if key not in seen and prunable[classes].any():
                seen.add(key)
                distinct.append(classes)
                keep.append(1)
    left = np.array([len(c) for c in distinct], dtype=np.int64)
    floor = np.array(keep, dtype=np.int64)
    # class -> layers that hold it, as a sparse incidence list
    layer_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(distinct)] or [[]])
    classes = np.concatenate(distinct or [np.zeros(0, np.int64)]).astype(np.int64)
    order = np.argsort(classes, kind="stable")
    classes, layer_of = classes[order], layer_of[order].astype(np.int64)
    accepted = []
    for unit in units:
        lo = np.searchsorted(classes, unit, side="left")
        hi = np.searchsorted(classes, unit, side="right")
        hit = np.concatenate([layer_of[a:b] for a, b in zip(lo, hi, strict=True)])
        layers, counts = np.unique(hit, return_counts=True)
        if np.all(left[layers] - counts >= floor[layers]):
            left[layers] -= counts
            accepted.append(unit)
    return accepted
