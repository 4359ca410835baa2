"""Where cold experts live: host RAM (pinned when the device is CUDA) and disk.

disk store (checkpoint shards, or a store converted once into store_dir) -> host tier (RAM,
bounded by host_budget, LRU) -> borrowed host tensors -> copied into a device slot by the loader.

Every expert is a dict {fused parameter name: tensor of its per-expert shape}, e.g. for Mixtral
{"gate_up_proj": [2I, H], "down_proj": [H, I]}, in the runtime dtype.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .adapters import MoEAdapter, MoEBlock
from .atomic import staging_directory
from .checkpoint import CheckpointDir
from .safetensors_file import CheckpointError, SafetensorsFile

ExpertTensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def allocate_expert(shapes: Shapes, dtype: torch.dtype, *, pin: bool) -> ExpertTensors:
    """Empty host tensors for one expert."""
    return {name: torch.empty(shape, dtype=dtype, pin_memory=pin) for name, shape in shapes.items()}


def expert_nbytes(shapes: Shapes, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for shape in shapes.values():
        count = 1
        for size in shape:
            count *= size
        total += count * element
    return total


class DiskStore(ABC):
    """Experts on disk, read one at a time into caller-provided host tensors."""

    @abstractmethod
    def read_into(self, layer: int, expert: int, out: ExpertTensors) -> None:
        """Fill `out` (contiguous CPU tensors of the runtime dtype) with the expert's weights."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class CheckpointStore(DiskStore):
    """Experts read straight from a transformers checkpoint's safetensors files, by tensor name.

    Per-expert families concatenate parts (gate rows, then up rows) directly into the output;
    GPT-OSS reads row `e` of each fused tensor. A dtype other than the stored one is converted
    through a staging tensor.
    """

    def __init__(self, checkpoint: CheckpointDir, adapter: MoEAdapter, blocks: list[MoEBlock]):
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.blocks = blocks
        missing = [
            part.name
            for block in blocks
            for expert in range(block.num_experts)
            for parts in adapter.checkpoint_parts(block, expert).values()
            for part in parts
            if part.name not in checkpoint
        ]
        if missing:
            if any(name.endswith("_blocks") for name in checkpoint.keys()):
                raise CheckpointError(f"{checkpoint.path}: MXFP4-quantised experts are not supported; dequantise the checkpoint first")
            raise CheckpointError(f"{checkpoint.path}: expert tensors not found in the checkpoint, e.g. {missing[0]!r}")

    def read_into(self, layer: int, expert: int, out: ExpertTensors) -> None:
        for name, parts in self.adapter.checkpoint_parts(self.blocks[layer], expert).items():
            target = out[name]
            row = 0
            for part in parts:
                entry = self.checkpoint.entry(part.name)
                shape = entry.shape if part.index is None else entry.shape[1:]
                rows = shape[0]
                piece = target[row : row + rows]
                if entry.dtype == target.dtype:
                    self.checkpoint.read_into(part.name, piece, part.index)
                else:
                    piece.copy_(self.checkpoint.read(part.name, part.index))
                row += rows
            if row != target.shape[0]:
                raise CheckpointError(f"{self.checkpoint.path}: expert ({layer}, {expert}) {name} has {row} rows, expected {target.shape[0]}")


class ConvertedStore(DiskStore):
    """Our own store: one safetensors file per MoE layer, an expert's tensors adjacent on disk.

    Written once (into a temporary folder renamed into place) and reused when its manifest
    matches the model's shape and dtype.
    """

    MANIFEST = "manifest.json"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = self.directory / self.MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{self.directory} holds no expert store ({self.MANIFEST} missing)")
        self.manifest = json.loads(manifest.read_text())
        self.files = [SafetensorsFile(self.directory / name) for name in self.manifest["files"]]

    @staticmethod
    def tensor_name(expert: int, name: str) -> str:
        return f"e{expert:05d}.{name}"

    def read_into(self, layer: int, expert: int, out: ExpertTensors) -> None:
        for name, target in out.items():
            self.files[layer].read_into(self.tensor_name(expert, name), target)

    def close(self) -> None:
        for file in self.files:
            file.close()

    @classmethod
    def matches(cls, directory: Path, description: dict) -> bool:
        manifest = directory / cls.MANIFEST
        if not manifest.is_file():
            return False
        try:
            return json.loads(manifest.read_text()).get("description") == description
        except json.JSONDecodeError:
            return False

    @classmethod
    def write(cls, directory: str | os.PathLike, shapes: Shapes, dtype: torch.dtype, layers: int, experts: int, read) -> ConvertedStore:
        """Write a store of `layers` x `experts` experts; `read(layer, expert)` gives each one.

        An existing store whose manifest describes the same shapes, dtype and counts is reused.

        Files go to a temporary folder next to `directory` and are renamed into place at the end,
        so an interrupted conversion leaves nothing half-written.
        """
        directory = Path(directory)
        description = {"shapes": {k: list(v) for k, v in shapes.items()}, "dtype": str(dtype), "layers": layers, "experts": experts}
        if cls.matches(directory, description):
            return cls(directory)
        with staging_directory(directory) as staging:
            files = []
            for layer in tqdm(range(layers), desc="writing expert store", unit="layer", disable=layers < 4):
                tensors = {}
                for expert in range(experts):
                    for name, tensor in read(layer, expert).items():
                        tensors[cls.tensor_name(expert, name)] = tensor.contiguous()
                files.append(f"layer-{layer:03d}.safetensors")
                save_file(tensors, staging / files[-1])
            (staging / cls.MANIFEST).write_text(json.dumps({"description": description, "files": files}, indent=1))
        return cls(directory)


