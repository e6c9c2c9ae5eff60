"""Write the external data file: every tensor at an aligned offset, streamed in large blocks.

The file is written front to back through a few staging blocks, each written on a helper thread
while the next one fills. Large files bypass the page cache (O_DIRECT): the bytes go from the
staging blocks to the device, so a model bigger than the page cache neither evicts everything
else nor stalls on writeback, and the write runs at the speed of the disk. Measured on the 8.4 GB
bench-large model (2-core VM): O_DIRECT blocks wrote the data file in about the time `dd
oflag=direct` takes (1.6-1.8 GB/s), where buffered writes of the same bytes took 13-17 s. Small
files, and filesystems that refuse O_DIRECT, get plain buffered writes of the same blocks.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import onnx_ir as ir

from onnxprune.core.tensors import tensor_chunks

# Tensors larger than ALIGN_THRESHOLD start at multiples of ALIGNMENT, so runtimes can
# memory-map them directly (65536 is also Windows' mapping granularity); smaller ones are
# packed at cache-line boundaries.
ALIGNMENT = 65536
ALIGN_THRESHOLD = 1 << 20
PACK_ALIGNMENT = 64
# Initializers of at most this many bytes stay inside the model file, as onnx-ir does.
INLINE_MAX_BYTES = 256
# Bytes per write, and how many blocks exist (one filling, the others being written).
BLOCK_BYTES = 8 << 20
BLOCKS = 3
# Data files at least this big are written with O_DIRECT; smaller ones gain from the page cache
# (they are often read again at once, by validation).
DIRECT_MIN_BYTES = 1 << 30
# O_DIRECT needs offsets, lengths and memory aligned to the device's block size; 4096 covers
# every common device (staging blocks come from mmap, so they are page-aligned).
DIRECT_ALIGN = 4096


@dataclass(frozen=True)
class Placement:
    """Where one initializer's bytes go in the data file."""

    value: ir.Value
    offset: int
    length: int


def goes_external(tensor: ir.TensorProtocol) -> bool:
    return tensor.dtype != ir.DataType.STRING and tensor.nbytes > INLINE_MAX_BYTES


def layout(values: Sequence[ir.Value]) -> list[Placement]:
    """Offsets of each value's tensor in file order: big ones aligned, small ones packed."""
    placements = []
    end = 0
    for value in values:
        assert value.const_value is not None
        length = value.const_value.nbytes
        align = ALIGNMENT if length > ALIGN_THRESHOLD else PACK_ALIGNMENT
        offset = -(-end // align) * align
        placements.append(Placement(value, offset, length))
        end = offset + length
    return placements


class BlockWriter:
    """A write-only stream into a new file, written in big blocks on a helper thread.

    `write` copies into the filling block; a full block is handed to the helper, and the writer
    moves on to the next free block. Errors of a background write surface at the next block
    change or at `close`.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o666)
                self.direct = True
            except OSError:  # e.g. EINVAL: the filesystem does not do direct I/O
                fd = -1
        self._fd = fd if fd >= 0 else os.open(path, flags, 0o666)
        self._blocks = [np.frombuffer(mmap.mmap(-1, BLOCK_BYTES), np.uint8) for _ in range(BLOCKS)]
        self._writes: list[Future[None] | None] = [None] * BLOCKS
        self._helper = ThreadPoolExecutor(max_workers=1)
        self._slot = 0  # the block being filled
        self._fill = 0  # bytes in it
        self._start = 0  # file offset of its first byte

    def tell(self) -> int:
        return self._start + self._fill

    def write(self, data: bytes | memoryview | np.ndarray) -> int:
        source = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        source = source.reshape(-1).view(np.uint8)
        done = 0
        while done < source.size:
            n = min(source.size - done, BLOCK_BYTES - self._fill)
            self._blocks[self._slot][self._fill : self._fill + n] = source[done : done + n]
            self._fill += n
            done += n
            if self._fill == BLOCK_BYTES:
                self._hand_over()
        return done

    def pad_to(self, offset: int) -> None:
        """Zeros up to `offset` (which is never behind the current position)."""
        gap = offset - self.tell()
        assert gap >= 0, "placements go forward"
        while gap:
            n = min(gap, BLOCK_BYTES - self._fill)
            self._blocks[self._slot][self._fill : self._fill + n] = 0
            self._fill += n
            gap -= n
            if self._fill == BLOCK_BYTES:
                self._hand_over()

    def _hand_over(self) -> None:
        length = self._fill
        if self.direct:  # the tail of the last block: whole device blocks, cut back in close()
            length = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
            self._blocks[self._slot][self._fill : length] = 0
        block = memoryview(self._blocks[self._slot])[:length]
        self._writes[self._slot] = self._helper.submit(self._write_block, block, self._start)
        self._start += self._fill
        self._slot = (self._slot + 1) % BLOCKS
        self._fill = 0
        pending = self._writes[self._slot]
        if pending is not None:  # the next block is free once its last write is done
            pending.result()
            self._writes[self._slot] = None

    def _write_block(self, block: memoryview, offset: int) -> None:
        """On the helper thread, in file order. A device that takes O_DIRECT at open but not
        these blocks (EINVAL) gets buffered writes from then on, on the same descriptor."""
        try:
            _write_all(self._fd, block, offset)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            fcntl.fcntl(
                self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT
            )
            self.direct = False
            _write_all(self._fd, block, offset)

    def close(self) -> None:
        """Write what is left, wait for every write, and cut the file to its exact length."""
        try:
            size = self.tell()
            if self._fill:
                self._hand_over()
            for pending in self._writes:
                if pending is not None:
                    pending.result()
            os.ftruncate(self._fd, size)
        finally:
            self._abandon()

    def _abandon(self) -> None:
        self._helper.shutdown(wait=True, cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._abandon()


def _write_all(fd: int, block: memoryview, offset: int) -> None:
    while block:
        written = os.pwrite(fd, block, offset)
        block, offset = block[written:], offset + written


def write_tensor(tensor: ir.TensorProtocol, writer: BlockWriter) -> None:
    """Stream one tensor's raw little-endian bytes into `writer`, a chunk at a time."""
    chunks = getattr(tensor, "chunks", None)  # tensors computed chunk by chunk (pruned weights)
    if chunks is not None:
        for chunk in chunks():
            writer.write(chunk)
    elif tensor.dtype.bitwidth % 8 == 0 and tensor.dtype != ir.DataType.STRING:
        for _, chunk in tensor_chunks(tensor):
            writer.write(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False))
    else:  # packed sub-byte types: their bytes are not one element each
        writer.write(tensor.tobytes())


def write_data_file(path: Path, placements: Sequence[Placement]) -> None:
    """Write every placed tensor into a new data file at `path`."""
    total = placements[-1].offset + placements[-1].length if placements else 0
    with BlockWriter(path, direct=total >= DIRECT_MIN_BYTES) as writer:
        for placement in placements:
            writer.pad_to(placement.offset)
            assert placement.value.const_value is not None
            write_tensor(placement.value.const_value, writer)
            written = writer.tell() - placement.offset
            if written != placement.length:
                raise OSError(
                    f"tensor {placement.value.name!r}: wrote {written} bytes, expected "
                    f"{placement.length}"
                )
