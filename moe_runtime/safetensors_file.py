"""Read single tensors (or rows of fused tensors) out of safetensors files on disk.

header (8-byte length + JSON: dtype, shape, data_offsets per tensor) -> byte range -> pread into
a preallocated tensor. No mapping of the whole file: a read costs exactly the expert's bytes,
goes straight into its destination (pinned host memory when the device is CUDA), and leaves
nothing resident in the process afterwards, so peak RSS stays bounded by the host tier.
The header is checked against the file size up front, so a truncated or corrupt file fails at
open with its name, never halfway through a forward.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(InvalidFileError):
    """A checkpoint file that is missing, truncated or corrupt; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row along dim 0 (one expert of a fused [E, ...] tensor)."""
        return (self.end - self.begin) // self.shape[0] if self.shape and self.shape[0] else 0


class SafetensorsFile:
    """One `.safetensors` file: its header, validated, and positional reads of tensors or rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata = _read_header(self.path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        # Benchmarks set this to emulate a file much larger than RAM: every read's pages are
        # dropped from the page cache afterwards, so the next read of them goes to the disk.
        self.uncached_reads = False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self):
        return self.entries.keys()

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read_into(self, name: str, out: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Read tensor `name` (or row `row` of it) into the contiguous CPU tensor `out`.

        `out` must have the stored dtype and the tensor's (row's) number of elements.
        """
        entry = self.entries[name]
        begin, end = entry.begin, entry.end
        if row is not None:
            if not 0 <= row < entry.shape[0]:
                raise IndexError(f"{self.path}: row {row} out of range for {name} of shape {entry.shape}")
            begin = entry.begin + row * entry.row_bytes
            end = begin + entry.row_bytes
        if out.dtype != entry.dtype or not out.is_contiguous() or out.device.type != "cpu":
            raise AssertionError(f"read_into needs a contiguous CPU {entry.dtype} tensor, got {out.dtype} on {out.device}")
        size = end - begin
        if out.numel() * out.element_size() != size:
            raise AssertionError(f"{name}: destination holds {out.numel() * out.element_size()} bytes, tensor has {size}")
        _read_fully(self._descriptor(), [_bytes_of(out)], begin, f"{self.path}: unexpected end of file reading {name} (file truncated?)")
        self._after_read(begin, end)
        return out

    def _after_read(self, begin: int, end: int) -> None:
        if self.uncached_reads:
            self.drop_cached_pages(begin, end)

    def drop_cached_pages(self, begin: int = 0, end: int | None = None) -> None:
        """Ask the kernel to drop bytes [begin, end) of the file (default: all) from the page cache."""
        length = 0 if end is None else end - begin  # 0: to the end of the file
        os.posix_fadvise(self._descriptor(), begin, length, os.POSIX_FADV_DONTNEED)

    def read_span_into(self, names: list[str], outs: list[torch.Tensor]) -> None:
        """Read tensors that lie back to back in the file with one positional read (preadv).

        names: in file order, each tensor starting where the previous one ends; outs: their
        contiguous CPU destinations of the stored dtypes and sizes.
        """
        entries = [self.entries[name] for name in names]
        for previous, entry in zip(entries, entries[1:]):
            if entry.begin != previous.end:
                raise AssertionError(f"{self.path}: tensors {names} are not back to back in the file")
        for name, entry, out in zip(names, entries, outs):
            if out.dtype != entry.dtype or not out.is_contiguous() or out.numel() * out.element_size() != entry.end - entry.begin:
                raise AssertionError(f"{name}: destination does not match the stored {entry.dtype} tensor of {entry.end - entry.begin} bytes")
        views = [_bytes_of(out) for out in outs]
        _read_fully(self._descriptor(), views, entries[0].begin, f"{self.path}: unexpected end of file reading {names[0]}.. (file truncated?)")
        self._after_read(entries[0].begin, entries[-1].end)

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """A new CPU tensor holding tensor `name` (or its row `row`), in the stored dtype."""
        entry = self.entries[name]
        shape = entry.shape if row is None else entry.shape[1:]
        out = torch.empty(shape, dtype=entry.dtype)
        return self.read_into(name, out, row)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's storage as one flat byte buffer (len() counts bytes, slices are byte ranges)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def _read_fully(fd: int, views: list[memoryview], offset: int, short_read_message: str) -> None:
    """preadv into `views` until all are full (a read may return fewer bytes than asked)."""
    views = [view for view in views if len(view)]
    while views:
        count = os.preadv(fd, views, offset)
        if count <= 0:
            raise CheckpointError(short_read_message)
        offset += count
        while views and count >= len(views[0]):
            count -= len(views[0])
            views.pop(0)
        if views and count:
            views[0] = views[0][count:]


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({file_size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_HEADER_BYTES or 8 + header_size > file_size:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_size} bytes, file has {file_size})")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {info}") from None
        expected = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {dtype}")
        entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
    data_end = max((entry.end for entry in entries.values()), default=data_start)
    if data_end > file_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({file_size} bytes, its header needs {data_end}); "
            "copy the file again or re-save the checkpoint"
        )
    return entries, metadata


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
