"""Where cold experts live: host RAM (pinned when the device is CUDA) and disk.

disk store (checkpoint shards, or a store converted once into store_dir) -> host tier (RAM,
bounded by host_budget, LRU) -> borrowed host tensors -> copied into a device slot by the loader.
Experts that sit back to back on disk (a placement plan's disk layout) are read together, with
one positional read per contiguous run.

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
from collections.abc import Iterator, Sequence
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

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """`experts` grouped into runs that one read can fill (here: one expert per read)."""
        return [[expert] for expert in experts]

    def read_run(self, layer: int, experts: Sequence[int], outs: Sequence[ExpertTensors]) -> None:
        """Fill `outs` with a run of `experts` (one of `runs()`)."""
        for expert, out in zip(experts, outs):
            self.read_into(layer, expert, out)

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

    Experts sit in each layer's file in `order` (a placement plan's disk layout, or expert id
    order): tensor names begin with the expert's position, and safetensors writes tensors sorted
    by name, so experts that are read together are also next to each other on disk.

    Written once (into a temporary folder renamed into place) and reused when its manifest
    matches the model's shape, dtype and order.
    """

    MANIFEST = "manifest.json"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = self.directory / self.MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{self.directory} holds no expert store ({self.MANIFEST} missing)")
        self.manifest = json.loads(manifest.read_text())
        self.files = [SafetensorsFile(self.directory / name) for name in self.manifest["files"]]
        self.position = [{expert: place for place, expert in enumerate(order)} for order in self.manifest["description"]["order"]]

    @staticmethod
    def tensor_name(position: int, name: str) -> str:
        return f"p{position:05d}.{name}"

    def read_into(self, layer: int, expert: int, out: ExpertTensors) -> None:
        self.read_run(layer, [expert], [out])

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """`experts` in file order, split where the next one is not the adjacent expert on disk."""
        ordered = sorted(experts, key=self.position[layer].__getitem__)
        runs: list[list[int]] = []
        for expert in ordered:
            if runs and self.position[layer][expert] == self.position[layer][runs[-1][-1]] + 1:
                runs[-1].append(expert)
            else:
                runs.append([expert])
        return runs

    def read_run(self, layer: int, experts: Sequence[int], outs: Sequence[ExpertTensors]) -> None:
        """One preadv for experts adjacent on disk, in file order (see `runs`)."""
        file, place = self.files[layer], self.position[layer]
        target_of = {self.tensor_name(place[expert], name): target for expert, out in zip(experts, outs) for name, target in out.items()}
        names = sorted(target_of, key=lambda name: file.entries[name].begin)
        file.read_span_into(names, [target_of[name] for name in names])

    def close(self) -> None:
        for file in self.files:
            file.close()

    @classmethod
    def is_store(cls, directory: Path) -> bool:
        """Whether `directory` holds a store of ours, including one written before OWNER_MARK."""
        try:
            manifest = json.loads((directory / cls.MANIFEST).read_text())
            return isinstance(manifest["description"]["shapes"], dict) and isinstance(manifest["files"], list)
        except (OSError, ValueError, KeyError, TypeError):
            return False

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
    def write(
        cls, directory: str | os.PathLike, shapes: Shapes, dtype: torch.dtype, layers: int, experts: int, read, *, order=None,
        protected: Sequence[str | os.PathLike] = (),
    ) -> ConvertedStore:
        """Write a store of `layers` x `experts` experts; `read(layer, expert)` gives each one.

        order: [layers][experts] expert ids in file order per layer (default: id order).
        protected: folders the store must never replace (the checkpoint it is converted from).
        An existing store whose manifest describes the same shapes, dtype, counts and order is
        reused. Files go to a temporary folder next to `directory` and are renamed into place at
        the end, so an interrupted conversion leaves nothing half-written; a folder that is not
        a store of ours is refused before anything is written (see atomic.check_replaceable).
        """
        directory = Path(directory)
        order = _checked_order(order, layers, experts)
        description = {"shapes": {k: list(v) for k, v in shapes.items()}, "dtype": str(dtype), "layers": layers, "experts": experts, "order": order}
        if cls.matches(directory, description):
            with contextlib.suppress(CheckpointError):  # a damaged store of ours is rebuilt
                return cls(directory)
        with staging_directory(directory, "store_dir", protected=protected, legacy=cls.is_store) as staging:
            files = []
            for layer in tqdm(range(layers), desc="writing expert store", unit="layer", disable=layers < 4):
                tensors = {}
                for place, expert in enumerate(order[layer]):
                    for name, tensor in read(layer, expert).items():
                        tensors[cls.tensor_name(place, name)] = tensor.contiguous()
                files.append(f"layer-{layer:03d}.safetensors")
                save_file(tensors, staging / files[-1])
            (staging / cls.MANIFEST).write_text(json.dumps({"description": description, "files": files}, indent=1))
        return cls(directory)


def _checked_order(order, layers: int, experts: int) -> list[list[int]]:
    """The file order as lists of ints, refusing anything but a permutation per layer."""
    if order is None:
        return [list(range(experts)) for _ in range(layers)]
    order = [[int(expert) for expert in row] for row in order]
    if len(order) != layers or any(sorted(row) != list(range(experts)) for row in order):
        raise ValueError(f"a store order must list a permutation of the {experts} experts for each of {layers} layers")
    return order


