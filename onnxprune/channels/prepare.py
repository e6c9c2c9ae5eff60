"""Preparing a model for the channel walk, as onnx-ir passes: shapes inferred, and the shape
arithmetic exporters write folded so that channels reshaped, split or sliced that way stay
prunable.

`PrepareChannelsPass` infers shapes, then repeats one round of five passes until a round changes
nothing (each can make a later shape known to another): `FoldConstantsPass` (what chains fed by
stored constants only compute, evaluated), `FoldShapeArithmeticPass` (computed
Reshape targets, integer inputs the walk needs constant, scalars read as data),
`SkipShapeGuardsPass` (a computed target read past the guards TorchScript writes around it),
`StoreWeightViewsPass` (stored tensors reshaped are stored reshaped), `RegroupReshapesPass`
(Reshape -> Transpose -> Reshape that merges axes only to split them again) and
`SetStaticDimsPass` (dims inference leaves open that the propagated dims tell). A round that
changed something removes what it left unused and infers shapes again (`RefreshShapesPass`).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from onnxprune import ops
from onnxprune.channels import shapemath
from onnxprune.channels.walk import CONST_VIEWS, Walk
from onnxprune.core.folding import fold_constants
from onnxprune.core.tensors import const_tensor
from onnxprune.ops.base import same_dims
from onnxprune.ops.normalization import SAME_SHAPE_OUTPUTS
from onnxprune.ops.shape import resolve_target


class FoldConstantsPass(ir.passes.InPlacePass):
    """Evaluate the main graph's nodes fed by stored constants only, and store each small
    integer value such a chain hands to a node that reads data (torch's Pad lowering computes
    the amounts from constants: Shape of a constant -> Gather -> Sub -> ConstantOfShape ->
    Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast -> Pad; the Pad's output then
    has no static size and the walk would freeze every channel behind it). Evaluated with
    onnx's reference implementation at the model's opset; a node it cannot evaluate stays."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, fold_constants(model) > 0)


