"""The weights that read channel classes, seen in their calibration design: which class each
design column (and each output row) stands for. Scoring, repair and constant compensation all
start from this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxprune.channels import ChannelGraph, Member
from onnxprune.ops import Design, design_of
from onnxprune.weights import Weight


@dataclass(eq=False)
class Consumer:
    """A weight whose input columns carry channel classes (groups of 1), seen in its design."""

    weight: Weight
    design: Design
    columns: np.ndarray  # class of each design column
    rows: np.ndarray | None  # class of each output feature, where its outputs are channels

    @property
    def name(self) -> str:
        return self.weight.name


def _along(ids: np.ndarray, axis: int, shape: Sequence[int]) -> np.ndarray:
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(ids.reshape(view), tuple(shape))


def _stored_key(member: Member) -> int:
    producer = member.value.producer()
    return (
        id(producer)
        if producer is not None and producer.op_type == "Constant"
        else id(member.value)
    )


def _weight_key(weight: Weight) -> int:
    return id(weight.constant) if weight.constant is not None else id(weight.value)


def consumers(
    graph: ChannelGraph, weights: Sequence[Weight]
) -> tuple[list[Consumer], list[tuple[Weight, np.ndarray, str]]]:
    """The weights that read channel classes, with the class of every design column and row;
    and those that read some but cannot be re-solved: (weight, the classes, why)."""
    by_key = {_weight_key(w): w for w in weights}
    roles: dict[int, dict[str, Member]] = {}
    for member in graph.members:
        if member.role in ("in", "out"):
            roles.setdefault(_stored_key(member), {}).setdefault(member.role, member)
    found = []
    unsolved = []
    for key, members in roles.items():
        weight = by_key.get(key)
        if weight is None or "in" not in members:
            continue
        member = members["in"]
        designs, why = design_of(weight)
        if why is not None:
            unsolved.append((weight, member.ids, why))
            continue
        if designs[0].groups != 1:
            continue  # grouped layers lose whole groups: nothing is left to re-solve
        design = designs[0]
        columns = design.to_matrix(_along(member.ids, member.axis, weight.shape))[0, 0]
        rows = None
        if "out" in members:
            out = members["out"]
            rows = design.to_matrix(_along(out.ids, out.axis, weight.shape))[0, :, 0]
        found.append(Consumer(weight, design, np.ascontiguousarray(columns), rows))
    return found, unsolved


def design_matrix(consumer: Consumer, tensor: ir.TensorProtocol | None = None) -> np.ndarray:
    """The consumer's weights [O, K] in its design, in float64: as stored now, or `tensor`'s."""
    source = consumer.weight.tensor() if tensor is None else tensor
    return consumer.design.to_matrix(np.asarray(source.numpy(), dtype=np.float64))[0]
