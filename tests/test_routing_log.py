"""Recording the routing a wrapped model serves (routing_log.py) and `generate --learn`.

The log is checked against the routers' own outputs (router hooks on a twin of the model, which
generates the same tokens op by op), on the op-by-op path and on the native decode path that
computes experts where they lie; a batch gives one sequence per row; a forward cut short by a
fault is left out whole and the runtime goes on; another thread's requests are not recorded;
and `generate --learn` grows its file run by run, starts each run from it, and refuses, before
the run and without touching it, a file it did not write or one of another model's routing.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime import routing_log
from moe_runtime.compute import NATIVE_LAYER
from moe_runtime.kernels import cpu_gemv
from moe_runtime.recording import RouterRecorder
from moe_runtime.routing_log import record_routing, remember_session
from moe_runtime.trace import load_trace
from test_cli import run_cli  # tests/test_cli.py
from test_decode_attention import PROMPT, _model  # tests/test_decode_attention.py

NEW_TOKENS = 5


def _twins(family: str, dtype: torch.dtype = torch.float32, **options):
    """The same tiny model wrapped twice alike on the CPU."""
    model = _model(family, dtype)
    return moe_runtime.wrap(copy.deepcopy(model), device="cpu", **options), moe_runtime.wrap(model, device="cpu", **options)


def _generate(model, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=0)


def _routers_saw(model, ids: torch.Tensor = PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, L, K], weights [T, L, K]) the routers returned while `model` generated."""
    recorder = RouterRecorder(model)
    try:
        _generate(model, ids)
        found, weights, _ = recorder.take()
    finally:
        recorder.close()
    return found, weights


@pytest.mark.parametrize(
    "family, dtype, options",
    [("qwen3_moe", torch.float32, {}), ("qwen2_moe", torch.float32, {}), ("olmoe", torch.bfloat16, {"exact": False})],
    ids=["op by op", "shared expert", "native layer"],
)
def test_the_log_holds_what_the_routers_chose(family, dtype, options):
    """Prompt and every fed token, in order, as one sequence; the twin's routers, hooked, chose
    the same experts with the same weights (to float16), and the recorded model took its own path."""
    if options and not cpu_gemv.available():
        pytest.skip("the CPU decode extension is not built here")
    logged, hooked = _twins(family, dtype, budget=0.5, **options)
    with record_routing(logged, task="chat") as log:
        out = _generate(logged)
    trace = log.trace()
    ids, weights = _routers_saw(hooked)
    assert trace.num_sequences == 1 and trace.num_tokens == PROMPT.shape[1] + NEW_TOKENS - 1 == ids.shape[0]
    assert np.array_equal(trace.expert_ids, ids) and np.allclose(trace.gate_weights, weights.astype(np.float16), atol=1e-3)
    assert (trace.task, trace.model_type, trace.top_k) == ("chat", logged.config.model_type, 2)
    assert torch.equal(out, _generate(hooked))
    native_steps = moe_runtime.stats(logged)["compute_calls"].get(NATIVE_LAYER, 0)
    assert (native_steps > 0) == bool(options)
    assert moe_runtime.runtime_of(logged).routing_log is None  # detached after the block


def test_a_batch_gives_one_sequence_per_row_and_a_new_prefill_new_sequences():
    logged, hooked = _twins("qwen3_moe", budget=0.5)
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    with record_routing(logged) as log:
        _generate(logged, batch)
        _generate(logged, PROMPT)
    trace = log.trace()
    assert trace.num_sequences == 3 and np.diff(trace.seq_offsets).tolist() == [PROMPT.shape[1] + NEW_TOKENS - 1] * 3
    for row, prompt in enumerate((PROMPT, PROMPT.flip(1), PROMPT)):
        ids, _ = _routers_saw(hooked, prompt)
        assert np.array_equal(trace.select_sequences([row]).expert_ids, ids), row


