"""Load and save: onnx-ir in (external data memory-mapped), atomic writes out, input untouched."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxprune.core import wire
from onnxprune.core.graphs import all_graphs, iter_tensors
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.storage import datafile, wellformed, writer
from onnxprune.storage import sparse as sparse_storage

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with a margin.
PROTO_LIMIT_BYTES = 2**31 - 2**27
# model.meta key: names the input's main graph had value_info for.
VALUE_INFO_KEY = "onnxprune.value_info"
# model.meta key: the input kept its weights in data files (the output keeps that layout).
EXTERNAL_KEY = "onnxprune.external_data"


def inline_external(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """`proto` (serialised from `model`) with its external tensors' bytes inside, for ONNX
    Runtime sessions made from bytes (which resolve data files against the working folder)."""
    bases = {t.base_dir for _, t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)}
    for base in bases:
        onnx.external_data_helper.load_external_data_for_model(proto, os.fspath(base))
    return proto


def external_data_files(model: ir.Model) -> set[str]:
    """Real paths of the external data files the model reads from."""
    return {
        os.path.realpath(t.path) for _, t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)
    }


def source_files(model: ir.Model) -> set[str]:
    """Real paths of every data file the model was read from: those its tensors read, and those
    its sparse initializers' values and indices came from (read whole at load)."""
    return external_data_files(model) | set(model.meta.get(sparse_storage.SOURCES_KEY, ()))


def tensor_nbytes(model: ir.Model) -> int:
    """Bytes of all stored tensors, without reading any of them."""
    return sum(t.nbytes for _, t in iter_tensors(model))


