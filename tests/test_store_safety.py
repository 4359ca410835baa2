"""A user's folders are never deleted or overwritten, and a killed store conversion is never trusted.

Real conversions of a real checkpoint into a real store on disk; the kills are real SIGKILLs,
sent by the converting process to itself at chosen points (after the k-th layer file, or in
the middle of swapping an older store out), so each point is hit every time.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe_runtime
from moe_runtime.atomic import OWNER_MARK, check_replaceable, write_atomically
from moe_runtime.cli.main import main
from moe_runtime.errors import OutputPathError
from moe_runtime.tiny_models import tiny_model

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch
    import moe_runtime
    from moe_runtime import disk_store

    checkpoint, store_dir, point, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}

    def kill_after(function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    if point == "layer-file":
        disk_store.save_file = kill_after(safetensors.torch.save_file)
    elif point == "swap":
        import moe_runtime.atomic as atomic
        atomic.os.replace = kill_after(os.replace)
    moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", host_budget=0, store_dir=store_dir, dtype=DTYPE)
    print("finished")
    """
)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def convert_and_kill(checkpoint: Path, store_dir: Path, point: str, count: int, dtype: str) -> subprocess.CompletedProcess:
    script = KILLER.replace("DTYPE", f"__import__('torch').{dtype}")
    return subprocess.run([sys.executable, "-c", script, str(checkpoint), str(store_dir), point, str(count)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "checkpoint"
    tiny_model("olmoe").save_pretrained(path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "count", "old_store"),
    [
        ("layer-file", 1, False),  # killed after the first layer file of the staging folder
        ("layer-file", 3, False),  # every layer file written, no manifest yet
        ("layer-file", 2, True),  # an older store of ours is in place and must survive
        ("swap", 1, True),  # the old store moved aside, the new one not yet in place
    ],
)
def test_a_killed_conversion_leaves_user_files_and_is_never_trusted(checkpoint, tmp_path, point, count, old_store):
    user_files = tmp_path / "notes.txt"
    user_files.write_text("the user's own file beside the store")
    store_dir = tmp_path / "store"
    if old_store:  # a float64 store of ours, replaced by a float32 conversion
        assert "finished" in convert_and_kill(checkpoint, store_dir, "none", 0, "float64").stdout
    before = {"checkpoint": tree_digest(checkpoint), "store": tree_digest(store_dir) if old_store else None}

    killed = convert_and_kill(checkpoint, store_dir, point, count, "float32")
    assert killed.returncode == -9, killed.stderr  # really killed at that point

    assert user_files.read_text() == "the user's own file beside the store"
    assert tree_digest(checkpoint) == before["checkpoint"]
    if point == "swap":
        assert not store_dir.exists()  # killed between the two renames: nothing at store_dir, never half a store
    elif old_store:  # whatever is at store_dir is a complete store: the old one, untouched
        assert tree_digest(store_dir) == before["store"]
    else:
        assert not store_dir.exists()
    model = moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", host_budget=0, store_dir=store_dir, dtype=torch.float32)
    reference = tiny_model("olmoe").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(logits(model, ids), logits(reference, ids))
    moe_runtime.unwrap(model)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".store.")]
    assert leftovers == [], f"the killed run's staging folders were not cleaned up: {leftovers}"


def test_a_folder_holding_user_files_is_refused_and_kept(checkpoint, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match=f"{folder} holds files that moe-runtime did not write"):
        moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", store_dir=folder)
    assert (folder / "thesis.tex").read_text() == "years of work" and len(list(folder.iterdir())) == 1


@pytest.mark.parametrize("which", ["working folder", "home", "checkpoint", "parent of the checkpoint"])
def test_folders_that_hold_what_we_must_not_replace_are_refused(checkpoint, tmp_path, monkeypatch, which):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / OWNER_MARK).write_text("{}")  # even a folder marked as ours
    target = {"working folder": Path("."), "home": tmp_path / "home", "checkpoint": checkpoint, "parent of the checkpoint": checkpoint.parent}[which]
    before = tree_digest(checkpoint)
    with pytest.raises(OutputPathError, match="name a new folder"):
        check_replaceable(target, "store_dir", protected=[checkpoint])
    with pytest.raises(OutputPathError):
        moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", store_dir=target)
    assert tree_digest(checkpoint) == before


def test_generate_refuses_a_store_dir_of_user_files_with_exit_2(checkpoint, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2,3")
    code = main(["generate", str(checkpoint), "--budget", "0.5", "--prompt", "hi", "--store-dir", str(folder)])
    assert code == 2
    assert "holds files that moe-runtime did not write" in capsys.readouterr().err
    assert (folder / "data.csv").read_text() == "1,2,3"


def test_an_empty_folder_and_a_store_of_ours_are_used(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", host_budget=0, store_dir=empty)
    assert (empty / OWNER_MARK).is_file() and (empty / "manifest.json").is_file()
    moe_runtime.unwrap(model)
    written = tree_digest(empty)
    model = moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", host_budget=0, store_dir=empty)  # reused as it is
    moe_runtime.unwrap(model)
    assert tree_digest(empty) == written


def test_a_file_written_atomically_is_whole_or_absent(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail_halfway(handle):
        handle.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_damaged_embedded_model_cache_is_rebuilt(tmp_path, monkeypatch):
    from moe_runtime.checkpoint import CheckpointDir
    from moe_runtime.embedded import embedded_model_dir

    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path / "cache"))
    folder = embedded_model_dir()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that filled up mid-write
    assert embedded_model_dir() == folder
    CheckpointDir(folder).close()  # whole again: opens with every tensor in the file
    (folder / "config.json").write_text("{ not json")
    embedded_model_dir()
    assert (folder / "config.json").read_text().startswith("{\n")
