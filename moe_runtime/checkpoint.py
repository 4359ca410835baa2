"""A local HuggingFace checkpoint directory: config, shards, and a parameter-less model skeleton.

directory -> config.json + (model.safetensors | model.safetensors.index.json -> shards)
          -> tensor name -> (shard, entry) -> reads of whole tensors or single expert rows.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .safetensors_file import CheckpointError, SafetensorsFile, TensorEntry

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointDir:
    """The safetensors shards of a model directory, opened and validated up front."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no model folder at {self.path} (no such folder); pass the folder that holds config.json and the safetensors files")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} is not a model directory: it has no config.json")
        self.files = [SafetensorsFile(shard) for shard in self._shard_paths()]
        self._file_of: dict[str, SafetensorsFile] = {}
        for file in self.files:
            for name in file.keys():
                self._file_of[name] = file

    def _shard_paths(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index}: corrupt shard index ({error})") from None
            shards = sorted(set(weight_map.values()))
            missing = [name for name in shards if not (self.path / name).is_file()]
            if missing:
                raise CheckpointError(f"{self.path}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
            return [self.path / name for name in shards]
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        raise CheckpointError(f"{self.path} holds no {SINGLE_FILE} and no {INDEX_FILE}: only safetensors checkpoints are read")

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path, local_files_only=True)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def keys(self):
        return self._file_of.keys()

    def entry(self, name: str) -> TensorEntry:
        return self.file_of(name).entries[name]

    def file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: the checkpoint has no tensor {name!r}") from None

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        return self.file_of(name).read(name, row)

    def read_into(self, name: str, out: torch.Tensor, row: int | None = None) -> torch.Tensor:
        return self.file_of(name).read_into(name, out, row)

    def storage_dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in."""
        counts: dict[torch.dtype, int] = {}
        for file in self.files:
            for entry in file.entries.values():
                if entry.dtype.is_floating_point:
                    counts[entry.dtype] = counts.get(entry.dtype, 0) + (entry.end - entry.begin)
        if not counts:
            raise CheckpointError(f"{self.path}: no floating-point tensor in the checkpoint")
        return max(counts, key=counts.get)

    def close(self) -> None:
        for file in self.files:
            file.close()


@contextlib.contextmanager
def parameters_on_meta():
    """Create module parameters on the meta device (no memory) while buffers stay real.

    Buffers such as rotary `inv_freq` are computed in __init__ and are not in checkpoints, so
    they must be materialised; parameters are loaded afterwards or never (experts).
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every parameter on the meta device, in eval mode."""
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
