"""Train a small LLaMA-architecture byte-level decoder on this machine's text; export it to ONNX.

The decoder is transformers' ``LlamaForCausalLM`` with a small config: grouped-query attention,
SwiGLU MLP, RMSNorm, RoPE, untied input embedding and LM head. Tokens are bytes (0..255) plus a
BOS token (256) that starts every document, so nothing is downloaded. The text is the Python
standard library's ``.py`` sources and the plain-text files under ``/usr/share/doc`` (``.gz``
ones decompressed); some stdlib modules and some Debian source packages are held out.

Main model (default, ``--out-dir build/decoder``), all weights inside each ONNX file:

* ``model/`` - the trained torch model (``save_pretrained``), for the torch reference and Optimum.
* ``decoder.legacy.onnx`` / ``decoder.dynamo.onnx`` - ``input_ids`` and ``attention_mask``
  int64 [batch, seq] -> ``logits`` float32 [batch, seq, 257]; TorchScript exporter
  (``dynamo=False``) / ``torch.export`` exporter (``dynamo=True``).
* ``decoder.kv.legacy.onnx`` / ``decoder.kv.dynamo.onnx`` - with KV cache in the layout of Hugging
  Face Optimum and onnxruntime-genai: ``input_ids`` [batch, seq], ``attention_mask``
  [batch, past + seq], ``position_ids`` [batch, seq], ``past_key_values.{i}.key|value``
  [batch, kv_heads, past, head_dim] -> ``logits``, ``present.{i}.key|value``
  [batch, kv_heads, past + seq, head_dim]. A past of length 0 is allowed.
* ``calib.npz`` (32 x 256), ``calib128.npz`` (128 x 256): ``input_ids`` and ``attention_mask``
  (all ones) from the training distribution, rows alternating code / doc; ``calib.npz`` is the
  first 32 rows of ``calib128.npz``. ``calib.kv.npz``: the same 32 rows plus ``position_ids`` and
  empty ``past_key_values.*`` arrays, i.e. every input of the KV exports.
* ``heldout_code.npz``, ``heldout_doc.npz``: ``input_ids`` / ``attention_mask`` [64, 256] from the
  held-out texts (never trained on), for perplexity.
* ``main.json`` - configuration, data manifest, loss curve, timings, export checks
  (``tiny.json`` for ``--tiny``; both under ``build/decoder/``, ``--report`` moves them).

``--tiny`` trains the shrunk test model instead (hidden 64, 2 layers) and writes ``tiny.*.onnx``,
``tokens.npz`` ([8, 64]), ``tokens.kv.npz`` and ``heldout.npz`` ([16, 64]) into ``--out-dir``
(``models/decoder`` for the committed copies). Needs torch, transformers 5.x, onnx, onnxruntime,
onnxscript, numpy::

    python models/train_decoder.py [--out-dir build/decoder]
    python models/train_decoder.py --tiny --out-dir models/decoder
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "bench"))
from torch_reference import onnx_perplexity, torch_perplexity  # noqa: E402

SEED = 0
OPSET = 18
BOS = 256
VOCAB = 257
DOC_ROOT = Path("/usr/share/doc")
# Held-out stdlib code: these top-level modules and packages are never trained on.
HELDOUT_CODE = (
    "argparse.py",
    "difflib.py",
    "email",
    "fractions.py",
    "heapq.py",
    "http",
    "json",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
    "urllib",
)
# Held-out documentation: Debian source packages whose crc32(name) % 10 == 3. Grouping by source
# package keeps the docs of e.g. libfoo1 and libfoo-dev (same changelog) on one side.
DOC_HELDOUT_MOD, DOC_HELDOUT_REM = 10, 3
DOC_FILE_CAP = 64 * 1024  # bytes read from one doc file: huge changelogs would dominate otherwise
# Held-out doc: whole files of a source package until it holds this many bytes, so that one
# package with many files (nodejs' API docs) does not make up most of the held-out text.
HELDOUT_PKG_CAP = 64 * 1024
DOC_NAMES = ("readme", "changelog", "news", "authors", "thanks", "todo", "copyright", "faq", "bugs")
DOC_SUFFIXES = {"", ".txt", ".md", ".rst", ".debian", ".news"}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# One thread: on this 2-core machine shared with other jobs, one torch thread trained 2x faster
# than two (measured: about 2,500 vs 1,250 tokens/s); the thread count is recorded in train.json.
THREADS = 1
MAX_LOGIT_DIFF = 1e-3
MAX_PPL_REL_DIFF = 1e-4


@dataclass(frozen=True)
class Spec:
    """Architecture and training schedule of one model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    batch: int
    seq: int
    lr: float
    warmup: int
    prefix: str  # file name prefix of the exports
    eval_seq: int
    n_heldout: int  # rows per held-out text