@pytest.mark.parametrize("where", ["second router", "last layer's experts"])
def test_a_forward_cut_short_is_left_out_and_the_runtime_goes_on(where):
    """A fault in the third forward (a decode step), at the second MoE layer's router or in the
    last MoE layer's experts: the log keeps the forwards before it, whole; the slots are all
    released, and the next generation is recorded."""
    logged, hooked = _twins("qwen3_moe", budget=0.5)
    runtime = moe_runtime.runtime_of(logged)
    calls, last = [], runtime.blocks[-1].moe_index

    def third_call_fails():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")

    def layer_that_fails(layer, *args, real=runtime._run_layer):
        if layer == last:
            third_call_fails()
        return real(layer, *args)

    router = runtime.blocks[1].router
    with record_routing(logged) as log:
        if where == "second router":
            handle = router.register_forward_hook(lambda *_: third_call_fails())
        else:
            runtime._run_layer = layer_that_fails
        with pytest.raises(RuntimeError, match="injected"):
            _generate(logged)
        assert log.num_tokens == PROMPT.shape[1] + 1  # the prefill and one decode step
        if where == "second router":
            handle.remove()
        else:
            del runtime._run_layer  # the class's again
        _generate(logged)
    runtime.cache.check_invariants()
    assert runtime.cache.in_use == set()
    trace = log.trace()
    ids, _ = _routers_saw(hooked)
    assert np.array_equal(trace.select_sequences([1]).expert_ids, ids)
    assert np.array_equal(trace.select_sequences([0]).expert_ids, ids[: PROMPT.shape[1] + 1])


def test_only_the_recording_threads_requests_are_recorded():
    logged, _ = _twins("qwen3_moe", budget=0.5)
    with record_routing(logged) as log:
        other = threading.Thread(target=_generate, args=(logged, PROMPT.flip(1)))
        other.start()
        _generate(logged)
        other.join()
    assert log.trace().num_sequences == 1 and log.num_tokens == PROMPT.shape[1] + NEW_TOKENS - 1


def test_a_plain_model_a_multi_gpu_plan_a_second_log_and_an_empty_log_are_refused():
    from test_placement import _alternating_plan  # tests/test_placement.py

    logged, _ = _twins("qwen3_moe", budget=0.5)
    with pytest.raises(ValueError, match="not wrapped by moe_runtime"):
        record_routing(_model("qwen3_moe"))
    planned = _model("qwen3_moe")
    moe_runtime.wrap(planned, budget=0.5, placement=_alternating_plan(planned, 2), devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="multi-GPU plan: every expert stays resident"):
        record_routing(planned)
    with record_routing(logged) as log:
        with pytest.raises(RuntimeError, match="already being recorded"):
            record_routing(logged).__enter__()
        with pytest.raises(ValueError, match="no routing was recorded"):
            log.trace()
    with record_routing(logged):  # detached: a new one may start
        pass


def test_remembered_sessions_keep_the_newest_within_the_limit(tmp_path, monkeypatch):
    logged, _ = _twins("qwen3_moe", budget=0.5)
    with record_routing(logged) as log:
        _generate(logged)
    session = log.trace()  # 10 tokens
    monkeypatch.setattr(routing_log, "LEARN_TOKENS", 25)
    path = tmp_path / "task.npz"
    kept = None
    for _ in range(4):
        kept = remember_session(path, kept, session)
    assert load_trace(path).num_sequences == kept.num_sequences == 2  # 40 tokens: the newest two fit
    monkeypatch.setattr(routing_log, "LEARN_TOKENS", 5)
    assert remember_session(path, kept, session).num_sequences == 1  # the new one is always kept


