"""Recurrent layers: LSTM, GRU and RNN.

What the family shares: the input weights W (input 1) and recurrence weights R (input 2) are
[directions, gates x hidden, inputs]. Axis 1 stacks every gate's rows (LSTM i, o, f, c; GRU z, r,
h; RNN one), a row per hidden unit and gate, so it is the output axis; axis 2 holds the inputs
(x's features in W, the hidden state's in R), the input axis (N:M runs along it). A zero there
contributes nothing to its gate, so zeroing is as sound as in a MatMul; the biases (B) and initial
states are never pruned.

They declare weight slots only. Channel removal leaves them whole (no channel rule): the hidden
size couples W, R, B and the initial states. Calibration gives them no design: a recurrent layer
reads its own state step by step, so no rows X make X @ W its output.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxprune.ops.base import OpInfo

RECURRENT_OPS = ("LSTM", "GRU", "RNN")

# Why channel removal leaves a recurrent layer's weights whole (the report's unreached list).
RECURRENT_REASON = (
    "a recurrent hidden size couples W, R, B and the initial states: channel removal leaves "
    "{op} weights whole (unstructured pruning zeroes them)"
)


def recurrent_axes(node: ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """W and R, [directions, gates x hidden, inputs]: output axis 1, input axis 2."""
    return (1, 2) if index in (1, 2) and rank == 3 else None


OPS = tuple(
    OpInfo(
        op,
        weight_inputs=(1, 2),
        weight_axes=recurrent_axes,
        no_design=(
            f"{op} weights are not calibrated (a recurrent layer reads its own state "
            "step by step: no design X with X @ W its output)"
        ),
    )
    for op in RECURRENT_OPS
)
