"""Inputs for the models the stages run: the user's samples (.npz files) matched to the model's
inputs and batched, or generated ones. Checks happen before any model runs.

    spec.py      what a model input is, batches of samples (`Inputs`), --input-shape
    npz.py       reading .npz files safely
    readers.py   where samples come from: an .npz, a folder of shards, arrays, an iterable of
                 input dicts or a CalibrationDataReader
    match.py     arrays matched to the model's inputs, batched; labels; data file checks
    generate.py  generated inputs where no data is given
    sequence.py  a decoder's mask, positions and empty KV cache, consistent with its tokens
"""

from __future__ import annotations

from onnxprune.inputs.generate import (
    GENERATED_BATCHES,
    INT_HIGH,
    Usable,
    generate,
    generated_shapes,
    resolve_shapes,
    usable_values,
)
from onnxprune.inputs.match import (
    Matched,
    Signature,
    check_data_file,
    check_labels,
    from_arrays,
    match,
    model_signature,
)
from onnxprune.inputs.npz import ArrayHeader, load_npz, read_npz_headers, scalar_arrays
from onnxprune.inputs.readers import (
    FirstStepBatches,
    ShardedBatches,
    check_samples,
    first_step_inputs,
    read_samples,
    sample_files,
    sample_keys,
)
from onnxprune.inputs.spec import (
    DEFAULT_BATCH,
    LABELS,
    ORT_TYPES,
    Dim,
    Inputs,
    InputSpec,
    batch_axes_of,
    batch_rows,
    check_batch_size,
    check_shape_names,
    fit_empty,
    input_specs,
    parse_batch_axes,
    parse_input_shapes,
    scalar_type,
    shape_text,
    take_rows,
    with_batch_axes,
)

__all__ = [
    "DEFAULT_BATCH",
    "GENERATED_BATCHES",
    "INT_HIGH",
    "LABELS",
    "ORT_TYPES",
    "ArrayHeader",
    "Dim",
    "FirstStepBatches",
    "InputSpec",
    "Inputs",
    "Matched",
    "ShardedBatches",
    "Signature",
    "Usable",
    "batch_axes_of",
    "batch_rows",
    "check_batch_size",
    "check_data_file",
    "check_labels",
    "check_samples",
    "check_shape_names",
    "first_step_inputs",
    "fit_empty",
    "from_arrays",
    "generate",
    "generated_shapes",
    "input_specs",
    "load_npz",
    "match",
    "model_signature",
    "parse_batch_axes",
    "parse_input_shapes",
    "read_npz_headers",
    "read_samples",
    "resolve_shapes",
    "sample_files",
    "sample_keys",
    "scalar_arrays",
    "scalar_type",
    "shape_text",
    "take_rows",
    "usable_values",
    "with_batch_axes",
]
