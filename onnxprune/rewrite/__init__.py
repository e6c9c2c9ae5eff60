"""Rewrite: carry out a plan on the graph, as onnx-ir passes.

    ZeroWeightsPass(plan)      unstructured and N:M: the selected weights become zero
    RemoveChannelsPass(plan)   structured: the selected channels are sliced out everywhere

Rewritten tensors are computed from the originals when read (`before_rewrite` finds those), so
no pruned copy of the model is held; repair then updates what is kept.
"""

from onnxprune.rewrite.structured import RemoveChannelsPass, apply_channel_plan
from onnxprune.rewrite.unstructured import ZeroWeightsPass, apply_plan, before_rewrite

__all__ = [
    "RemoveChannelsPass",
    "ZeroWeightsPass",
    "apply_channel_plan",
    "apply_plan",
    "before_rewrite",
]
