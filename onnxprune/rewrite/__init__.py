"""Carry out a plan on the graph: zero weights (unstructured) or remove channels (structured)."""

from onnxprune.rewrite.unstructured import apply_plan

__all__ = ["apply_plan"]