MAIN = Spec(
    "main",
    256,
    4,
    8,
    2,
    704,
    steps=560,
    batch=8,
    seq=256,
    lr=2e-3,
    warmup=40,
    prefix="decoder",
    eval_seq=256,
    n_heldout=64,
)
TINY = Spec(
    "tiny",
    64,
    2,
    4,
    2,
    128,
    steps=600,
    batch=16,
    seq=128,
    lr=3e-3,
    warmup=40,
    prefix="tiny",
    eval_seq=64,
    n_heldout=8,
)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class Corpus:
    """Token streams (uint16, BOS before every document) and what went into them."""

    train_code: np.ndarray
    train_doc: np.ndarray
    held_code: np.ndarray
    held_doc: np.ndarray
    manifest: dict


def stream(docs: list[bytes]) -> np.ndarray:
    """Documents as one token stream: BOS, then the document's bytes, for each."""
    parts = []
    for d in docs:
        parts.append(np.array([BOS], np.uint16))
        parts.append(np.frombuffer(d, np.uint8).astype(np.uint16))
    return np.concatenate(parts)


def stdlib_sources() -> tuple[list[bytes], list[bytes], list[str]]:
    """The stdlib's .py files (tests and site-packages skipped): training and held-out sets."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held, held_names = [], [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or path.is_symlink():
            continue
        data = path.read_bytes()
        if not data.strip():
            continue
        if rel.parts[0] in HELDOUT_CODE:
            held.append(data)
            held_names.append(str(rel))
        else:
            train.append(data)
    return train, held, held_names


def is_doc_text(name: str) -> bool:
    """Plain-text documentation by file name (README, changelog, NEWS, .txt, .md, ...)."""
    stem = name[:-3] if name.endswith(".gz") else name
    return stem.lower().startswith(DOC_NAMES) or Path(stem).suffix.lower() in DOC_SUFFIXES


def read_text(path: Path) -> bytes | None:
    """At most DOC_FILE_CAP bytes of a (possibly gzipped) file, or None unless it is UTF-8 text."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(DOC_FILE_CAP)
        else:
            with path.open("rb") as f:
                data = f.read(DOC_FILE_CAP)
    except (OSError, EOFError, zlib.error):
        return None
    if not data.strip() or b"\0" in data:
        return None
    try:  # incremental: a multi-byte character cut off by the cap is not an error
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return data


def source_package(folder: Path) -> str:
    """The Debian source package of a doc folder (first word of changelog.Debian), else its name."""
    log = folder / "changelog.Debian.gz"
    if log.is_file():
        try:
            with gzip.open(log, "rb") as f:
                first = f.readline().split()
            if first:
                return first[0].decode("utf-8", "replace")
        except (OSError, EOFError, zlib.error):
            pass
    return folder.name