class FoldShapeArithmeticPass(ir.passes.InPlacePass):
    """Fold shape arithmetic into stored constants where it does not depend on the model's
    symbolic dims: a Reshape's computed target (entries that copy the batch or sequence become
    0, one other entry -1), a computed input the walk needs constant (`ops.folded_inputs`), a
    static piece of a target that stays computed (its channel count then is a constant the
    rewrite can change), and a scalar read as data (attention's 1 / sqrt(head_dim) computed from
    the hidden width, whose Shape would otherwise freeze the width)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        walk = Walk(model)
        memos = walk.memos
        folded = 0
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            for index, value in enumerate(node.inputs):
                if value is None or const_tensor(value) is not None:
                    continue
                if node.op_type == "Reshape" and index == 1:
                    found = shapemath.static_target(walk, node, memos)
                    if found is None:
                        continue
                    target, copies = found
                    array = np.array(target, dtype=np.int64)
                    if copies:
                        # 0 copies the input's dim: allowzero's default, and the only meaning
                        # below opset 14, where the attribute does not exist
                        node.attributes.pop("allowzero", None)
                else:
                    producer = value.producer()
                    if producer is None or producer.op_type not in (*shapemath.SHAPE_MATH, "Shape"):
                        continue
                    # a computed input the walk needs constant, a static piece of a target that
                    # stays computed (its channel count then is a constant the rewrite can change),
                    # or a scalar read as data
                    slot = index in ops.folded_inputs(node) or (
                        node.op_type == "Concat"
                        and shapemath.static_value(walk, node.outputs[0], memos) is None
                    )
                    if not slot and not _reads_data(walk, node, memos):
                        continue
                    array = shapemath.static_value(walk, value, memos)
                    if array is None:
                        continue
                    if array.size > 1 and not slot:
                        continue  # data made from a shape (ConstantOfShape) keeps reading it
                    if value.dtype is not None:
                        array = array.astype(value.dtype.numpy())
                name = f"{node.name or node.op_type}_input{index}"
                while name in model.graph.initializers:
                    name += "_"
                tensor = ir.Tensor(np.array(array, order="C"), name=name)  # keeps 0-d as 0-d
                const = ir.Value(
                    name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype)
                )
                const.const_value = tensor
                model.graph.register_initializer(const)
                node.replace_input_with(index, const)
                folded += 1
        return ir.passes.PassResult(model, folded > 0)


# Ops that only rearrange a tensor; prepare stores their result when their input is stored.
_REARRANGE = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
_STORED_VIEW_LIMIT = 1 << 20  # elements; larger rearranged weights are left as they are


class StoreWeightViewsPass(ir.passes.InPlacePass):
    """Store what a Reshape, Unsqueeze, Squeeze or Flatten makes of a stored float tensor (read
    through Transpose, Cast or Identity): the walk slices stored tensors, not their views (Swin's
    relative position bias, [49*49, H] -> [1, H, 49, 49], is then sliced with the heads it is
    added to). A vector that Identity nodes hand to several readers is stored once per Identity:
    exporters share one zero bias between unrelated layers (the TorchScript exporter gives every
    bias of a fresh BERT the embedding LayerNorm's), which would tie their channels together."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        done = 0
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type not in _REARRANGE and not _shared_vector(node):
                continue
            out = node.outputs[0]
            if out.is_graph_output() or not out.uses():
                continue
            array = _stored_array(node.inputs[0])
            if array is None or array.dtype.kind != "f" or array.size > _STORED_VIEW_LIMIT:
                continue
            extra = [const_tensor(v) for v in node.inputs[1:] if v is not None]
            if any(t is None for t in extra):
                continue
            args = [t.numpy() for t in extra]  # type: ignore[union-attr]
            array = _rearranged(node, array, args)
            name = f"{out.name}_stored"
            while name in model.graph.initializers:
                name += "_"
            const = ir.Value(name=name, shape=ir.Shape(array.shape), type=out.type)
            const.const_value = ir.Tensor(np.array(array, order="C"), name=name)
            model.graph.register_initializer(const)
            out.replace_all_uses_with(const)
            done += 1
        return ir.passes.PassResult(model, done > 0)


def _shared_vector(node: ir.Node) -> bool:
    """An Identity of a stored vector that other nodes read too."""
    if node.op_type != "Identity" or not node.inputs or node.inputs[0] is None:
        return False
    tensor = const_tensor(node.inputs[0])
    return tensor is not None and len(tensor.shape) <= 1 and len(node.inputs[0].uses()) > 1


def _stored_array(value: ir.Value | None) -> np.ndarray | None:
    """A stored tensor's values as `value` holds them, through Transpose, Cast and Identity."""
    chain = []
    while value is not None and const_tensor(value) is None and len(chain) < 16:
        node = value.producer()
        if node is None or node.op_type not in CONST_VIEWS or node.domain not in ("", "ai.onnx"):
            return None
        chain.append(node)
        value = node.inputs[0]
    tensor = const_tensor(value)
    if tensor is None or int(np.prod(tensor.shape)) > _STORED_VIEW_LIMIT:
        return None
    array = tensor.numpy()
    for node in reversed(chain):
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            array = np.transpose(array, None if perm is None else list(perm.value))
        elif node.op_type == "Cast":
            array = array.astype(ir.DataType(node.attributes["to"].value).numpy())
    return array


def _rearranged(node: ir.Node, array: np.ndarray, args: list[np.ndarray]) -> np.ndarray:
    attr = node.attributes
    if node.op_type == "Identity":
        return array
    if node.op_type == "Reshape":
        zero = attr.get("allowzero")
        target = [int(t) for t in args[0].reshape(-1)]
        dims = resolve_target(list(array.shape), target, bool(zero and zero.value))
        return array.reshape(dims)
    if node.op_type == "Flatten":
        axis = int(attr["axis"].value) if "axis" in attr else 1
        axis = axis % array.ndim if array.ndim else 0
        return array.reshape(int(np.prod(array.shape[:axis])), -1)
    axes = args[0] if args else np.array(attr["axes"].value if "axes" in attr else [], np.int64)
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if node.op_type == "Squeeze":
        return np.squeeze(array, tuple(axes)) if axes else np.squeeze(array)
    rank = array.ndim + len(axes)
    return np.expand_dims(array, tuple(a % rank for a in axes))


def _reads_data(walk: Walk, node: ir.Node, memos: list[dict]) -> bool:
    """Whether some input of `node` is data rather than shape arithmetic: its other inputs that
    are scalars computed from shapes are then folded (a Div of attention scores by
    sqrt(head_dim), head_dim computed from the hidden width)."""
    return any(v is not None and not shapemath.evaluable(walk, v, memos) for v in node.inputs)


class SetStaticDimsPass(ir.passes.InPlacePass):
    """Dims that shape inference leaves unknown and the propagated dims tell: static ones, equal
    in every run of the stand-ins (an attention mask expanded by a computed target to
    [B, 1, S, S] broadcasts over the heads), and a model input's named dim where inference
    named it afresh (the batch and sequence of GQA's key/value heads expanded by a computed
    target), so that reshapes line the axes up by name."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        walk = Walk(model)
        changed = 0
        names: dict[tuple[int, ...], str] | None = None
        for node in model.graph:
            changed += _same_shape(node)
            for out in node.outputs:
                if out is None or out.shape is None or all(isinstance(d, int) for d in out.shape):
                    continue
                found = [shapemath.dims(walk, out, r) for r in range(shapemath.RUNS)]
                if any(f is None or len(f) != len(out.shape) for f in found):
                    continue
                if names is None:
                    names = _named_dims(walk, model)
                new = []
                for old, column in zip(out.shape, zip(*found, strict=True), strict=True):
                    if isinstance(old, int):
                        new.append(old)
                    elif len(set(column)) == 1:
                        new.append(column[0])
                    elif column in names and getattr(old, "value", None) != names[column]:
                        new.append(ir.SymbolicDim(names[column]))
                    else:
                        new.append(old)
                if new != list(out.shape):
                    out.shape = ir.Shape(new)
                    changed += 1
        return ir.passes.PassResult(model, changed > 0)


def _named_dims(walk: Walk, model: ir.Model) -> dict[tuple[int, ...], str]:
    """The stand-ins of each named symbolic dim of the model's inputs, over the runs."""
    found = {}
    for value in model.graph.inputs:
        for dim in value.shape or ():
            name = getattr(dim, "value", None)
            if isinstance(name, str) and name:
                runs = tuple(shapemath.stand_in(walk, name, r) for r in range(shapemath.RUNS))
                found.setdefault(runs, name)
    return found


def _same_shape(node: ir.Node) -> int:
    """An op that ONNX's shape inference does not know (ONNX Runtime's normalisations) but the
    registry says keeps its input's shape: its output (a skip norm's sum too) gets the input's
    shape and type where it has none. Returns how many it set."""
    info = ops.op_info(node)
    x = node.inputs[0] if node.inputs else None
    if info is None or info.output_dims is not same_dims or x is None or x.shape is None:
        return 0
    done = 0
    for index in SAME_SHAPE_OUTPUTS.get(node.op_type, (0,)):
        out = node.outputs[index] if index < len(node.outputs) else None
        if out is not None and out.shape is None:
            out.shape = ir.Shape(list(x.shape))
            out.type = out.type or x.type
            done += 1
    return done


class SkipShapeGuardsPass(ir.passes.InPlacePass):
    """A computed shape vector that equals one of its producer's computed inputs in every run of
    the stand-ins is that input: the TorchScript exporter guards an expand's target against -1
    entries with Where(Equal(t, -1), 1, t) and reshapes a vector to [-1]. Read past them, a
    target's channel counts are stored pieces of the Concat that makes it (GQA's key/value
    heads repeated by Expand), which the rewrite can change."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        walk = Walk(model)
        done = 0
        for node in list(model.graph):
            if node.op_type not in _GUARDS or node.domain not in ("", "ai.onnx"):
                continue
            out = node.outputs[0]
            if out is None or out.is_graph_output() or not out.uses():
                continue
            made = _vector_runs(walk, out)
            if made is None:
                continue
            for value in node.inputs:
                if value is None or const_tensor(value) is not None or value.dtype != out.dtype:
                    continue
                runs = _vector_runs(walk, value)
                if runs is not None and all(
                    a.shape == b.shape and (a == b).all() for a, b in zip(runs, made, strict=True)
                ):
                    out.replace_all_uses_with(value)
                    done += 1
                    break
        return ir.passes.PassResult(model, done > 0)


# Ops that may hand a shape vector on unchanged.
_GUARDS = ("Where", "Reshape", "Identity", "Cast")


def _vector_runs(walk: Walk, value: ir.Value) -> list[np.ndarray] | None:
    """A computed 1-D integer vector in every run of the stand-ins, where shape math tells."""
    runs = []
    for run in range(shapemath.RUNS):
        found = shapemath.shape_value(walk, value, run, walk.memos[run])
        if found is None or np.asarray(found).ndim != 1 or np.asarray(found).dtype.kind != "i":
            return None
        runs.append(np.asarray(found))
    return runs


class RegroupReshapesPass(ir.passes.InPlacePass):
    """Rewrite each Reshape -> Transpose -> Reshape whose first Reshape merges axes that the
    last splits apart again as a Reshape that only splits, the Transpose, and a Reshape that
    only merges (each left out where it would do nothing). nn.MultiheadAttention folds the heads
    into the batch, [S, B, E] -> [S, B*H, D] -> [B*H, S, D] -> [B, H, S, D], and the dynamo
    exporter's scaled_dot_product_attention transposes k through [B*H, S, D]: a channel axis
    merged with a symbolic one has no per-index classes, and rewritten it is never merged."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        walk = Walk(model)
        done = 0
        for first in list(model.graph):
            chain = _chain(first)
            if chain is None:
                continue
            swap, last = chain
            found = _regroup(walk, first, swap, last)
            if found is None:
                continue
            split, perm, merge = found
            x, out = first.inputs[0], last.outputs[0]
            name = last.name or "Reshape"
            value = x
            steps = [("Reshape", split), ("Transpose", perm), ("Reshape", merge)]
            for k, (op, data) in enumerate(steps):
                if data is None:
                    continue
                if op == "Transpose":
                    node = ir.Node(
                        "", op, [value], [ir.AttrInt64s("perm", data)], name=f"{name}_{k}"
                    )
                else:
                    target = f"{name}_regrouped_{k}"
                    while target in model.graph.initializers:
                        target += "_"
                    tensor = ir.Tensor(np.array(data, dtype=np.int64), name=target)
                    shape = ir.Value(name=target, const_value=tensor)
                    model.graph.register_initializer(shape)
                    node = ir.Node("", op, [value, shape], name=f"{name}_{k}")
                node.outputs[0].name = f"{out.name}_regrouped_{k}"
                node.outputs[0].type = out.type
                model.graph.insert_before(last, node)
                value = node.outputs[0]
            value.shape = out.shape
            out.replace_all_uses_with(value)
            done += 1
        return ir.passes.PassResult(model, done > 0)


def _chain(first: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(Transpose, Reshape) after a Reshape, each the only reader of what comes before."""
    if first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
        return None
    nodes = []
    value = first.outputs[0]
    for op in ("Transpose", "Reshape"):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != op:
            return None
        nodes.append(uses[0].node)
        value = uses[0].node.outputs[0]
    if value.is_graph_output():
        return None
    return nodes[0], nodes[1]


def _regroup(
    walk: Walk, first: ir.Node, swap: ir.Node, last: ir.Node
) -> tuple[list[int] | None, list[int], list[int] | None] | None:
    """(split target, perm, merge target) that first -> swap -> last is, where the first
    Reshape merges axes (else None: there is nothing to gain). Worked out in every run of the
    stand-ins: the finest dims both x's and the merged shape are made of, permuted, and merged
    into the output's; the targets as constants (0 for a symbolic dim kept in place, one -1)."""
    attr = swap.attributes.get("perm")
    runs = []
    for run in range(shapemath.RUNS):
        xs = shapemath.dims(walk, first.inputs[0], run)
        mid = _resolved(walk, first, xs, run)
        if xs is None or mid is None:
            return None
        perm = [int(p) for p in attr.value] if attr is not None else list(range(len(mid)))[::-1]
        out = _resolved(walk, last, [mid[p] for p in perm], run)
        refined = _refine(xs, mid)
        if out is None or refined is None or len(perm) != len(mid):
            return None
        fine, _, runs_mid = refined
        order = [i for p in perm for i in runs_mid[p]]
        permuted = [fine[i] for i in order]
        merged = _refine(permuted, out)
        if merged is None or len(merged[0]) != len(permuted):
            return None  # the last Reshape splits further: not handled
        runs.append((xs, mid, fine, order, permuted, out))
    if len({(len(r[2]), tuple(r[3])) for r in runs}) != 1:
        return None
    if all([d for d in r[1] if d != 1] == r[2] for r in runs):
        return None  # the first Reshape merges nothing
    split = _as_target([r[0] for r in runs], [r[2] for r in runs])
    merge = _as_target([r[4] for r in runs], [r[5] for r in runs])
    if split is None or merge is None:
        return None
    return (
        None if all(r[0] == r[2] for r in runs) else split,
        runs[0][3],
        None if all(r[4] == r[5] for r in runs) else merge,
    )


def _refine(
    a: list[int], b: list[int]
) -> tuple[list[int], list[list[int]], list[list[int]]] | None:
    """The common refinement of two shapes of one tensor (dims of 1 dropped), and the axes of
    it each axis of a and of b is made of; None unless their running products nest."""
    ends_a = [int(np.prod(a[: k + 1], dtype=object)) for k in range(len(a))]
    ends_b = [int(np.prod(b[: k + 1], dtype=object)) for k in range(len(b))]
    if (ends_a[-1] if ends_a else 1) != (ends_b[-1] if ends_b else 1):
        return None
    bounds = sorted({1, *ends_a, *ends_b})
    if any(hi % lo for lo, hi in itertools.pairwise(bounds)):
        return None
    fine = [hi // lo for lo, hi in itertools.pairwise(bounds)]

    def runs(ends: list[int]) -> list[list[int]]:
        starts = [1, *ends[:-1]]
        return [
            list(range(bounds.index(lo), bounds.index(hi)))
            for lo, hi in zip(starts, ends, strict=True)
        ]

    return fine, runs(ends_a), runs(ends_b)


def _resolved(walk: Walk, node: ir.Node, xs: list[int] | None, run: int) -> list[int] | None:
    """A Reshape's output dims in one run of the stand-ins, given its input dims."""
    target = shapemath.shape_value(walk, node.inputs[1], run, walk.memos[run])
    if target is None or xs is None or np.asarray(target).ndim != 1:
        return None
    allowzero = node.attributes.get("allowzero")
    entries = [int(t) for t in np.asarray(target)]
    return resolve_target(xs, entries, bool(allowzero is not None and allowzero.value))


def _as_target(ins: list[list[int]], outs: list[list[int]]) -> list[int] | None:
    """A Reshape target from input to output dims over the runs: static entries as they are, a
    symbolic dim kept at its position 0, at most one other -1."""
    target = []
    for i, column in enumerate(zip(*outs, strict=True)):
        if len(set(column)) == 1:
            target.append(column[0])
        elif all(i < len(x) and x[i] == c for x, c in zip(ins, column, strict=True)):
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1 or (0 in target and any(c == 0 for c in outs[0])):
        return None
    return target


class RefreshShapesPass(ir.passes.InPlacePass):
    """Run `inner`; where it changed the model, remove the nodes and constants it left unused and
    infer shapes again, for the next round to read. Its result is `inner`'s: tidying up after a
    change is no change of its own (a round that finds nothing ends the repetition)."""

    def __init__(self, inner: ir.passes.PassBase) -> None:
        super().__init__()
        self.inner = inner

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner(model)
        if result.modified:
            RemoveUnusedNodesPass()(model)
            ShapeInferencePass()(model)
        return ir.passes.PassResult(model, result.modified)


class PrepareChannelsPass(ir.passes.PassManager):
    """Shapes for the walk: infer them, then fold, store, regroup and set static dims, round
    after round (at most `rounds`) until a round changes nothing."""

    def __init__(self, rounds: int = 64) -> None:
        one_round = ir.passes.Sequential(
            FoldConstantsPass(),
            FoldShapeArithmeticPass(),
            SkipShapeGuardsPass(),
            StoreWeightViewsPass(),
            RegroupReshapesPass(),
            SetStaticDimsPass(),
        )
        repeat = ir.passes.PassManager([RefreshShapesPass(one_round)], steps=rounds)
        super().__init__([ShapeInferencePass(), repeat])


def prepare(model: ir.Model, rounds: int = 64) -> ir.Model:
    """Shapes for the walk (in place): `PrepareChannelsPass`. Folding one node can make a later
    shape known, so it repeats until nothing more folds. Returns `model`.

    An error inside a pass is raised as itself, not wrapped in the pass manager's PassError."""
    try:
        PrepareChannelsPass(rounds)(model)
    except ir.passes.PassError as exc:
        cause: BaseException = exc
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is exc:
            raise
        raise cause from None
    return model
