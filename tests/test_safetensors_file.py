"""Checkpoint reading: truncated, corrupt and missing files fail at open, naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moe_runtime.checkpoint import CheckpointDir
from moe_runtime.safetensors_file import CheckpointError, SafetensorsFile


def test_reads_whole_tensors_and_rows(tmp_path):
    fused = torch.arange(5 * 3 * 4, dtype=torch.float32).reshape(5, 3, 4)
    save_file({"fused": fused, "half": fused.to(torch.bfloat16)}, tmp_path / "a.safetensors")
    file = SafetensorsFile(tmp_path / "a.safetensors")
    assert torch.equal(file.read("fused"), fused)
    assert torch.equal(file.read("fused", row=3), fused[3])
    assert torch.equal(file.read("half", row=4), fused[4].to(torch.bfloat16))
    with pytest.raises(IndexError):
        file.read("fused", row=5)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{path}: truncated safetensors file"):
        SafetensorsFile(path)


def test_corrupt_header_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsFile(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(path)


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    copy = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["olmoe"], copy)
    names = list(CheckpointDir(copy).keys())
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: "model-0000%d-of-00002.safetensors" % (1 + i % 2) for i, n in enumerate(names)}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        CheckpointDir(copy)
