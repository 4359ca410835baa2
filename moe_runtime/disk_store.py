"""Where cold experts live on disk: the checkpoint's own safetensors shards, or a store converted
once into `store_dir` (one file per MoE layer, an expert's tensors adjacent, in a placement plan's
disk order). Experts back to back on disk are read together, one positional read per run.
"""

from __future__ import annotations

import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .adapters import MoEAdapter, MoEBlock
from .atomic import staging_directory
from .checkpoint import CheckpointDir
from .expert_format import ExpertSpec
from .expert_tensors import ExpertTensors
from .safetensors_file import CheckpointError, SafetensorsFile


class DiskStore(ABC):
    """Experts on disk, read one at a time into caller-provided host tensors."""

    @abstractmethod
    def read_into(self, layer: int, expert: int, out: ExpertTensors) -> None:
        """Fill `out` (contiguous CPU tensors of the expert's stored specs) with its weights."""

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
    matches the model's shape, dtype, order and expert format (a quantized store holds the
    packed tensors of expert_format.py; one of another format is rebuilt, never misread). A
    quantized expert mixes dtypes, and safetensors groups a file's tensors by dtype before name,
    so a quantized store keeps every tensor as raw bytes (uint8): an expert stays one run.
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
        self.as_bytes = "format" in self.manifest["description"]

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
        target_of = {
            self.tensor_name(place[expert], name): as_bytes(target) if self.as_bytes else target
            for expert, out in zip(experts, outs) for name, target in out.items()
        }
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
        cls, directory: str | os.PathLike, spec: ExpertSpec, layers: int, experts: int, read, *, order=None,
        protected: Sequence[str | os.PathLike] = (),
    ) -> ConvertedStore:
        """Write a store of `layers` x `experts` experts; `read(layer, expert)` gives each one in
        the model's dtype and layout, and the store holds it in `spec`'s format.

        order: [layers][experts] expert ids in file order per layer (default: id order).
        protected: folders the store must never replace (the checkpoint it is converted from).
        An existing store whose manifest describes the same shapes, dtype, counts and order is
        reused. Files go to a temporary folder next to `directory` and are renamed into place at
        the end, so an interrupted conversion leaves nothing half-written; a folder that is not
        a store of ours is refused before anything is written (see atomic.check_replaceable).
        """
        directory = Path(directory)
        order = _checked_order(order, layers, experts)
        description = {
            "shapes": {k: list(v) for k, v in spec.shapes.items()}, "dtype": str(spec.dtype), "layers": layers, "experts": experts,
            "order": order, **spec.describe(),
        }
        if cls.matches(directory, description):
            with contextlib.suppress(CheckpointError):  # a damaged store of ours is rebuilt
                return cls(directory)
        with staging_directory(directory, "store_dir", protected=protected, legacy=cls.is_store) as staging:
            files = []
            for layer in tqdm(range(layers), desc="writing expert store", unit="layer", disable=layers < 4):
                tensors = {}
                for place, expert in enumerate(order[layer]):
                    for name, tensor in spec.encode(read(layer, expert)).items():
                        tensors[cls.tensor_name(place, name)] = as_bytes(tensor.contiguous()) if spec.format.quantized else tensor.contiguous()
                files.append(f"layer-{layer:03d}.safetensors")
                save_file(tensors, staging / files[-1])
            (staging / cls.MANIFEST).write_text(json.dumps({"description": description, "files": files}, indent=1))
        return cls(directory)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view: reads into it fill the tensor)."""
    return tensor.reshape(-1).view(torch.uint8)


def _checked_order(order, layers: int, experts: int) -> list[list[int]]:
    """The file order as lists of ints, refusing anything but a permutation per layer."""
    if order is None:
        return [list(range(experts)) for _ in range(layers)]
    order = [[int(expert) for expert in row] for row in order]
    if len(order) != layers or any(sorted(row) != list(range(experts)) for row in order):
        raise ValueError(f"a store order must list a permutation of the {experts} experts for each of {layers} layers")
    return order