def model_files(path: str | os.PathLike, model: ir.Model | None = None) -> list[Path]:
    """The .onnx file and the external data files its tensors live in.

    Read from `model` when it is loaded, else from the file's header (its weights are not read).
    """
    path = Path(path)
    if model is not None:
        data = [Path(p) for p in sorted(source_files(model))]
    else:
        try:
            proto, _, mapped = wire.load_mapped(str(path))
            mapped.close()
        except (ValueError, OSError, DecodeError):
            return [path]  # an unreadable file is just its own bytes
        locations = {
            e.value
            for tensor in sparse_storage.proto_tensors(proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for e in tensor.external_data
            if e.key == "location" and isinstance(e.value, str)  # bytes: not UTF-8, no file
        }
        data = [path.parent / location for location in sorted(locations)]
    return [path, *(p for p in data if p.is_file())]


def file_size(path: str | os.PathLike, model: ir.Model | None = None) -> int:
    """Size of a model on disk: the .onnx file plus the external data files it references."""
    return sum(p.stat().st_size for p in model_files(path, model))


def _check_external_tensor(name: str, tensor: ir.ExternalTensor, model_dir: Path) -> None:
    """A tensor's data file is a file in the model's folder that opens as its location is
    written and holds the tensor's bytes; else one line saying why (the readers would fail)."""
    location = os.fspath(tensor.location)
    if "\0" in location:
        raise ModelLoadError(
            f"external data of tensor {name!r} has a location with a NUL byte ({location!r}); "
            "refused: no file has such a name"
        )
    if location.endswith(("/", os.sep, *([os.altsep] if os.altsep else []))):
        raise ModelLoadError(
            f"external data of tensor {name!r} has the location {location!r}, which ends with a "
            "separator: a folder, not a file; refused"
        )
    base = os.path.realpath(model_dir)
    if os.path.isabs(location):
        raise ModelLoadError(
            f"external data of tensor {name!r} has the absolute location {location!r}; "
            "refused: external data must lie in the model's folder"
        )
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        raise ModelLoadError(
            f"external data of tensor {name!r} points outside the model's folder "
            f"({location!r}); refused (a known path-traversal attack on ONNX loaders)"
        )
    # as the readers open it: realpath settles `sub/..` on paper even where `sub` is no folder
    opened = os.path.join(model_dir, location)
    if not os.path.isfile(opened):
        if os.path.isfile(target):
            raise ModelLoadError(
                f"external data location {location!r} of tensor {name!r} does not open: a "
                f"folder it names on the way to {target} is missing or not a folder"
            )
        raise ModelLoadError(
            f"external data file {location!r} of tensor {name!r} is missing: expected at {target}; "
            "copy it beside the model"
        )
    st = os.stat(opened)
    if st.st_nlink > 1:  # as onnx.load and onnx-ir refuse it, and before either is reached
        raise ModelLoadError(
            f"external data file {location!r} of tensor {name!r} has {st.st_nlink} names (hard "
            "links); refused, as ONNX loaders refuse it (a hard link can bring in a file from "
            "outside the model's folder): copy it beside the model instead of linking it"
        )
    end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
    size = st.st_size
    if size < end:
        raise ModelLoadError(
            f"external data file {location!r} is truncated: tensor {name!r} needs bytes up to "
            f"{end}, the file has {size}"
        )


def check_model_path(path: str | os.PathLike) -> Path:
    """The model argument names a readable, non-empty file (before anything else is done)."""
    path = Path(path)
    try:
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        if not path.is_file():
            raise ModelLoadError(f"{path}: not a file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path}: not an ONNX model (the file is empty)")
    except OSError as exc:  # a name too long, a folder we may not enter
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: cannot be read (permission denied)")
    return path


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read a model; external data stays on disk, memory-mapped on first use."""
    path = check_model_path(path)
    try:
        proto, payloads, mapped = wire.load_mapped(str(path), populate=True)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{path}: not an ONNX model, or a truncated one (protobuf: {reason})"
        ) from None
    if not proto.graph.node or not proto.opset_import:
        raise ModelLoadError(
            f"{path}: not an ONNX model, or a truncated one (no graph nodes or opset imports)"
        )
    # onnx-ir drops sparse initializers: checked, and taken out as dense ones, before it runs
    taken = sparse_storage.take(proto, path, _check_external_tensor)
    stubs = {name: (0, coo.nbytes) for name, coo in taken.main.items() if name not in payloads}
    wellformed.check_model(proto, path, {**payloads, **stubs})  # refused here, before any work
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: malformed ONNX model ({exc})") from None
    # onnx-ir writes value_info for every initializer; remember what the input had, to keep it so
    model.meta[VALUE_INFO_KEY] = frozenset(vi.name for vi in proto.graph.value_info)
    del proto
    for name, (offset, length) in payloads.items():
        stripped = model.graph.initializers[name].const_value
        assert stripped is not None
        try:
            mapped_tensor = wire.mapped_tensor(
                mapped, offset, length, stripped.dtype, stripped.shape, name
            )
        except wire.WireError as exc:
            raise ModelLoadError(f"{path}: malformed ONNX model ({exc})") from None
        model.graph.initializers[name].const_value = mapped_tensor
    for name, coo in taken.main.items():
        model.graph.initializers[name].const_value = coo.lazy()
    if not payloads:
        mapped.close()  # nothing reads from it; mapped tensors keep their own reference
    ir.external_data.set_base_dir(model.graph, path.parent)
    for graph in all_graphs(model)[1:]:
        ir.external_data.set_base_dir(graph, path.parent)
    for name, tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            _check_external_tensor(name, tensor, path.parent)
    model.meta[sparse_storage.SPARSE_KEY] = bool(taken)
    model.meta[sparse_storage.SOURCES_KEY] = frozenset(taken.sources)
    model.meta[EXTERNAL_KEY] = bool(source_files(model))
    return model


def input_files(path: str | os.PathLike | None, model: ir.Model | None = None) -> dict[Path, str]:
    """The files a run reads its model from, each with what it is: never a destination."""
    files: dict[Path, str] = {}
    if path is not None:
        main, *data = model_files(check_model_path(path))
        files[main] = "the input model"
        files.update((p, "a data file of the input model") for p in data)
    if model is not None:
        files.update(
            (Path(p), "a data file of the input model")
            for p in source_files(model)
            if Path(p) not in files
        )
    return files


def check_output_path(
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    force: bool = False,
    inputs: dict[Path, str] | None = None,
) -> Path:
    """Fail early, before any work, if the output cannot or must not be written."""
    return writer.check_destination(
        output, inputs={**input_files(input_path), **(inputs or {})}, force=force
    )


def data_file_names(out: Path) -> Iterator[str]:
    """Names for the output's data file, first free one taken: `<output>.data`, then numbered
    ones (a replaced output's file stays until the new model is in place)."""
    base = out.name
    try:
        base.encode("utf-8")
        fits = len(os.fsencode(base)) + 12 <= writer.name_max(out.parent)
    except UnicodeEncodeError:
        fits = False
    if not fits:  # an ONNX location is UTF-8 text: name the file after a digest instead
        base = "onnxprune-" + hashlib.sha1(os.fsencode(out.name)).hexdigest()[:12] + ".onnx"
    yield f"{base}.data"
    for n in range(2, 1000):
        yield f"{base}.{n}.data"


def _own_data_files(out: Path, inputs: dict[Path, str]) -> list[Path]:
    """The data files the model now at `out` reads, that are onnxprune's to remove once it is
    replaced: named like the files `data_file_names` gives, in its folder, and no input's."""
    if not out.is_file():
        return []
    names = set(data_file_names(out))
    own = []
    for p in model_files(out)[1:]:
        if p.parent.resolve() != out.parent.resolve() or p.name not in names:
            continue
        if any(writer.same_file(p, q) for q in inputs):
            continue
        own.append(p)
    return own


@dataclass(frozen=True)
class Save:
    """How `pipeline.prune` writes its output (the path and --force travel beside it).

    `external_data`: weights in a data file beside the model (None: as the input, or when they
    would not fit a 2 GB protobuf); `sparse_storage`: weights as sparse initializers where that
    takes fewer bytes (None: as the input); `check`: onnx.checker with full shape inference on
    the written model before it is moved into place.
    """

    external_data: bool | None = None
    sparse_storage: bool | None = None
    check: bool = True


def save_model(
    model: ir.Model,
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    force: bool = False,
    external_data: bool | None = None,
    check: bool = False,
    sparse: bool | sparse_storage.Layout | None = None,
) -> Path:
    """Write a model and its data file as one unit; the destination sees the old model with its
    old data, or the new model with its new data, never a mix, and never a half-written file.

    `stage_model` writes and checks it under temporary names beside the output, then
    `StagedModel.commit` puts it in place. External data is kept when the input had it, forced by
    ``external_data=True``, or needed because the tensors would not fit a 2 GB protobuf. Tensors
    stream to disk one at a time. ``sparse=True`` writes each main-graph initializer as a sparse
    initializer where that is smaller (`sparse.plan`; a `sparse.Layout` gives the decisions made
    already); the default keeps the input's form.
    """
    staged = stage_model(
        model,
        output,
        input_path=input_path,
        force=force,
        external_data=external_data,
        check=check,
        sparse=sparse,
    )
    try:
        writer.commit_all([staged])
    finally:
        staged.discard()
    return staged.out


def stage_model(
    model: ir.Model,
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    force: bool = False,
    external_data: bool | None = None,
    check: bool = False,
    sparse: bool | sparse_storage.Layout | None = None,
) -> StagedModel:
    """The first half of `save_model`: the model (and its data file) written under temporary
    names beside the output, flushed and checked, not yet in place. A failure leaves nothing."""
    inputs = input_files(input_path, model)
    out = writer.check_destination(output, inputs=inputs, force=force)
    layout = sparse_layout(model, sparse)
    if external_data is None:
        external_data = (
            bool(model.meta.get(EXTERNAL_KEY) or external_data_files(model))
            or tensor_nbytes(model) > PROTO_LIMIT_BYTES
        )
    folder = out.parent
    writer.remove_stale(folder, leftover=_left_by_commit)
    staged = StagedModel(out, force, inputs, writer.temp_file(folder, "onnx"))
    try:
        try:
            if external_data:
                staged.tmp_data = writer.temp_file(folder, "data")
                staged.header = _write_external(model, staged.tmp_data, layout)
                onnx.save(staged.header, str(staged.tmp_model))
                writer.sync(staged.tmp_data)
            else:
                _write_inline(model, staged.tmp_model, layout)
            writer.sync(staged.tmp_model)
        except OSError as exc:
            raise OutputError(f"{out}: write failed ({exc.strerror or exc})") from None
        _fault("written")
        if check:
            check_model_file(staged.tmp_model)
        _fault("checked")
    except BaseException:
        staged.discard()
        raise
    return staged


class StagedModel:
    """A model written and checked under temporary names beside its output, not yet in place.

    `path` is a whole model ONNX Runtime can load (its header names the temporary data file)
    until `commit` puts it in place; `discard` removes whatever is left of it. Part of a run's
    outputs with `writer.commit_all` (last: its commit is the one a file that appeared meanwhile
    can refuse).
    """

    def __init__(self, out: Path, force: bool, inputs: dict[Path, str], tmp_model: Path) -> None:
        self.out, self.force, self.inputs, self.tmp_model = out, force, inputs, tmp_model
        self.tmp_data: Path | None = None
        self.header: onnx.ModelProto | None = None  # of a model with a data file
        self.data_path: Path | None = None  # its data file at its final name, until committed
        self.claimed: Path | None = None

    @property
    def path(self) -> Path:
        return self.tmp_model

    def size(self) -> int:
        """Bytes the output takes once in place: the model naming its data file's final name
        (the first free one now, which the commit takes unless another file takes it first)
        and the data file."""
        if self.header is None or self.tmp_data is None:
            return self.tmp_model.stat().st_size
        header = onnx.ModelProto()
        header.CopyFrom(self.header)
        _relocate(header, self.tmp_data.name, next(_free_data_names(self.out)).name)
        return header.ByteSize() + self.tmp_data.stat().st_size

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return writer.folder_lock(self.out.parent)

    def commit(self, keep: bool = False) -> Path:
        """Put the model in place with its data file, signals held (`writer.commit_all`).

        Under the folder's lock: the data files of the model now in place are read (they go
        once it is replaced); the header is told the first free data file name and flushed; a
        claim records what comes (`writer.write_claim`); the data file is linked to that name,
        and the model renamed over the output at once, and the replaced data files removed at
        once: a kill (SIGKILL, power loss) between two of these steps leaves one final file
        that nothing reads, which the next run names and leaves alone.
        """
        out, folder = self.out, self.out.parent
        replaced = [(p, _lstat(p)) for p in _own_data_files(out, self.inputs)]
        record: dict = {
            "model": out.name,
            "replaced": [[p.name, st.st_dev, st.st_ino, st.st_size] for p, st in replaced if st],
            "data": "",
        }
        for target in _free_data_names(out) if self.tmp_data is not None else [None]:
            if target is not None:
                assert self.header is not None and self.tmp_data is not None
                data = self.tmp_data.stat()
                record.update(data=target.name, data_id=[data.st_dev, data.st_ino, data.st_size])
                header = onnx.ModelProto()
                header.CopyFrom(self.header)
                _relocate(header, self.tmp_data.name, target.name)
                try:
                    onnx.save(header, str(self.tmp_model))
                    writer.sync(self.tmp_model)
                except OSError as exc:
                    raise OutputError(f"{out}: write failed ({exc.strerror or exc})") from None
            st = self.tmp_model.stat()
            record["model_id"] = [st.st_dev, st.st_ino]
            if self.claimed is None:
                self.claimed = writer.claim(folder, record)
            else:
                writer.write_claim(self.claimed, record)
            if target is None:
                break
            try:
                if writer.link_new(self.tmp_data, target):
                    self.data_path = target
                    break
            except OSError as exc:
                raise OutputError(f"{target}: cannot be written ({exc.strerror or exc})") from None
        else:
            raise OutputError(f"{out}: no free name for its data file beside it")
        _fault("data placed")
        _fault("committing")
        writer.commit(self.tmp_model, out, force=self.force, sync=False)
        self.data_path = None  # in place: now the output's, not ours to remove
        _fault("committed")
        for path, before in replaced:
            now = _lstat(path)
            if before and now and (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
                writer.discard([path])
        writer.sync_folder(folder)
        _fault("cleaned")
        return out

    def discard(self) -> None:
        leftovers = (self.tmp_model, self.tmp_data, self.data_path, self.claimed)
        writer.discard(p for p in leftovers if p is not None and os.path.lexists(p))


def _left_by_commit(model: Path, file: Path) -> bool:
    """Could a commit of `model` have left `file` behind: named like its data files and not
    read by the model there now? (What a claim names is told to the user only if so.)"""
    return file.name in set(data_file_names(model)) and file not in model_files(model)[1:]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _free_data_names(out: Path) -> Iterator[Path]:
    """The output's data file names (`data_file_names`) that nothing has now."""
    for name in data_file_names(out):
        target = out.parent / name
        if not os.path.lexists(target):
            yield target


def sparse_layout(
    model: ir.Model, sparse: bool | sparse_storage.Layout | None = None
) -> sparse_storage.Layout | None:
    """Which initializers a save writes sparse: None for none. `sparse=None` keeps the input's
    form (sparse where the input had sparse initializers and its IR version allows them)."""
    if isinstance(sparse, sparse_storage.Layout):
        return sparse
    if sparse is None:
        sparse = bool(model.meta.get(sparse_storage.SPARSE_KEY))
        if (model.ir_version or 0) < sparse_storage.MIN_IR_VERSION:
            return None
    if not sparse:
        return None
    sparse_storage.check_possible(model)
    return sparse_storage.plan(model)


# The steps of a save, in order, where tests inject a failure or a kill (see `_fault`).
SAVE_STEPS = ("written", "checked", "data placed", "committing", "committed", "cleaned")


def _fault(step: str) -> None:
    """A point of the save where tests inject a failure or a kill; does nothing otherwise."""


def _relocate(header: onnx.ModelProto, old: str, new: str) -> None:
    """Point the header's external tensors from the temporary data file at the final one."""
    for tensor in sparse_storage.proto_tensors(header):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new


def _keep_value_info_as_loaded(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Drop the value_info onnx-ir adds for initializers, so the output's matches the input's."""
    original = model.meta.get(VALUE_INFO_KEY)
    if original is None:
        return
    initializers = set(model.graph.initializers)
    kept = [
        vi for vi in proto.graph.value_info if vi.name in original or vi.name not in initializers
    ]
    if len(kept) != len(proto.graph.value_info):
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)


def _write_external(
    model: ir.Model, data_path: Path, layout: sparse_storage.Layout | None = None
) -> onnx.ModelProto:
    """Write the initializers into `data_path`; return the model's header referring to them.

    A sparse initializer (`layout`) puts its values and its indices in the data file as two
    tensors of their own, or both in the header where together they are no bigger than an
    inline tensor. The model object is left as it was: its initializers point at their sources
    again after.
    """
    data_name = data_path.name
    values = [
        v for g in all_graphs(model) for v in g.initializers.values() if v.const_value is not None
    ]
    forms = layout.forms if layout is not None else {}
    parts = {
        id(v): sparse_storage.Parts(v.const_value, v.name, forms[v.name])
        for v in model.graph.initializers.values()
        if v.name in forms and v.const_value is not None
    }
    dense = [v for v in values if id(v) not in parts]
    external = [v for v in dense if datafile.goes_external(v.const_value)]
    streams: dict[str, list[ir.Value]] = {}  # the parts of each sparse tensor in the data file
    for part in parts.values():
        if part.values_nbytes + part.indices_nbytes > datafile.INLINE_MAX_BYTES:
            streams[part.name] = [ir.Value(name=t.name, const_value=t) for t in part.as_tensors()]
    if not external and not streams:  # the layout is kept: a model read from a data file keeps one
        external = [v for v in dense if v.const_value.dtype != ir.DataType.STRING][:1]
        if not external and parts:
            part = next(iter(parts.values()))
            streams[part.name] = [ir.Value(name=t.name, const_value=t) for t in part.as_tensors()]
    placed = {id(v) for v in external}
    placements = datafile.layout([*external, *(v for pair in streams.values() for v in pair)])
    datafile.write_data_file(data_path, placements)
    where = {id(p.value): p for p in placements}
    originals = [v.const_value for v in values]
    placeholder = ir.Tensor(np.zeros(0, dtype=np.float32))
    try:
        for p in placements:
            if id(p.value) not in placed:
                continue
            tensor = p.value.const_value
            p.value.const_value = ir.ExternalTensor(
                data_name,
                p.offset,
                p.length,
                tensor.dtype,
                shape=tensor.shape,
                name=tensor.name or p.value.name,
                base_dir=data_path.parent,
            )
        for v in values:
            if id(v) in parts:  # written as a sparse initializer below
                v.const_value = placeholder
            elif id(v) not in placed and isinstance(v.const_value, ir.ExternalTensor):
                # a small tensor from the input's data file goes inline
                v.const_value = ir.Tensor(v.const_value.numpy(), name=v.const_value.name)
        header = ir.serde.serialize_model(model)
    finally:
        for v, tensor in zip(values, originals, strict=True):
            v.const_value = tensor
    _keep_value_info_as_loaded(header, model)
    if parts:
        graph = header.graph
        names = {part.name for part in parts.values()}
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in names:
                del graph.initializer[i]
        for part in parts.values():
            entry = graph.sparse_initializer.add(dims=part.tensor.shape.numpy())
            entry.values.CopyFrom(part.values_head())
            entry.indices.CopyFrom(part.indices_head())
            if part.name in streams:
                for proto, value in zip(
                    (entry.values, entry.indices), streams[part.name], strict=True
                ):
                    placement = where[id(value)]
                    for key, text in (
                        ("location", data_name),
                        ("offset", str(placement.offset)),
                        ("length", str(placement.length)),
                    ):
                        proto.external_data.add(key=key, value=text)
                    proto.data_location = onnx.TensorProto.EXTERNAL
            else:
                entry.values.raw_data = b"".join(c.view(np.uint8).tobytes() for c in part.values())
                entry.indices.raw_data = b"".join(c.tobytes() for c in part.indices())
    return header


def _write_inline(model: ir.Model, path: Path, layout: sparse_storage.Layout | None = None) -> None:
    """Write a single-file model one initializer at a time instead of as one big message.

    Protobuf merges a message field that occurs several times and appends repeated fields, so a
    ModelProto without initializers followed by one small ModelProto per initializer (or sparse
    initializer, `layout`) parses as the whole model. Peak memory is then one tensor, not a
    second copy of the model (plus a third for the serialised bytes) as with a plain
    serialise-and-write.
    """
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    tensors = [v.const_value for v in values]
    forms = layout.forms if layout is not None else {}
    placeholder = ir.Tensor(np.zeros(0, dtype=np.float32))
    try:
        for v in values:
            v.const_value = placeholder
        header = ir.serde.serialize_model(model)
    finally:
        for v, t in zip(values, tensors, strict=True):
            v.const_value = t
    del header.graph.initializer[:]
    _keep_value_info_as_loaded(header, model)
    with open(path, "wb") as f:
        f.write(header.SerializeToString())
        del header
        for v, tensor in zip(values, tensors, strict=True):
            form = forms.get(v.name)
            if form is None:
                wire.write_initializer(f, tensor, v.name)
            else:
                sparse_storage.Parts(tensor, v.name, form).write(f)


def check_model_file(path: str | os.PathLike) -> None:
    """onnx.checker with full shape inference, without loading the weights into memory.

    A model with external data is checked by path (which also works over 2 GB). A single-file
    model is checked as a skeleton whose weights are described as external data inside the file
    itself, after checking that each payload has exactly the bytes its shape and type need.
    Sparse initializers are checked one by one (`sparse.check_written`), and the graph as a
    skeleton with each of them a graph input of its dense type and shape.
    """
    path = Path(path)
    proto, payloads, mapped = wire.load_mapped(str(path), as_external=True)
    try:
        sparse = sparse_storage.check_written(proto, path, _check_external_tensor)
        external = any(
            t.data_location == onnx.TensorProto.EXTERNAL and t.name not in payloads
            for t in proto.graph.initializer
        )
        if external and not sparse:
            onnx.checker.check_model(str(path), full_check=True)
            return
        for tensor in proto.graph.initializer:
            if tensor.name in payloads:
                dtype = ir.DataType(tensor.data_type)
                expected = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
                if payloads[tensor.name][1] != expected:
                    raise onnx.checker.ValidationError(
                        f"tensor {tensor.name!r} holds {payloads[tensor.name][1]} bytes, "
                        f"its shape and type need {expected}"
                    )
        # the checker resolves external data relative to the checked file: put it beside the model
        skeleton = writer.temp_file(path.parent, "check")
        try:
            try:
                onnx.save(proto, str(skeleton))
            except OSError as exc:
                raise OutputError(
                    f"{path.parent}: no room to check the model ({exc.strerror or exc})"
                ) from None
            onnx.checker.check_model(str(skeleton), full_check=True)
        finally:
            skeleton.unlink(missing_ok=True)
    finally:
        mapped.close()