def doc_texts() -> tuple[list[bytes], list[bytes], list[str]]:
    """Text under /usr/share/doc, deduplicated, split by source package; copyright files are
    training-only (licence texts repeat across packages)."""
    train: dict[str, bytes] = {}
    held: list[tuple[str, bytes]] = []
    held_bytes: dict[str, int] = {}
    for top in sorted(p for p in DOC_ROOT.iterdir() if p.is_dir() and not p.is_symlink()):
        pkg = source_package(top)
        is_held = zlib.crc32(pkg.encode()) % DOC_HELDOUT_MOD == DOC_HELDOUT_REM
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_symlink() or not is_doc_text(name):
                    continue
                data = read_text(path)
                if data is None:
                    continue
                if is_held:
                    if (
                        not name.startswith("copyright")
                        and held_bytes.get(pkg, 0) < HELDOUT_PKG_CAP
                    ):
                        held.append((str(path.relative_to(DOC_ROOT)), data))
                        held_bytes[pkg] = held_bytes.get(pkg, 0) + len(data)
                else:
                    train.setdefault(hashlib.sha256(data).hexdigest(), data)
    seen = set(train)
    held_unique: dict[str, tuple[str, bytes]] = {}
    for rel, data in held:
        key = hashlib.sha256(data).hexdigest()
        if key not in seen:
            held_unique.setdefault(key, (rel, data))
    return (
        list(train.values()),
        [d for _, d in held_unique.values()],
        [r for r, _ in held_unique.values()],
    )


def load_corpus() -> Corpus:
    """Read both sources and build the four token streams."""
    code_train, code_held, code_held_names = stdlib_sources()
    doc_train, doc_held, doc_held_names = doc_texts()
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": sysconfig.get_paths()["stdlib"],
        "heldout_code_modules": list(HELDOUT_CODE),
        "doc_heldout_rule": f"crc32(source package) % {DOC_HELDOUT_MOD} == {DOC_HELDOUT_REM}",
        "doc_file_cap_bytes": DOC_FILE_CAP,
        "heldout_doc_package_cap_bytes": HELDOUT_PKG_CAP,
        "files": {
            "train_code": len(code_train),
            "heldout_code": len(code_held),
            "train_doc": len(doc_train),
            "heldout_doc": len(doc_held),
        },
        "bytes": {
            "train_code": sum(map(len, code_train)),
            "heldout_code": sum(map(len, code_held)),
            "train_doc": sum(map(len, doc_train)),
            "heldout_doc": sum(map(len, doc_held)),
        },
        "heldout_doc_files": doc_held_names,
        "heldout_code_files": code_held_names,
    }
    return Corpus(
        stream(code_train), stream(doc_train), stream(code_held), stream(doc_held), manifest
    )