class ExpertSource(ABC):
    """Host-side access to every expert: borrow its host tensors for the time of one copy."""

    shapes: Shapes
    dtype: torch.dtype

    @abstractmethod
    def borrow(self, layer: int, expert: int) -> contextlib.AbstractContextManager[ExpertTensors]:
        """Host tensors of the expert, valid until the context exits."""

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """`experts` grouped so that each group is best fetched together (`borrow_run`)."""
        return [[expert] for expert in experts]

    @contextlib.contextmanager
    def borrow_run(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertTensors]]:
        """Host tensors of a group of `runs()`, valid until the context exits."""
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(self.borrow(layer, expert)) for expert in experts]

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
    keep: the (layer, expert) pairs a placement plan holds in RAM; then exactly those stay once
    read, never evicted, and every other expert is read from disk into a temporary buffer.
    """

    def __init__(
        self, disk: DiskStore, shapes: Shapes, dtype: torch.dtype, capacity_bytes: int, *, pin: bool,
        keep: frozenset[tuple[int, int]] | None = None,
    ):
        self.disk = disk
        self.shapes = shapes
        self.dtype = dtype
        self.pin = pin
        self.capacity = max(0, capacity_bytes // expert_nbytes(shapes, dtype))
        if keep is not None and len(keep) > self.capacity:
            raise ValueError(f"the host tier holds {self.capacity} experts, fewer than the {len(keep)} it must keep")
        self.keep = keep
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
        with self.borrow_run(layer, [expert]) as (tensors,):
            yield tensors

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """Experts already in RAM alone; the others in the disk store's contiguous runs."""
        with self._lock:
            cold = [e for e in experts if (layer, e) not in self._entries and (layer, e) not in self._reading]
        return [[e] for e in experts if e not in cold] + self.disk.runs(layer, cold)

    @contextlib.contextmanager
    def borrow_run(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertTensors]]:
        """The experts from RAM, reading those not there with one disk read per run."""
        keys = [(layer, expert) for expert in experts]
        held = self._read_missing(keys)
        try:
            for key in keys:
                if key not in held:
                    held[key] = self._acquire(key)
            yield [held[key][0] for key in keys]
        finally:
            with self._lock:
                for key, (tensors, retained) in held.items():
                    self._give_back(key, tensors, retained)

    def _read_missing(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[ExpertTensors, bool]]:
        """Reserve buffers for the keys neither in RAM nor being read, and read them run by run."""
        with self._lock:
            missing = [key for key in keys if key not in self._entries and key not in self._reading]
            reserved = {key: self._reserve(key) for key in missing}
        held = {}
        try:
            for run in self.disk.runs(keys[0][0], [expert for _, expert in missing]):
                run_keys = [(keys[0][0], expert) for expert in run]
                run_reserved = {key: reserved.pop(key) for key in run_keys}
                self._fill(run_keys, run_reserved)  # abandons its keys itself if the read fails
                held.update(run_reserved)
        except BaseException:
            with self._lock:
                for key, (tensors, retained) in held.items():
                    self._give_back(key, tensors, retained)
                for key, buffers_retained in reserved.items():
                    self._abandon(key, *buffers_retained)
            raise
        return held

    def _acquire(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        while True:
            with self._lock:
                pending = self._reading.get(key)  # checked first: a retained entry fills while listed
                if pending is None and key in self._entries:
                    self._entries.move_to_end(key)
                    self._borrowed[key] = self._borrowed.get(key, 0) + 1
                    return self._entries[key], True
                if pending is None:
                    held = {key: self._reserve(key)}
                    break
            pending.wait()  # another thread is reading this expert: use its result
        self._fill([key], held)
        return held[key]

    def _reserve(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        """Buffers for a key about to be read (under the lock); others wait for the read."""
        self._reading[key] = threading.Event()
        return self._buffers_for(key)

    def _fill(self, keys: list[tuple[int, int]], held: dict) -> None:
        """Read reserved `keys` (one layer, a run on disk) and release their waiters."""
        try:
            self.disk.read_run(keys[0][0], [expert for _, expert in keys], [held[key][0] for key in keys])
        except BaseException:
            with self._lock:
                for key in keys:
                    self._abandon(key, *held.pop(key))
            raise
        with self._lock:
            self.disk_reads += len(keys)
            for key in keys:
                self._reading.pop(key).set()

    def _abandon(self, key: tuple[int, int], buffers: ExpertTensors, retained: bool) -> None:
        """Undo a reservation whose read failed or never ran (under the lock)."""
        if retained:
            del self._entries[key]
            self._borrowed.pop(key, None)
        self._spare.append(buffers)
        self._reading.pop(key).set()

    def _give_back(self, key: tuple[int, int], tensors: ExpertTensors, retained: bool) -> None:
        """End one borrow (under the lock): a retained entry becomes evictable when unborrowed."""
        if retained:
            self._borrowed[key] -= 1
            if not self._borrowed[key]:
                del self._borrowed[key]
        else:
            self._spare.append(tensors)

    def _buffers_for(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        """Buffers for a new entry (called under the lock); retained=False means temporary."""
        if self.keep is not None:
            retained = key in self.keep
        else:
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
