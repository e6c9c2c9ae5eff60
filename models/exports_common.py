"""What every exporter script of models/exports/ shares: needs only numpy, onnx, onnxruntime.

make_exports.py (torch), exports_tf.py (tensorflow + tf2onnx) and exports_paddle.py
(paddlepaddle + paddle2onnx) run in three virtual environments, since those frameworks do not
install side by side; each saves its models through `finish`, which fixes the IR version,
runs onnx.checker's full check and ONNX Runtime, and compares with the framework's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

OUT = Path(__file__).resolve().parent / "exports"
IR_VERSION = 8  # opsets 11 to 17 are all IR 8 or earlier; ONNX Runtime 1.20+ loads it
MAX_BYTES = 1 << 20


def finish(
    model: onnx.ModelProto,
    name: str,
    reference: dict[str, np.ndarray],
    expected: Sequence[np.ndarray] | None = None,
    *,
    atol: float = 1e-4,
) -> Path:
    """Set the IR version, check fully, run in ONNX Runtime on `reference` inputs (and match
    the framework's `expected` outputs), write models/exports/<name>.onnx; return its path."""
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, reference)
    if expected is not None:
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            err = float(np.max(np.abs(a - np.asarray(b)))) if a.size else 0.0
            if a.shape != np.asarray(b).shape or err > atol:
                raise SystemExit(f"{name}: output {i} differs from the framework's: "
                                 f"{a.shape} vs {np.asarray(b).shape}, max error {err:.3g}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.onnx"
    data = model.SerializeToString()
    if len(data) > MAX_BYTES:
        raise SystemExit(f"{name}: {len(data)} bytes, over the {MAX_BYTES} bytes allowed")
    path.write_bytes(data)
    print(f"{path.name}: {len(data) / 1024:.0f} KiB, opset "
          f"{next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))}, "
          f"outputs {[o.shape for o in got]}")
    return path


def save_data(name: str, kind: str, arrays: dict[str, np.ndarray]) -> Path:
    """models/exports/<name>_<kind>.npz, uncompressed (onnxprune reads plain .npz)."""
    path = OUT / f"{name}_{kind}.npz"
    np.savez(path, **arrays)
    shapes = {k: (v.shape, str(v.dtype)) for k, v in arrays.items()}
    print(f"  {path.name}: {shapes}")
    return path


def set_dims(value: onnx.ValueInfoProto, dims: Sequence[int | str | None]) -> None:
    """Rewrite a graph input's declared dims: an int as dim_value (-1 literally, as older
    Paddle exports write dynamic dims), a str as dim_param, None as unknown."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d
