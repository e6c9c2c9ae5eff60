"""Score: how much each weight (or channel class) matters, for selection to rank.

magnitude.py   |w| as exact integer keys, streamed; channel norms; magnitude's hazards
importance.py  the criteria (magnitude, wanda, sparsegpt), one class each, and their registry
weights.py     calibrated weight scores from a layer's statistics
channels.py    calibrated channel scores: the output error of removing each class
"""

from __future__ import annotations

from onnxprune.scoring.importance import Importance, get, names, register

__all__ = ["Importance", "get", "names", "register"]
