"""A wrapped model stays an honest nn.Module: saving and state_dict are complete; copying, pickling,
casting, moving and training refuse by name before anything changes; transformers' generation
features keep working."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer, pipeline

import moe_runtime
from moe_runtime.tiny_models import tiny_model

IDS = torch.tensor([[5, 17, 42, 9, 77, 3]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_pretrained_writes_every_expert_and_loads_in_plain_transformers(family, tiny_checkpoints, tmp_path):
    reference = tiny_model(family)
    model = moe_runtime.from_pretrained(tiny_checkpoints[family], budget=0.25, device="cpu", host_budget=0, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True).eval()
    torch.testing.assert_close(logits(reloaded), logits(reference))
    expected = reference.state_dict()
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    moe_runtime.unwrap(model)


def test_saving_refuses_a_folder_of_user_files_and_a_pruned_model(tmp_path):
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OSError, match="holds files that moe-runtime did not write"):
        model.save_pretrained(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    moe_runtime.unwrap(model)
    from moe_runtime.adapters import adapter_for
    from moe_runtime.pruning import PruningProfile

    plain = tiny_model("olmoe")
    blocks = adapter_for(plain).blocks(plain)
    profile = PruningProfile(task="t", num_experts=8, top_k=2, keep=[[0, 1, 2, 3]] * len(blocks), scores=[[0.0] * 8] * len(blocks))
    pruned = moe_runtime.wrap(plain, budget=0.5, device="cpu", profile=profile)
    with pytest.raises(ValueError, match="pruning profile, which a saved checkpoint cannot hold"):
        pruned.save_pretrained(tmp_path / "pruned")
    moe_runtime.unwrap(pruned)


def test_copy_pickle_cast_move_and_train_refuse_by_name_and_change_nothing():
    reference = tiny_model("mixtral")
    model = moe_runtime.wrap(tiny_model("mixtral"), budget=0.5, device="cpu")
    with pytest.raises(TypeError, match="copying a model with offloaded experts is not supported.*unwrap"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="pickling a model with offloaded experts"):
        pickle.dumps(model)
    for operation in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("meta")):
        with pytest.raises(TypeError, match="casting or moving a model with offloaded experts.*unwrap"):
            operation(model)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())  # nothing half-cast
    with pytest.raises(TypeError, match="training a model with offloaded experts"):
        model.train()
    assert not model.training
    model.to("cpu").to(torch.float32).eval()  # no change: allowed
    torch.testing.assert_close(logits(model), logits(reference))
    moe_runtime.unwrap(model)
    copy.deepcopy(model).to(torch.float16).train()  # all back to plain nn.Module behaviour
    assert "save_pretrained" not in model.__dict__ and "_apply" not in model.__dict__


@pytest.mark.slow
def test_transformers_generation_features_on_a_wrapped_model(family):
    reference = tiny_model(family)
    model = moe_runtime.wrap(tiny_model(family), budget=0.25, device="cpu")
    ids = torch.tensor([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, attention_mask=mask, **greedy), reference.generate(ids, attention_mask=mask, **greedy))
        beams = dict(max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS, **beams), reference.generate(IDS, **beams))
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
        assert sampled.shape == (2, 9)
        static = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
        assert torch.equal(model.generate(IDS, **static), reference.generate(IDS, **static))

    from moe_runtime.tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    streamer = TextIteratorStreamer(tokenizer)
    model.generate(tokenizer("hi there", return_tensors="pt")["input_ids"], streamer=streamer, **greedy)
    assert "".join(streamer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert generator("abc", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("abc")
    moe_runtime.unwrap(model)