def random_windows(s: np.ndarray, n: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` windows of ``seq`` tokens at random offsets (int64 [n, seq])."""
    starts = rng.integers(0, len(s) - seq, n)
    return np.stack([s[i : i + seq] for i in starts]).astype(np.int64)


def spread_windows(s: np.ndarray, n: int, seq: int) -> np.ndarray:
    """``n`` non-overlapping windows evenly spread over the stream (deterministic, no RNG)."""
    chunks = len(s) // seq
    if chunks < n:
        raise SystemExit(f"held-out stream has {chunks} windows of {seq}, need {n}")
    idx = np.linspace(0, chunks - 1, n).round().astype(np.int64)
    return np.stack([s[i * seq : (i + 1) * seq] for i in idx]).astype(np.int64)


def interleave(code: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """Rows alternating code, doc, code, ... so that any leading slice holds both."""
    out = np.empty((len(code) + len(doc), code.shape[1]), np.int64)
    out[0::2], out[1::2] = code, doc
    return out


def save_tokens(path: Path, ids: np.ndarray) -> None:
    """``input_ids`` and an all-ones ``attention_mask``, both int64."""
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))


def save_kv_tokens(path: Path, ids: np.ndarray, cfg: LlamaConfig) -> None:
    """Every input of a KV-cache export for a first (prefill) step: empty past tensors."""
    n, seq = ids.shape
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    arrays = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy(),
    }
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            arrays[f"past_key_values.{i}.{kind}"] = np.zeros(
                (n, cfg.num_key_value_heads, 0, head_dim), np.float32
            )
    np.savez(path, **arrays)


# --------------------------------------------------------------------------------------------
# Model and training


def make_config(spec: Spec) -> LlamaConfig:
    """LlamaConfig for ``spec``: GQA, SwiGLU, RMSNorm, RoPE (theta 10000), untied LM head."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=None,
        initializer_range=0.02,
    )


def lr_at(step: int, spec: Spec) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: LlamaForCausalLM, corpus: Corpus, spec: Spec, seed: int) -> dict:
    """AdamW on random windows, half code and half doc in every batch; returns the log."""
    rng = np.random.default_rng(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    half = spec.batch // 2
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        batch = np.concatenate(
            [
                random_windows(corpus.train_code, half, spec.seq, rng),
                random_windows(corpus.train_doc, spec.batch - half, spec.seq, rng),
            ]
        )
        ids = torch.from_numpy(batch)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 20 == 0 or step == spec.steps - 1:
            recent = float(np.mean(losses[-20:]))
            curve.append((step + 1, recent))
            print(
                f"  step {step + 1:4d}/{spec.steps}  loss {recent:.4f}  "
                f"{time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 1),
        "tokens": spec.steps * spec.batch * spec.seq,
        "final_loss_last20": round(float(np.mean(losses[-20:])), 4),
        "curve": curve,
    }


# --------------------------------------------------------------------------------------------
# Export


class LogitsOnly(nn.Module):
    """input_ids, attention_mask -> logits, no cache: the plain export's signature."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits


class WithCache(nn.Module):
    """The Optimum / onnxruntime-genai signature: flat past key/value tensors in, presents out."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the KV-cache exports."""
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def kv_example(
    cfg: LlamaConfig, batch: int, seq: int, past: int, pad: int = 0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Inputs of a KV step: ``past`` cached positions (random), ``pad`` left-padded on row 0."""
    g = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, 256, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past:]
    kv = [
        torch.randn(batch, cfg.num_key_value_heads, past, head_dim, generator=g)
        for _ in range(2 * cfg.num_hidden_layers)
    ]
    return (ids, mask, pos, *kv)


def export_plain(model: LlamaForCausalLM, path: Path, dynamo: bool) -> None:
    """input_ids/attention_mask -> logits, dynamic batch and sequence."""
    wrapper = LogitsOnly(model).eval()
    ids = torch.randint(0, 256, (2, 8))
    args = (ids, torch.ones_like(ids))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
            prog = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=OPSET,
                **names,
                dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}},
            )
            prog.save(str(path), external_data=False)
        else:
            axes = {0: "batch_size", 1: "sequence_length"}
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                **names,
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
            )


def export_kv(model: LlamaForCausalLM, path: Path, dynamo: bool) -> None:
    """The KV-cache signature; traced with past 5, sequence 8, batch 2 (no 0/1 specialisation)."""
    cfg = model.config
    wrapper = WithCache(model).eval()
    args = kv_example(cfg, 2, 8, 5)
    inames, onames = kv_names(cfg.num_hidden_layers)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            b = torch.export.Dim("batch_size")
            s = torch.export.Dim("sequence_length")
            t = torch.export.Dim("total_sequence_length")
            p = torch.export.Dim("past_sequence_length", min=0)
            shapes = (
                {0: b, 1: s},
                {0: b, 1: t},
                {0: b, 1: s},
                tuple({0: b, 2: p} for _ in inames[3:]),
            )
            prog = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=inames,
                output_names=onames,
                dynamic_shapes=shapes,
            )
            prog.save(str(path), external_data=False)
        else:
            bs = {0: "batch_size", 1: "sequence_length"}
            axes = {
                "input_ids": bs,
                "position_ids": bs,
                "logits": bs,
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            }
            for n in inames[3:]:
                axes[n] = {0: "batch_size", 2: "past_sequence_length"}
            for n in onames[1:]:
                axes[n] = {0: "batch_size", 2: "total_sequence_length"}
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=inames,
                output_names=onames,
                dynamic_axes=axes,
            )


def io_signature(proto: onnx.ModelProto) -> dict[str, list]:
    """name -> [dtype, dims] for every graph input and output (dims: int or symbolic name)."""
    out = {}
    for v in (*proto.graph.input, *proto.graph.output):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out[v.name] = [onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims]
    return out


def check_file(path: Path) -> onnx.ModelProto:
    """Full checker, every weight inside the file, an IR version ONNX Runtime accepts."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    for init in proto.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, init.name
    assert proto.ir_version <= 10, f"{path.name}: IR version {proto.ir_version}"
    return proto


def valid_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray, seq_axis: int) -> float:
    """max |a - b| over the positions whose mask is 1 (padded positions attend to nothing)."""
    keep = mask.astype(bool)
    a = np.moveaxis(a, seq_axis, 1)[keep]
    b = np.moveaxis(b, seq_axis, 1)[keep]
    return float(np.abs(a - b).max())


def check_plain(model: LlamaForCausalLM, path: Path, sample: np.ndarray) -> dict:
    """Logits of ONNX Runtime vs torch: held-out rows, a short batch with left padding."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(model).eval()
    cases = {}
    padded = sample[:2, :37].copy()
    mask_p = np.ones_like(padded)
    mask_p[0, :5] = 0
    for case, (ids, mask) in {
        f"heldout_4x{sample.shape[1]}": (sample[:4], np.ones_like(sample[:4])),
        "left_pad_2x37": (padded, mask_p),
        "one_token": (sample[:3, :1], np.ones_like(sample[:3, :1])),
    }.items():
        (got,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        cases[case] = valid_diff(got, ref, mask, 1)
    return cases


def check_kv(model: LlamaForCausalLM, path: Path, sample: np.ndarray) -> dict:
    """Prefill with an empty past, then decode steps fed with the presents; left padding."""
    cfg = model.config
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = WithCache(model).eval()
    inames, onames = kv_names(cfg.num_hidden_layers)
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def step(args: tuple[torch.Tensor, ...]) -> tuple[float, float, list[torch.Tensor]]:
        feed = {n: a.numpy() for n, a in zip(inames, args, strict=True)}
        got = sess.run(onames, feed)
        with torch.no_grad():
            ref = [r.numpy() for r in wrapper(*args)]
        mask = args[1].numpy()
        seq = args[0].shape[1]
        d_logits = valid_diff(got[0], ref[0], mask[:, -seq:], 1)
        d_present = max(valid_diff(g, r, mask, 2) for g, r in zip(got[1:], ref[1:], strict=True))
        return d_logits, d_present, [torch.from_numpy(r) for r in ref[1:]]

    cases = {}
    empty = [
        torch.zeros(2, cfg.num_key_value_heads, 0, head_dim)
        for _ in range(2 * cfg.num_hidden_layers)
    ]
    ones = torch.ones(2, 44, dtype=torch.int64)
    ids = torch.from_numpy(sample[:2, :44])
    pos = torch.arange(44).expand(2, 44)
    # prefill 40 tokens on an empty past, then 1 token on past 40, then 3 tokens on past 41
    cases["prefill_past0_2x40"], _, present = step((ids[:, :40], ones[:, :40], pos[:, :40], *empty))
    cases["decode_1_past40"], _, present = step(
        (ids[:, 40:41], ones[:, :41], pos[:, 40:41], *present)
    )
    cases["chunk_3_past41"] = step((ids[:, 41:44], ones, pos[:, 41:44], *present))[0]
    d_logits, d_present, _ = step(kv_example(cfg, 3, 6, 4, pad=2, seed=1))
    cases["left_pad_past4_3x6"] = d_logits
    cases["left_pad_present"] = d_present
    d_logits, _, _ = step(kv_example(cfg, 2, 9, 0, pad=3, seed=2))
    cases["left_pad_past0_2x9"] = d_logits
    return cases


def check_export(
    model: LlamaForCausalLM,
    path: Path,
    kv: bool,
    exporter: str,
    seconds: float,
    heldout: dict[str, np.ndarray],
    torch_ppl: dict[str, float],
) -> dict:
    """Checker, ORT vs torch logits, dense perplexity vs torch; the export's summary."""
    proto = check_file(path)
    diffs = (check_kv if kv else check_plain)(model, path, heldout["code"])
    ppl = {k: onnx_perplexity(path, v)[0] for k, v in heldout.items()}
    rel = max(abs(ppl[k] - torch_ppl[k]) / torch_ppl[k] for k in ppl)
    ops = Counter(n.op_type for n in proto.graph.node)
    worst = max(diffs.values())
    print(
        f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, IR {proto.ir_version}, "
        f"{len(proto.graph.node)} nodes, export {seconds:.1f} s, max |dlogit| "
        f"{worst:.2e}, ppl " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items())
    )
    assert worst < MAX_LOGIT_DIFF, (path.name, diffs)
    assert rel < MAX_PPL_REL_DIFF, (path.name, ppl, torch_ppl)
    return {
        "exporter": exporter,
        "export_seconds": round(seconds, 1),
        "bytes": path.stat().st_size,
        "ir_version": proto.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items())),
        "io": io_signature(proto),
        "max_abs_logit_diff": diffs,
        "perplexity": ppl,
        "perplexity_rel_diff_vs_torch": rel,
    }


def export_all(
    model: LlamaForCausalLM,
    out: Path,
    spec: Spec,
    heldout: dict[str, np.ndarray],
    torch_ppl: dict[str, float],
) -> dict:
    """The four torch exports, each checked; an exporter that fails is reported, not fatal."""
    report = {}
    for kv in (False, True):
        for dynamo in (False, True):
            name = f"{spec.prefix}{'.kv' if kv else ''}.{'dynamo' if dynamo else 'legacy'}.onnx"
            path = out / name
            t0 = time.perf_counter()
            try:
                (export_kv if kv else export_plain)(model, path, dynamo)
            except Exception as exc:
                report[name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
                print(f"{name}: export FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            exporter = f"torch.onnx.export(dynamo={dynamo})"
            report[name] = check_export(
                model, path, kv, exporter, time.perf_counter() - t0, heldout, torch_ppl
            )
    return report


def export_optimum(
    model: LlamaForCausalLM,
    model_dir: Path,
    out: Path,
    spec: Spec,
    cli: str,
    heldout: dict[str, np.ndarray],
    torch_ppl: dict[str, float],
) -> dict:
    """Optimum's exporter (``optimum-cli export onnx --task text-generation-with-past``) on the
    saved model folder, offline; it needs transformers < 4.58, hence its own environment."""
    name = f"{spec.prefix}.optimum.onnx"
    work = REPO / "build" / "decoder" / f"optimum-{spec.name}"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        cli,
        "export",
        "onnx",
        "--model",
        str(model_dir),
        "--task",
        "text-generation-with-past",
        str(work),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not (work / "model.onnx").is_file():
        print(f"{name}: optimum export FAILED ({proc.returncode}):\n{proc.stderr[-2000:]}")
        return {name: {"error": proc.stderr[-4000:], "command": " ".join(cmd)}}
    if (work / "model.onnx_data").exists():
        raise SystemExit(f"{name}: optimum wrote external data; expected one file")
    shutil.copyfile(work / "model.onnx", out / name)
    versions = subprocess.run(
        [
            str(Path(cli).parent / "python"),
            "-c",
            "import optimum.version as o, transformers as t, torch; "
            "print(o.__version__, t.__version__, torch.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    info = check_export(
        model,
        out / name,
        True,
        "optimum-cli export onnx (optimum-onnx)",
        seconds,
        heldout,
        torch_ppl,
    )
    info["command"] = " ".join(cmd)
    info["versions"] = dict(zip(("optimum", "transformers", "torch"), versions, strict=False))
    return {name: info}


# --------------------------------------------------------------------------------------------


def write_data(out: Path, corpus: Corpus, spec: Spec, cfg: LlamaConfig, seed: int) -> dict:
    """Calibration and held-out token files; returns the held-out arrays by name."""
    rng = np.random.default_rng(seed + 1)  # not the training stream's generator
    seq = spec.eval_seq
    if spec.name == "tiny":
        calib = interleave(
            random_windows(corpus.train_code, 4, seq, rng),
            random_windows(corpus.train_doc, 4, seq, rng),
        )
        save_tokens(out / "tokens.npz", calib)
        save_kv_tokens(out / "tokens.kv.npz", calib, cfg)
        code = spread_windows(corpus.held_code, spec.n_heldout, seq)
        doc = spread_windows(corpus.held_doc, spec.n_heldout, seq)
        save_tokens(out / "heldout.npz", np.concatenate([code, doc]))
    else:
        calib = interleave(
            random_windows(corpus.train_code, 64, seq, rng),
            random_windows(corpus.train_doc, 64, seq, rng),
        )
        save_tokens(out / "calib128.npz", calib)
        save_tokens(out / "calib.npz", calib[:32])
        save_kv_tokens(out / "calib.kv.npz", calib[:32], cfg)
        code = spread_windows(corpus.held_code, spec.n_heldout, seq)
        doc = spread_windows(corpus.held_doc, spec.n_heldout, seq)
        save_tokens(out / "heldout_code.npz", code)
        save_tokens(out / "heldout_doc.npz", doc)
    return {"code": code, "doc": doc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="default build/decoder (build/decoder/tiny with --tiny)",
    )
    parser.add_argument("--tiny", action="store_true", help="the small committed test model")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--optimum-cli",
        default=None,
        help="optimum-cli of an environment with optimum-onnx (transformers<4.58): "
        "also export with Optimum",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="JSON report (default build/decoder/main.json or tiny.json)",
    )
    args = parser.parse_args()
    spec = TINY if args.tiny else MAIN
    if args.steps is not None:
        spec = Spec(**{**asdict(spec), "steps": args.steps})
    if args.lr is not None:
        spec = Spec(**{**asdict(spec), "lr": args.lr})
    out = args.out_dir or REPO / "build" / "decoder" / ("tiny" if args.tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    corpus = load_corpus()
    m = corpus.manifest
    print(f"data: {m['files']} files, {m['bytes']} bytes, read in {time.perf_counter() - t0:.1f} s")

    cfg = make_config(spec)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(
        mod.weight.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and ".layers." in name
    )
    print(
        f"{spec.name}: {n_params:,} parameters ({n_linear:,} in decoder-block Linears); "
        f"training {spec.steps} steps of {spec.batch} x {spec.seq} on {args.threads} thread(s)"
    )

    log = train(model, corpus, spec, args.seed)
    print(f"trained in {log['seconds']} s, loss {log['final_loss_last20']} (mean of last 20)")
    model.eval()

    heldout = write_data(out, corpus, spec, cfg, args.seed)
    with torch.no_grad():
        t_ppl = {k: torch_perplexity(model, v)[0] for k, v in heldout.items()}
    print("torch perplexity: " + ", ".join(f"{k} {v:.4f}" for k, v in t_ppl.items()))
    model_dir = out / "model" if spec.name == "main" else REPO / "build" / "decoder" / "tiny-model"
    model.save_pretrained(model_dir)

    exports = export_all(model, out, spec, heldout, t_ppl)
    if args.optimum_cli:
        exports.update(
            export_optimum(model, model_dir, out, spec, args.optimum_cli, heldout, t_ppl)
        )
    report = {
        "spec": asdict(spec),
        "threads": args.threads,
        "seed": args.seed,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "transformers": __import__("transformers").__version__,
            "onnxscript": __import__("onnxscript").__version__,
        },
        "parameters": n_params,
        "decoder_linear_parameters": n_linear,
        "data": corpus.manifest,
        "train": log,
        "torch_perplexity": t_ppl,
        "exports": exports,
    }
    report_path = args.report or REPO / "build" / "decoder" / f"{spec.name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
