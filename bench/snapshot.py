"""Behaviour snapshot: the bytes a fixed set of commands writes, proving a refactor changed nothing.

    python bench/snapshot.py bench/out/before.json     # before the change
    python bench/snapshot.py bench/out/after.json      # after it
    python bench/snapshot.py --compare bench/out/before.json bench/out/after.json

Every command runs the `onnxprune` CLI on a model from tests/ or models/ in one mode (unstructured,
N:M, calibrated, structured, heads, storage options) and records the SHA-256 of the pruned model
and of its JSON report with the volatile fields (times, paths) removed, plus the exit code and the
last line of stderr for commands that fail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import builders  # noqa: E402
import channel_models  # noqa: E402

VOLATILE = {"seconds", "input", "output", "input_path", "output_path", "latency", "time_s"}


def models(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Each model saved, with a calibration file of 32 seeded samples."""
    protos = {
        "small_cnn": builders.small_cnn(),
        "mlp": builders.mlp(),
        "combined": channel_models.combined(),
        "concat_split_slice": channel_models.concat_split_slice(),
        "packed_qkv": channel_models.packed_qkv(),
        "heads_torchscript": channel_models.heads_torchscript(),
        "random_cnn": channel_models.random_cnn(3),
        "random_transformer": channel_models.random_transformer(1),
        "squeeze_excite": channel_models.squeeze_excite(),
        "per_channel_constants": channel_models.per_channel_constants(),
    }
    out: dict[str, tuple[Path, Path]] = {}
    for name, proto in protos.items():
        path = folder / f"{name}.onnx"
        onnx.save(proto, str(path))
        arrays: dict[str, np.ndarray] = {}
        for seed in range(4):
            for k, v in channel_models.feeds(proto, seed, {"N": 8, "S": 6, "B": 8}).items():
                arrays.setdefault(k, []).append(v)  # type: ignore[arg-type]
        calib = folder / f"{name}.calib.npz"
        np.savez(calib, **{k: np.concatenate(v) for k, v in arrays.items()})
        out[name] = (path, calib)
    digits = ROOT / "models"
    out["digits_cnn"] = (digits / "digits_cnn.onnx", digits / "digits_calib.npz")
    return out


MODES: dict[str, list[str]] = {
    "global50": ["-s", "0.5"],
    "uniform70": ["-s", "0.7", "--method", "uniform"],
    "minkeep85": ["-s", "0.85", "--min-keep", "0.1"],
    "nm24": ["--pattern", "2:4"],
    "sparsegpt50": ["-s", "0.5", "--calibration", "{calib}"],
    "sparsegpt50_onepass": ["-s", "0.5", "--calibration", "{calib}", "--calibration-mode",
                            "one-pass"],
    "wanda50": ["-s", "0.5", "--calibration", "{calib}", "--criterion", "wanda"],
    "magcal50": ["-s", "0.5", "--calibration", "{calib}", "--criterion", "magnitude"],
    "sparsegpt24": ["--pattern", "2:4", "--calibration", "{calib}"],
    "struct30": ["--structured", "-s", "0.3"],
    "struct30_macs_round": ["--structured", "-s", "0.3", "--target", "macs", "--round-to", "4"],
    "struct30_nocomp": ["--structured", "-s", "0.3", "--no-bias-correction"],
    "struct30_heads": ["--structured", "-s", "0.3", "--heads"],
    "struct30_cal": ["--structured", "-s", "0.3", "--calibration", "{calib}"],
    "struct30_cal_onepass": ["--structured", "-s", "0.3", "--calibration", "{calib}",
                             "--calibration-mode", "one-pass"],
    "struct30_cal_wanda": ["--structured", "-s", "0.3", "--calibration", "{calib}",
                           "--criterion", "wanda"],
    "sparse_storage": ["-s", "0.9", "--sparse-storage"],
    "external": ["-s", "0.5", "--external-data"],
}  # fmt: skip


def _scrub(value: object) -> object:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_one(exe: str, model: Path, calib: Path, mode: str, folder: Path) -> dict[str, object]:
    out = folder / f"{model.stem}.{mode}.onnx"
    report = folder / f"{model.stem}.{mode}.json"
    args = [a.format(calib=calib) for a in MODES[mode]]
    cmd = [exe, str(model), *args, "-o", str(out), "--report", str(report), "--force", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row: dict[str, object] = {"exit": proc.returncode}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        row["stderr"] = lines[-1] if lines else ""
        return row
    files = sorted(p for p in folder.glob(f"{out.name}*") if p.is_file())
    row["model"] = _digest(files)
    data = json.loads(report.read_text())
    row["report"] = hashlib.sha256(
        json.dumps(_scrub(data), sort_keys=True).encode()
    ).hexdigest()[:16]
    row["report_json"] = _scrub(data)
    return row


def snapshot(path: Path) -> None:
    exe = str(Path(sys.executable).parent / "onnxprune")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        found = models(folder)
        jobs = [(n, m) for n in found for m in MODES]
        with ThreadPoolExecutor(2) as pool:
            rows = list(
                pool.map(lambda job: run_one(exe, *found[job[0]], job[1], folder), jobs)
            )
    result = {f"{n}/{m}": row for (n, m), row in zip(jobs, rows, strict=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    failed = sum(1 for r in rows if r["exit"] != 0)
    print(f"{len(rows)} commands, {failed} refused; written to {path}")


def compare(before: Path, after: Path) -> int:
    a = json.loads(before.read_text())
    b = json.loads(after.read_text())
    differ = 0
    for key in sorted(set(a) | set(b)):
        ra, rb = a.get(key, {}), b.get(key, {})
        fields = [f for f in ("exit", "model", "report", "stderr") if ra.get(f) != rb.get(f)]
        if fields:
            differ += 1
            print(f"{key}: differs in {', '.join(fields)}")
            for f in fields:
                if f != "report":
                    print(f"    {f}: {ra.get(f)!r} -> {rb.get(f)!r}")
            if "report" in fields and "report_json" in ra and "report_json" in rb:
                _diff_json(ra["report_json"], rb["report_json"], "    ")
    print(f"{len(set(a) | set(b))} commands, {differ} differ")
    return 1 if differ else 0


def _diff_json(a: object, b: object, indent: str, where: str = "") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff_json(a.get(k), b.get(k), indent, f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff_json(x, y, indent, f"{where}[{i}]")
    elif a != b:
        print(f"{indent}{where}: {str(a)[:120]!r} -> {str(b)[:120]!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.paths))
    snapshot(args.paths[0])
