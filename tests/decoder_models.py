"""Decoder blocks as LLM exporters write them, small: grouped-query attention (4 query heads
sharing 2 key/value heads), the key/value heads repeated for the query heads by Expand (a target
computed from Shape, as TorchScript writes it) or by Tile, rotary position embeddings (positions
from Range, or from a position_ids input; cos and sin of positions x inv_freq; rotate-half by
Slice, Neg, Concat), RMSNorm spelt out, a SwiGLU MLP, and optionally a KV cache in the layout of
Optimum and onnxruntime-genai (past_key_values.i.key/value inputs joined to the new keys and
values, present.i.key/value outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from onnxprune import channels
from tests.builders import GraphBuilder

D, QH, KVH, HD, FF = 16, 4, 2, 4, 24  # width, query heads, kv heads, head dim, MLP width
VOCAB = 11  # of the tied-embedding variant
REP = QH // KVH
_INT64 = TensorProto.INT64


def _ints(b: GraphBuilder, *values: int) -> str:
    return b.constant(np.array(values, np.int64))


def _scalar(b: GraphBuilder, value: float) -> str:
    return b.constant(np.array(value, np.float32))


def _rms(b: GraphBuilder, h: str) -> str:
    """RMSNorm as torch.export writes it: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul."""
    mean = b.node("ReduceMean", [b.node("Pow", [h, _scalar(b, 2.0)]), _ints(b, -1)], keepdims=1)
    inv = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [mean, _scalar(b, 1e-5)])])])
    gain = b.weight((D,), array=(1 + 0.1 * b.rng.standard_normal(D)).astype(np.float32))
    return b.node("Mul", [gain, b.node("Mul", [h, inv])])


def _proj(b: GraphBuilder, x: str, d_in: int, d_out: int) -> str:
    return b.node("MatMul", [x, b.weight((d_in, d_out), scale=1 / np.sqrt(d_in))])


def _heads(b: GraphBuilder, x: str, n: int) -> str:
    """[N, S, n * HD] -> [N, n, S, HD]."""
    split = b.node("Reshape", [x, _ints(b, 0, 0, n, HD)])
    return b.node("Transpose", [split], perm=[0, 2, 1, 3])


def _rotate(b: GraphBuilder, t: str, cos: str, sin: str) -> str:
    """t cos + rotate_half(t) sin, rotate_half by Slice, Neg, Concat on the last axis."""
    first = b.node("Slice", [t, _ints(b, 0), _ints(b, HD // 2), _ints(b, 3), _ints(b, 1)])
    second = b.node("Slice", [t, _ints(b, HD // 2), _ints(b, 2**62), _ints(b, 3), _ints(b, 1)])
    rotated = b.node("Concat", [b.node("Neg", [second]), first], axis=-1)
    return b.node("Add", [b.node("Mul", [t, cos]), b.node("Mul", [rotated, sin])])


_INV_FREQ = (1.0 / 10000 ** (np.arange(0, HD, 2) / HD)).astype(np.float32)


def _tables(b: GraphBuilder, positions: str) -> tuple[str, str]:
    """cos and sin of positions [..., S, 1] (float) x inv_freq [HD / 2], [..., 1, S, HD]."""
    freqs = b.node("Mul", [positions, b.constant(_INV_FREQ)])
    angles = b.node("Concat", [freqs, freqs], axis=-1)
    axis = _ints(b, -3)
    cos = b.node("Unsqueeze", [b.node("Cos", [angles]), axis])
    sin = b.node("Unsqueeze", [b.node("Sin", [angles]), axis])
    return cos, sin


def _cached_tables(b: GraphBuilder, positions: str) -> tuple[str, str]:
    """Older transformers: cos and sin cached as tables [positions, HD], gathered by the
    integer positions [..., S], [..., 1, S, HD]."""
    angles = np.arange(32, dtype=np.float32)[:, None] * np.concatenate([_INV_FREQ, _INV_FREQ])
    axis = _ints(b, -3)
    cos = b.node("Gather", [b.weight(angles.shape, array=np.cos(angles)), positions], axis=0)
    sin = b.node("Gather", [b.weight(angles.shape, array=np.sin(angles)), positions], axis=0)
    return b.node("Unsqueeze", [cos, axis]), b.node("Unsqueeze", [sin, axis])


def _repeat(b: GraphBuilder, t: str, how: str, kv: int) -> str:
    """[N, kv, S, HD] -> [N, QH, S, HD], each kv head repeated for its QH / kv query heads."""
    rep = QH // kv
    t = b.node("Unsqueeze", [t, _ints(b, 2)])
    if how == "tile":
        t = b.node("Tile", [t, _ints(b, 1, 1, rep, 1, 1)])
    else:  # Expand to a target computed from the Shape of the keys, as TorchScript writes it
        dims = b.node("Shape", [t])
        batch = b.node("Gather", [dims, _ints(b, 0)], axis=0)
        seq = b.node("Gather", [dims, _ints(b, 3)], axis=0)
        target = b.node("Concat", [batch, _ints(b, kv), _ints(b, rep), seq, _ints(b, HD)], axis=0)
        t = b.node("Expand", [t, target])
    return b.node("Reshape", [t, _ints(b, 0, QH, -1, HD)])


def decoder(
    how: str = "expand",
    cache: bool = False,
    seed: int = 0,
    tied: bool = False,
    kv: int = KVH,
    cached_tables: bool = False,
) -> onnx.ModelProto:
    """One pre-norm decoder layer and a head: x [N, S, 6] -> y [N, S, 5]; with `cache`, the
    position_ids input and past_key_values.0.key/value inputs, present.0.key/value outputs;
    `tied`: token ids x [N, S] embedded by a table [VOCAB, D] that the head reads transposed;
    `kv` key/value heads (1: multi-query attention); `cached_tables`: cos and sin gathered from
    stored tables by the positions."""
    b = GraphBuilder(400 + seed)
    if tied:
        x = b.input("x", ["N", "S"], _INT64)
        table = b.weight((VOCAB, D), scale=0.5)
        h = b.node("Gather", [table, x], axis=0)
    else:
        x = b.input("x", ["N", "S", 6])
        h = _proj(b, x, 6, D)
    if cache:
        steps = b.input("position_ids", ["N", "S"], _INT64)
    else:
        length = b.node("Gather", [b.node("Shape", [x]), b.constant(np.array(1))], axis=0)
        steps = b.node("Range", [b.constant(np.array(0)), length, b.constant(np.array(1))])
    if cached_tables:
        cos, sin = _cached_tables(b, steps)
    else:
        positions = b.node("Cast", [b.node("Unsqueeze", [steps, _ints(b, -1)])], to=1)
        cos, sin = _tables(b, positions)
    normed = _rms(b, h)
    q = _rotate(b, _heads(b, _proj(b, normed, D, QH * HD), QH), cos, sin)
    k = _rotate(b, _heads(b, _proj(b, normed, D, kv * HD), kv), cos, sin)
    v = _heads(b, _proj(b, normed, D, kv * HD), kv)
    if cache:
        pasts = [b.input(f"past_key_values.0.{n}", ["N", kv, "P", HD]) for n in ("key", "value")]
        k = b.node("Concat", [pasts[0], k], axis=2, out="present.0.key")
        v = b.node("Concat", [pasts[1], v], axis=2, out="present.0.value")
    kt = b.node("Transpose", [_repeat(b, k, how, kv)], perm=[0, 1, 3, 2])
    scores = b.node("Mul", [b.node("MatMul", [q, kt]), _scalar(b, HD**-0.5)])
    mixed = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), _repeat(b, v, how, kv)])
    mixed = b.node("Reshape", [b.node("Transpose", [mixed], perm=[0, 2, 1, 3]), _ints(b, 0, 0, -1)])
    h = b.node("Add", [h, _proj(b, mixed, QH * HD, D)])
    normed = _rms(b, h)
    gate = _proj(b, normed, D, FF)
    act = b.node("Mul", [b.node("Mul", [gate, b.node("Sigmoid", [gate])]), _proj(b, normed, D, FF)])
    h = b.node("Add", [h, _proj(b, act, FF, D)])
    head = b.node("Transpose", [table], perm=[1, 0]) if tied else b.weight((D, 5))
    b.node("MatMul", [_rms(b, h), head], out="y")
    b.output("y", shape=["N", "S", VOCAB if tied else 5])
    if cache:
        for n in ("key", "value"):
            b.output(f"present.0.{n}", shape=["N", kv, "T", HD])
    return b.model(opset=18)


def gqa_expand() -> onnx.ModelProto:
    return decoder("expand")


def gqa_tile() -> onnx.ModelProto:
    return decoder("tile")


def gqa_cache() -> onnx.ModelProto:
    return decoder("expand", cache=True)


def gqa_tied() -> onnx.ModelProto:
    return decoder("tile", tied=True)


def mqa_cached_tables() -> onnx.ModelProto:
    """Multi-query attention (one key/value head) with cos and sin gathered from tables."""
    return decoder("expand", cache=True, kv=1, cached_tables=True)


DECODERS = {
    "gqa_expand": gqa_expand,
    "gqa_tile": gqa_tile,
    "gqa_cache": gqa_cache,
    "gqa_tied": gqa_tied,
    "mqa_cached_tables": mqa_cached_tables,
}


def kill_read(graph: channels.ChannelGraph, removed: np.ndarray) -> None:
    """Zero what reads the query heads removed inside a group: such a head, its query weights
    zero, still averages the values its key/value head (kept) gives, so it is dead only where
    its output projection's columns are zero too (what `kill` leaves to the producers)."""
    settled = graph.settle(removed)
    alone = np.zeros(graph.n_classes, dtype=bool)
    for parents, children in graph.depends:
        alone[children[settled[children] & ~settled[parents]]] = True
    for m in graph.members:
        if m.role == "in" and alone[m.ids].any():
            array = channels.zeroed(m.value, m.axis, alone[m.ids])
            m.value.const_value = ir.Tensor(array, name=m.value.name)