def test_generate_learns_across_runs_and_refuses_a_file_that_is_not_its_own(tmp_path):
    from moe_runtime.embedded import embedded_model_dir

    args = ("generate", str(embedded_model_dir()), "--budget", "0.25", "--prompt", "Hello there", "--max-new-tokens", "6", "--json")
    learned = tmp_path / "task.npz"
    first = json.loads(run_cli(*args, "--learn", str(learned)).stdout)
    session = first["learned"]["session_tokens"]
    assert first["stats"]["policy_fit_tokens"] is None and first["learned"]["sessions"] == 1 and session >= 6
    second = json.loads(run_cli(*args, "--learn", str(learned)).stdout)
    assert second["stats"]["policy_fit_tokens"] == session and second["stats"]["policy"] == "adaptive"
    assert second["learned"] == {"file": str(learned), "session_tokens": session, "sessions": 2, "tokens": 2 * session}
    assert load_trace(learned).num_sequences == 2
    table = " ".join(run_cli(*args[:-1], "--learn", str(learned)).stdout.split())  # the console wraps long paths
    assert f"({session} tokens) added to {learned}, which now holds 3 sessions ({3 * session} tokens)" in table

    recorded = tmp_path / "recorded.npz"
    replace(load_trace(learned), task="support", sequence_tasks=None).save(recorded)  # as `moe-runtime trace --task support` writes
    before = recorded.read_bytes()
    refused = run_cli(*args, "--learn", str(recorded), check=False)  # a trace --learn did not write: not its to rewrite or trim
    assert refused.returncode == 2 and "routing recorded otherwise (tasks: 'support')" in refused.stderr and "--policy-fit" in refused.stderr
    assert recorded.read_bytes() == before

    other_model, sessions = tmp_path / "other.npz", load_trace(learned)
    replace(sessions, top_k=1, expert_ids=sessions.expert_ids[..., :1], gate_weights=sessions.gate_weights[..., :1]).save(other_model)
    refused = run_cli(*args, "--learn", str(other_model), check=False)  # refused before the run, not when merging after it
    assert refused.returncode == 2 and "the routing of another model (6 MoE layers x 32 experts, top-1; this one has 6 x 32, top-4)" in refused.stderr

    notes = tmp_path / "notes.npz"
    notes.write_bytes(b"my notes, not a trace")
    refused = run_cli(*args, "--learn", str(notes), check=False)
    assert refused.returncode == 2 and "name a new file" in refused.stderr
    assert notes.read_bytes() == b"my notes, not a trace"
    for extra, message in (
        (("--learn", str(tmp_path / "task.txt")), "ends in .npz"),
        (("--learn", str(learned), "--policy", "lru"), "the lru policy fits nothing"),
        (("--learn", str(learned), "--policy-fit", str(learned)), "not allowed with argument"),
        (("--learn", str(notes / "x.npz")), "not writable"),
    ):
        refused = run_cli(*args, *extra, check=False)
        assert refused.returncode == 2 and message in refused.stderr, (extra, refused.stderr)


def test_generate_interrupted_keeps_the_tokens_it_finished(tmp_path, monkeypatch):
    """Ctrl-C after a few tokens: exit 130, and the file holds the routing of the tokens that
    were finished (the generation below stops the way an interrupt does, after two tokens)."""
    from moe_runtime.cli import generate as generate_command
    from moe_runtime.cli.trace_cmds import load_tokenizer
    from moe_runtime.embedded import embedded_model_dir

    def interrupted_after_two_tokens(model, tokenizer, prompt, max_new_tokens, session):
        with session:
            model.generate(tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)
            raise KeyboardInterrupt

    monkeypatch.setattr(generate_command, "timed_generate", interrupted_after_two_tokens)
    learned = tmp_path / "task.npz"
    result = run_cli("generate", str(embedded_model_dir()), "--budget", "0.25", "--prompt", "Hello there", "--learn", str(learned), check=False)
    tokens = load_trace(learned).num_tokens
    assert result.returncode == 130 and f"the routing of the {tokens} tokens finished was added to {learned}" in result.stderr
    assert tokens == len(load_tokenizer(str(embedded_model_dir()))("Hello there").input_ids) + 2  # the prompt and two fed tokens
