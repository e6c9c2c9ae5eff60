"""Torch reference for pruning the LLaMA-style decoder: perplexity after magnitude, Wanda and
SparseGPT, each as published, so that onnxprune's figures on the ONNX exports have a yardstick.

Methods (all on the seven Linear layers of every decoder block; embeddings and LM head dense):

* ``magnitude-layer`` - smallest |W| removed within each layer (N:M: within each group of M).
* ``magnitude-global`` - one |W| threshold over all those layers (N:M: same as per layer).
* ``wanda`` - Sun et al. 2023: score |W_ij| * ||X_j||_2 over all calibration tokens, the lowest
  scores of each output row removed (N:M: within each group of M inputs of a row); no update.
* ``sparsegpt`` - Frantar & Alistarh 2023: Hessian H = 2 X^T X / n, dampened by 1% of its mean
  diagonal, OBS pruning column by column with the upper Cholesky factor of H^-1, mask chosen per
  block of 128 columns over all rows (N:M: per row within each group of M columns), lazy batch
  updates of the columns after each block.

Wanda and SparseGPT are sequential: the statistics of block b come from the calibration tokens
run through blocks 0..b-1 already pruned, with block b itself still dense (all seven layers of a
block use one pass). Perplexity is exp of the mean next-token NLL over every position of the
held-out rows (positions with attention_mask 0 skipped).

    python bench/torch_reference.py [--dir build/decoder]     # the table, reference.json
    python bench/torch_reference.py ppl MODEL.onnx TOKENS.npz  # ONNX perplexity (no torch)

Only the ONNX perplexity helper runs without torch; torch and transformers are imported by the
functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
SPARSITIES: tuple[float | str, ...] = (0.5, 0.7, "2:4")
METHODS = ("magnitude-layer", "magnitude-global", "wanda", "sparsegpt")
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
BLOCK_SIZE = 128
PERC_DAMP = 0.01


# --------------------------------------------------------------------------------------------
# Perplexity


def _nll_sum(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL (float64) over positions where both tokens are unmasked."""
    x = logits[:, :-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    target = np.take_along_axis(x, ids[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return float((logz - target)[valid].sum()), int(valid.sum())


def _load_tokens(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as data:
        return data["input_ids"], data.get("attention_mask")


def onnx_perplexity(
    model: str | Path,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    batch: int = 8,
) -> tuple[float, int]:
    """Perplexity of an ONNX decoder with ONNX Runtime (CPU): exp(mean NLL of the next token).

    Feeds whatever the model asks for: ``input_ids``, ``attention_mask``, ``position_ids``
    (cumulative mask - 1, as Hugging Face does) and empty ``past_key_values.*`` (past 0, the
    head counts read from the input's fixed dims). Uses the output named ``logits`` (else the
    first). Returns the perplexity and the number of predicted tokens.
    """
    import onnxruntime as ort

    mask_all = np.ones_like(input_ids) if attention_mask is None else attention_mask
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    outputs = [o.name for o in sess.get_outputs()]
    out = "logits" if "logits" in outputs else outputs[0]
    total, count = 0.0, 0
    for lo in range(0, len(input_ids), batch):
        ids = input_ids[lo : lo + batch].astype(np.int64)
        mask = mask_all[lo : lo + batch].astype(np.int64)
        feed: dict[str, np.ndarray] = {}
        for i in inputs:
            if i.name == "input_ids":
                feed[i.name] = ids
            elif i.name == "attention_mask":
                feed[i.name] = mask
            elif i.name == "position_ids":
                pos = np.cumsum(mask, axis=1) - 1
                feed[i.name] = np.where(mask == 0, 1, pos).astype(np.int64)
            elif i.name.startswith("past_key_values"):
                heads, head_dim = i.shape[1], i.shape[3]
                dtype = np.float16 if i.type == "tensor(float16)" else np.float32
                feed[i.name] = np.zeros((len(ids), heads, 0, head_dim), dtype)
            else:
                raise ValueError(f"{model}: don't know how to feed input {i.name!r}")
        (logits,) = sess.run([out], feed)
        s, n = _nll_sum(logits, ids, mask)
        total, count = total + s, count + n
    return math.exp(total / count), count


def torch_perplexity(
    model: Any, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, batch: int = 8
) -> tuple[float, int]:
    """The same perplexity for a transformers causal LM in torch (float64 log-softmax)."""
    import torch

    mask_all = np.ones_like(input_ids) if attention_mask is None else attention_mask
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(input_ids), batch):
            ids = input_ids[lo : lo + batch].astype(np.int64)
            mask = mask_all[lo : lo + batch].astype(np.int64)
            logits = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                use_cache=False,
            ).logits
            s, n = _nll_sum(logits.float().numpy(), ids, mask)
            total, count = total + s, count + n
    return math.exp(total / count), count


# --------------------------------------------------------------------------------------------
# Pruning (torch)


def parse_sparsity(s: float | str) -> tuple[float, tuple[int, int] | None]:
    """0.5 -> (0.5, None); "2:4" -> (0.5, (2, 4)): N pruned of every M (N = M - kept)."""
    if isinstance(s, str) and ":" in s:
        n, m = (int(v) for v in s.split(":"))
        return n / m, (n, m)
    return float(s), None


def block_linears(model: Any) -> list[list[tuple[str, torch.nn.Linear]]]:
    """The seven Linear layers of each decoder block, in order, by block."""
    out = []
    for b, layer in enumerate(model.model.layers):
        out.append([(f"layers.{b}.{name}", layer.get_submodule(name)) for name in LINEARS])
    return out


def lowest_mask(score: torch.Tensor, count: int, dim: int | None = None) -> torch.Tensor:
    """Boolean mask of the ``count`` lowest scores (over all, or per slice along ``dim``)."""
    import torch

    mask = torch.zeros_like(score, dtype=torch.bool)
    if count <= 0:
        return mask
    if dim is None:
        idx = torch.topk(score.flatten(), count, largest=False).indices
        mask.view(-1)[idx] = True
    else:
        idx = torch.topk(score, count, dim=dim, largest=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask for N:M along the input dim: the n lowest of every m consecutive columns."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    return lowest_mask(groups, n, dim=2).reshape(rows, cols)


def prune_magnitude(model: Any, sparsity: float | str, scope: str) -> None:
    """Magnitude pruning: per layer (``scope="layer"``) or one global threshold."""
    import torch

    frac, nm = parse_sparsity(sparsity)
    layers = [lin for block in block_linears(model) for _, lin in block]
    with torch.no_grad():
        if nm is not None:  # N:M is decided inside each group: the scope does not matter
            for lin in layers:
                lin.weight[nm_mask(lin.weight.abs(), *nm)] = 0
        elif scope == "layer":
            for lin in layers:
                w = lin.weight
                w[lowest_mask(w.abs(), int(w.numel() * frac))] = 0
        else:
            flat = torch.cat([lin.weight.abs().flatten() for lin in layers])
            count = int(flat.numel() * frac)
            mask = lowest_mask(flat, count)
            start = 0
            for lin in layers:
                n = lin.weight.numel()
                lin.weight[mask[start : start + n].view_as(lin.weight)] = 0
                start += n


class _Stop(Exception):
    """Raised after the block being calibrated has run: the rest of the model is not needed."""


def block_statistics(
    model: Any, calib: np.ndarray, block: int, kind: str, batch: int = 8
) -> dict[str, torch.Tensor]:
    """Input statistics of each Linear of one block over all calibration tokens, the blocks
    before it as they are now (already pruned): per column sum of x^2 (``kind="norm"``, Wanda)
    or the Hessian 2 X^T X / n (``kind="hessian"``, SparseGPT), in float64."""
    import torch

    layers = block_linears(model)[block]
    stats: dict[str, torch.Tensor] = {}
    tokens = {"n": 0}

    def hook(name: str) -> Callable[..., None]:
        def pre(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(0) if kind == "norm" else x.T @ x
            stats[name] = stats[name] + s if name in stats else s

        return pre

    def stop(*_: Any) -> None:
        raise _Stop

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers]
    handles.append(model.model.layers[block].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for lo in range(0, len(calib), batch):
                ids = torch.from_numpy(calib[lo : lo + batch])
                tokens["n"] += ids.numel()
                with contextlib.suppress(_Stop):
                    model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if kind == "hessian":
        return {k: 2.0 * v / tokens["n"] for k, v in stats.items()}
    return stats


def prune_wanda(model: Any, calib: np.ndarray, sparsity: float | str) -> None:
    """Wanda: |W_ij| * ||X_j||_2, lowest per output row (or per N:M group); block by block."""
    import torch

    frac, nm = parse_sparsity(sparsity)
    for b, layers in enumerate(block_linears(model)):
        sq = block_statistics(model, calib, b, "norm")
        with torch.no_grad():
            for name, lin in layers:
                w = lin.weight
                score = w.abs().double() * sq[name].sqrt()[None, :]
                if nm is not None:
                    mask = nm_mask(score, *nm)
                else:
                    mask = lowest_mask(score, int(w.shape[1] * frac), dim=1)
                w[mask] = 0


def sparsegpt_layer(
    w: torch.Tensor,
    h: torch.Tensor,
    frac: float,
    nm: tuple[int, int] | None,
    block: int = BLOCK_SIZE,
    percdamp: float = PERC_DAMP,
) -> torch.Tensor:
    """SparseGPT on one weight [rows, cols] with Hessian h [cols, cols] (float64 throughout).

    Mask per block of ``block`` columns: the ``frac`` share of the block (all rows together)
    with the lowest w^2 / U_jj^2, U the upper Cholesky factor of (H + damp I)^-1; with N:M, the
    n lowest of each group of m in every row, chosen when the sweep reaches the group (with the
    updates so far). Each column in turn: its pruned weights are zeroed and their error spread
    over the block's later columns (OBS update); after the block, the block's errors update all
    later columns at once (lazy batch update).
    """
    import torch

    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = torch.diag(u1)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        if nm is None:
            mask1 = lowest_mask(w1.square() / d.square()[None, :], int(w1.numel() * frac))
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                part = w1[:, j : j + m].square() / d[j : j + m].square()[None, :]
                mask1[:, j : j + m] = lowest_mask(part, n, dim=1)
            col = w1[:, j]
            q = torch.where(mask1[:, j], torch.zeros_like(col), col)
            q1[:, j] = q
            err = (col - q) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            err1[:, j] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def prune_sparsegpt(model: Any, calib: np.ndarray, sparsity: float | str) -> None:
    """SparseGPT block by block: Hessians from the already pruned blocks' outputs."""
    import torch

    frac, nm = parse_sparsity(sparsity)
    for b, layers in enumerate(block_linears(model)):
        hs = block_statistics(model, calib, b, "hessian")
        with torch.no_grad():
            for name, lin in layers:
                new = sparsegpt_layer(lin.weight, hs[name], frac, nm)
                lin.weight.copy_(new.to(lin.weight.dtype))


def measured_sparsity(model: Any) -> float:
    """Share of exact zeros over all block Linear weights."""
    zeros = total = 0
    for block in block_linears(model):
        for _, lin in block:
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total


# --------------------------------------------------------------------------------------------
# The table


def run_reference(
    model_dir: Path,
    calib_path: Path,
    heldout: dict[str, tuple[np.ndarray, np.ndarray | None]],
    onnx_files: list[Path],
    methods: list[str],
    sparsities: list[float | str],
    threads: int,
) -> dict:
    """Dense and pruned perplexities on both held-out texts, with timings; ONNX dense checks."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = _load_tokens(calib_path)[0].astype(np.int64)

    def evaluate() -> dict[str, float]:
        return {k: torch_perplexity(model, ids, mask)[0] for k, (ids, mask) in heldout.items()}

    rows = []
    t0 = time.perf_counter()
    base = evaluate()
    rows.append(
        {
            "method": "dense",
            "sparsity": 0.0,
            "perplexity": base,
            "seconds": 0.0,
            "measured_sparsity": measured_sparsity(model),
        }
    )
    print(
        f"dense: code {base['code']:.4f}, doc {base['doc']:.4f} "
        f"(eval {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    prune: dict[str, Callable[[float | str], None]] = {
        "magnitude-layer": lambda s: prune_magnitude(model, s, "layer"),
        "magnitude-global": lambda s: prune_magnitude(model, s, "global"),
        "wanda": lambda s: prune_wanda(model, calib, s),
        "sparsegpt": lambda s: prune_sparsegpt(model, calib, s),
    }
    for sparsity in sparsities:
        for method in methods:
            if method == "magnitude-global" and parse_sparsity(sparsity)[1] is not None:
                continue  # N:M is chosen inside each group: identical to magnitude-layer
            model.load_state_dict(dense)
            t = time.perf_counter()
            prune[method](sparsity)
            seconds = time.perf_counter() - t
            ppl = evaluate()
            rows.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "perplexity": ppl,
                    "seconds": round(seconds, 2),
                    "measured_sparsity": measured_sparsity(model),
                }
            )
            print(
                f"{method:16s} {sparsity!s:>4}: code {ppl['code']:9.4f}, doc {ppl['doc']:9.4f}"
                f"  ({seconds:.1f} s, {rows[-1]['measured_sparsity']:.4f} zero)",
                flush=True,
            )
    model.load_state_dict(dense)

    onnx_rows = {}
    for path in onnx_files:
        ppl = {k: onnx_perplexity(path, ids, mask)[0] for k, (ids, mask) in heldout.items()}
        rel = max(abs(ppl[k] - base[k]) / base[k] for k in ppl)
        onnx_rows[path.name] = {"perplexity": ppl, "rel_diff_vs_torch": rel}
    return {
        "model": str(model_dir),
        "calibration": {"file": str(calib_path), "shape": list(calib.shape)},
        "heldout": {k: list(v[0].shape) for k, v in heldout.items()},
        "threads": threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sparsegpt": {"block_size": BLOCK_SIZE, "percdamp": PERC_DAMP, "dtype": "float64"},
        "results": rows,
        "onnx_dense": onnx_rows,
    }


def print_table(ref: dict) -> None:
    """Markdown table: method x sparsity, perplexity on code and doc, seconds."""
    print()
    print("| method | sparsity | ppl code | ppl doc | seconds |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in ref["results"]:
        p = r["perplexity"]
        print(
            f"| {r['method']} | {r['sparsity']} | {p['code']:.3f} | {p['doc']:.3f} "
            f"| {r['seconds']:.1f} |"
        )
    if ref["onnx_dense"]:
        print()
        print("| ONNX export (dense, ORT) | ppl code | ppl doc | rel. diff vs torch |")
        print("| --- | ---: | ---: | ---: |")
        for name, r in ref["onnx_dense"].items():
            p = r["perplexity"]
            print(f"| {name} | {p['code']:.4f} | {p['doc']:.4f} | {r['rel_diff_vs_torch']:.1e} |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ppl":
        p = argparse.ArgumentParser(
            prog="torch_reference.py ppl",
            description="Perplexity of an ONNX decoder (ONNX Runtime).",
        )
        p.add_argument("model", type=Path)
        p.add_argument("tokens", type=Path, nargs="+", help=".npz with input_ids [N, T]")
        p.add_argument("--batch", type=int, default=8)
        a = p.parse_args(argv[1:])
        for tokens in a.tokens:
            ids, mask = _load_tokens(tokens)
            ppl, n = onnx_perplexity(a.model, ids, mask, a.batch)
            print(f"{a.model.name} on {tokens.name}: perplexity {ppl:.4f} over {n} tokens")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="train_decoder.py's output folder (model/, *.npz, decoder*.onnx); default "
        "build/decoder, or models/decoder with --tiny",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the committed tiny model: weights from build/decoder/tiny-model (make decoder-tiny), "
        "calibration tokens.npz, held-out rows 0-7 (code) and 8-15 (doc) of heldout.npz",
    )
    p.add_argument("--calib", type=Path, default=None, help="default DIR/calib.npz")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two were slower)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default build/decoder/reference.json (reference.tiny.json with --tiny)",
    )
    a = p.parse_args(argv)
    sparsities: list[float | str] = [s if ":" in s else float(s) for s in a.sparsities.split(",")]
    build = REPO / "build" / "decoder"
    if a.tiny:
        d = a.dir or REPO / "models" / "decoder"
        model_dir, calib = build / "tiny-model", a.calib or d / "tokens.npz"
        ids, mask = _load_tokens(d / "heldout.npz")
        half = len(ids) // 2
        heldout = {
            "code": (ids[:half], None if mask is None else mask[:half]),
            "doc": (ids[half:], None if mask is None else mask[half:]),
        }
        onnx_files = sorted(d.glob("tiny*.onnx"))
        out = a.output or build / "reference.tiny.json"
    else:
        d = a.dir or build
        model_dir, calib = d / "model", a.calib or d / "calib.npz"
        heldout = {k: _load_tokens(d / f"heldout_{k}.npz") for k in ("code", "doc")}
        onnx_files = sorted(d.glob("decoder*.onnx"))
        out = a.output or d / "reference.json"
    ref = run_reference(
        model_dir, calib, heldout, onnx_files, a.methods.split(","), sparsities, a.threads
    )
    out.write_text(json.dumps(ref, indent=1))
    print_table(ref)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
