"""The inputs a decoder export needs besides its tokens, made consistent with them.

LLM exports (transformers through torch.onnx, Optimum, onnxruntime-genai) take `input_ids` and,
depending on the exporter, `attention_mask` [batch, past + sequence], `position_ids`
[batch, sequence] and a KV cache of `past_key_values.*` (or `past.*`) tensors [batch, heads,
past, head_dim]. Calibration and validation run the prompt step: no past (length 0), every
token attended, positions counted from 0 along the mask, as transformers computes them
(cumsum(mask) - 1, and 1 where the mask is 0). A file that holds only the token ids (and maybe
the mask) gets the rest made that way; generated inputs follow the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxprune.inputs.spec import InputSpec


@dataclass(frozen=True)
class DecoderInputs:
    """Which model inputs play which part, by the names exporters give them."""

    tokens: InputSpec
    mask: InputSpec | None
    positions: InputSpec | None
    pasts: tuple[tuple[InputSpec, int], ...]  # each past, and its past-length axis


def decoder_inputs(specs: Sequence[InputSpec]) -> DecoderInputs | None:
    """The parts of a decoder's inputs: `input_ids` (integer, [batch, sequence]), an
    `attention_mask`, `position_ids`, and float `past*` inputs with one symbolic axis besides
    the batch (the past length). None where the model has no `input_ids` of that shape."""
    by_name = {s.name: s for s in specs}
    tokens = by_name.get("input_ids")
    if tokens is None or tokens.dtype.kind not in "iu" or len(tokens.shape) != 2:
        return None
    mask = next((s for s in specs if "attention_mask" in s.name and len(s.shape) == 2), None)
    positions = next((s for s in specs if "position_ids" in s.name and s.dtype.kind in "iu"), None)
    pasts = []
    for spec in specs:
        if not spec.name.startswith("past") or spec.dtype.kind != "f":
            continue
        open_axes = [a for a, d in enumerate(spec.shape) if a > 0 and not isinstance(d, int)]
        if len(open_axes) == 1:
            pasts.append((spec, open_axes[0]))
    return DecoderInputs(tokens, mask, positions, tuple(pasts))


def settle_shapes(
    specs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the prompt step: every past of length 0, the mask as long as the
    tokens, the positions too."""
    parts = decoder_inputs(specs)
    if parts is None or parts.tokens.name not in shapes:
        return shapes
    batch, length = shapes[parts.tokens.name]
    out = dict(shapes)
    for spec in (parts.mask, parts.positions):
        if spec is not None:
            out[spec.name] = (batch, length)
    for spec, axis in parts.pasts:
        dims = [d if isinstance(d, int) else 0 for d in spec.shape]
        dims[0] = batch
        dims[axis] = 0
        out[spec.name] = tuple(dims)
    return out


def settle_values(specs: Sequence[InputSpec], batch: dict[str, np.ndarray]) -> None:
    """A generated batch made a prompt step (in place): the mask all ones, the positions
    0, 1, ... along it, every past empty."""
    parts = decoder_inputs(specs)
    if parts is None or parts.tokens.name not in batch or not settled(specs):
        return
    rows, length = batch[parts.tokens.name].shape
    if parts.mask is not None:
        batch[parts.mask.name] = np.ones((rows, length), dtype=parts.mask.dtype)
    if parts.positions is not None:
        batch[parts.positions.name] = positions_of(
            np.ones((rows, length), dtype=np.int64), parts.positions.dtype
        )
    for spec, axis in parts.pasts:
        shape = list(batch.get(spec.name, np.zeros(0)).shape) or [0] * len(spec.shape)
        shape[0], shape[axis] = rows, 0
        batch[spec.name] = np.zeros(shape, dtype=spec.dtype)


def settled(specs: Sequence[InputSpec]) -> list[str]:
    """The inputs `settle_values` sets: a decoder's mask, positions and pasts (none for a model
    that takes no positions and no past, an encoder: its mask is a mask like any other)."""
    parts = decoder_inputs(specs)
    if parts is None or (parts.positions is None and not parts.pasts):
        return []
    found = [s.name for s in (parts.mask, parts.positions) if s is not None]
    return found + [spec.name for spec, _ in parts.pasts]


def positions_of(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Positions as transformers computes them from a mask: cumsum - 1, and 1 where masked."""
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return positions.astype(dtype)


def fill_missing(
    arrays: Mapping[str, Any], specs: Sequence[InputSpec]
) -> tuple[dict[str, Any], list[str]]:
    """A decoder's data file that holds the token ids (and maybe the mask) but not the other
    inputs: the mask (ones), the positions (along the mask) and empty pasts made, with a notice.
    Arrays or their headers (shape and dtype) alike: the headers of a file being checked get
    the arrays that would be made."""
    out = dict(arrays)
    parts = decoder_inputs(specs)
    if parts is None or parts.tokens.name not in out:
        return out, []
    rows, length = (int(d) for d in out[parts.tokens.name].shape[:2])
    made = []
    if parts.mask is not None and parts.mask.name not in out:
        out[parts.mask.name] = np.ones((rows, length), dtype=parts.mask.dtype)
        made.append(f"{parts.mask.name} (all ones)")
    if parts.positions is not None and parts.positions.name not in out:
        mask = out.get(parts.mask.name) if parts.mask is not None else None
        mask = mask if isinstance(mask, np.ndarray) and mask.shape == (rows, length) else None
        ones = np.ones((rows, length), dtype=np.int64)
        out[parts.positions.name] = positions_of(
            ones if mask is None else mask, parts.positions.dtype
        )
        made.append(f"{parts.positions.name} (0, 1, ... along the mask)")
    empty = []
    for spec, axis in parts.pasts:
        if spec.name in out:
            continue
        dims = [d if isinstance(d, int) else 0 for d in spec.shape]
        dims[0], dims[axis] = rows, 0
        out[spec.name] = np.zeros(dims, dtype=spec.dtype)
        empty.append(spec.name)
    if empty:
        made.append(f"{len(empty)} empty past tensors ({empty[0]} ...; past length 0)")
    if not made:
        return out, []
    return out, [f"made {', '.join(made)}: the data holds {parts.tokens.name} without them"]