class ExpertSource(ABC):
    """Host-side access to every expert: borrow its host tensors for the time of one copy."""

    shapes: Shapes
    dtype: torch.dtype

    @abstractmethod
    def borrow(self, layer: int, expert: int) -> contextlib.AbstractContextManager[ExpertTensors]:
        """Host tensors of the expert, valid until the context exits."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class RamSource(ExpertSource):
    """All experts in host RAM: the fused parameters of the model itself (pinned on CUDA)."""

    def __init__(self, fused: list[dict[str, torch.Tensor]]):
        self.fused = fused  # per layer: {name: [E, ...] CPU tensor}
        first = fused[0]
        self.shapes = {name: tuple(t.shape[1:]) for name, t in first.items()}
        self.dtype = next(iter(first.values())).dtype

    @contextlib.contextmanager
    def borrow(self, layer: int, expert: int) -> Iterator[ExpertTensors]:
        yield {name: tensor[expert] for name, tensor in self.fused[layer].items()}


class HostTier(ExpertSource):
    """A bounded RAM cache of experts in front of a disk store (LRU; thread-safe).

    Host buffers are recycled: an evicted entry's tensors receive the next expert read, so
    pinned memory is allocated once. A borrowed entry is never evicted while borrowed. When
    every entry is borrowed (or the capacity holds none), a read goes to a temporary buffer.
    """

    def __init__(self, disk: DiskStore, shapes: Shapes, dtype: torch.dtype, capacity_bytes: int, *, pin: bool):
        self.disk = disk
        self.shapes = shapes
        self.dtype = dtype
        self.pin = pin
        self.capacity = max(0, capacity_bytes // expert_nbytes(shapes, dtype))
        self._entries: OrderedDict[tuple[int, int], ExpertTensors] = OrderedDict()
        self._borrowed: dict[tuple[int, int], int] = {}
        self._reading: dict[tuple[int, int], threading.Event] = {}
        self._spare: list[ExpertTensors] = []
        self._lock = threading.Lock()
        self.disk_reads = 0

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def borrow(self, layer: int, expert: int) -> Iterator[ExpertTensors]:
        key = (layer, expert)
        tensors, retained = self._acquire(key)
        try:
            yield tensors
        finally:
            with self._lock:
                if retained:
                    self._borrowed[key] -= 1
                    if not self._borrowed[key]:
                        del self._borrowed[key]
                else:
                    self._spare.append(tensors)

    def _acquire(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        while True:
            with self._lock:
                pending = self._reading.get(key)  # checked first: a retained entry fills while listed
                if pending is None and key in self._entries:
                    self._entries.move_to_end(key)
                    self._borrowed[key] = self._borrowed.get(key, 0) + 1
                    return self._entries[key], True
                if pending is None:
                    self._reading[key] = threading.Event()
                    buffers, retained = self._buffers_for(key)
                    break
            pending.wait()  # another thread is reading this expert: use its result
        try:
            self.disk.read_into(*key, buffers)
        except BaseException:
            with self._lock:
                if retained:
                    del self._entries[key]
                    self._borrowed.pop(key, None)
                self._spare.append(buffers)
                self._reading.pop(key).set()
            raise
        with self._lock:
            self.disk_reads += 1
            self._reading.pop(key).set()
        return buffers, retained

    def _buffers_for(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        """Buffers for a new entry (called under the lock); retained=False means temporary."""
        if len(self._entries) >= self.capacity:
            victim = next((k for k in self._entries if k not in self._borrowed), None)
            if victim is not None:
                self._spare.append(self._entries.pop(victim))
        retained = len(self._entries) < self.capacity
        buffers = self._spare.pop() if self._spare else allocate_expert(self.shapes, self.dtype, pin=self.pin)
        if retained:
            self._entries[key] = buffers
            self._borrowed[key] = 1
        return buffers, retained

    def close(self) -> None:
        self.disk.close()
