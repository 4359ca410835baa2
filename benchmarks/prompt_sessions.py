"""The default policy on sessions that open with a prompt: does learning the prompt's routing pay?

A live session's prompt comes as one prefill step: the cache sees each layer's union of the
prompt's experts, and the runtime now also tells the policy every prompt token's routing
(EvictionPolicy.on_prompt): the default's learner (routing_history.py) keeps it, so its first
refit can come before the first decode token, and its next-use candidates take the prompt's
tokens as if decoded (NextUsePolicy.learn_prompt), where the union made every expert of it look
just used. Each held-out sequence of the shipped traces (the second half of each file's sequences,
as adaptive_default.py) is replayed alone from a cold cache, its first `--prompt-share` of
tokens as one prefill step (simulator.replay's prompts: the union in waves that fit the pool),
the rest decoded; the decode tokens' loads, summed over the sessions, for LRU (which takes the
prompt as if decoded: lru.py), LRU ordering the prompt's experts as the prefill step loaded
them (as it was), the default blind to the prompt (as it was), the default whose learner keeps
the prompt but whose candidates see only its union, and the default as it is. The traces do not
mark where a prompt ends (ESFT's hold prompt and answer in one forward; GPT-OSS's are decode
tokens), so the share is an assumption, the same for every policy.

    python benchmarks/prompt_sessions.py --json prompts.json --plot prompts.png
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
from adaptive_default import add_replay_arguments, check_outputs, plot_ratio_bars, shipped_halves, write_outputs
from tqdm.auto import tqdm

from moe_runtime.errors import run_script
from moe_runtime.policies import DEFAULT_POLICY, AdaptivePolicy, EvictionPolicy, make_policy
from moe_runtime.policies.adaptive import starting_model
from moe_runtime.policies.lru import LRUPolicy
from moe_runtime.simulator import replay
from moe_runtime.trace import Trace

POLICIES = ("lru", "lru_blind", "blind", "history", DEFAULT_POLICY)
LABELS = {"lru_blind": "LRU, prompt as loaded", "blind": "default, prompt unseen", "history": "default, prompt in its history only", DEFAULT_POLICY: "default, prompt learnt"}


class PromptBlindLRU(LRUPolicy):
    """LRU as it was: a prefill's experts ordered as the step loaded them."""

    def on_prompt(self, layer: int, routing) -> None:
        pass


class PromptBlindDefault(AdaptivePolicy):
    """The default as it was before it learnt from prompts: its learner sees decode tokens only."""

    def on_prompt(self, layer: int, routing) -> None:
        pass


class PromptInHistoryDefault(AdaptivePolicy):
    """The default whose learner keeps the prompt's tokens, while its candidates see only the
    prefill step's union (the first step of "Learning from the prompt")."""

    def on_prompt(self, layer: int, routing) -> None:
        if not self.idle:
            self.history.record_prompt(layer, routing)


def prompt_share(text: str) -> float:
    """--prompt-share: the share of each sequence's tokens that is its prompt, above 0 and below 1."""
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a share such as 0.5, not {text!r}") from None
    if not 0 < share < 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and below 1, got {share}")
    return share


def sessions(trace: Trace, share: float) -> Iterator[tuple[Trace, int]]:
    """Each sequence of `trace` alone, and its prompt: how many of its first tokens, `share` of them."""
    for index in range(trace.num_sequences):
        session = trace.select_sequences([index])
        yield session, int(share * session.num_tokens)


def decode_loads(session: Trace, policy: EvictionPolicy, capacity: int, prompt: int) -> int:
    """The loads of `session` replayed from a cold cache, its first `prompt` tokens one prefill
    step, but for those of the prefill."""
    result = replay(session, policy, capacity, prompts=np.array([prompt]))
    return result.loads - result.prompt_loads


def measure(trace: Trace, budget: float, share: float) -> dict:
    """Decode loads of each policy summed over `trace`'s sequences, each replayed alone from a
    cold cache with its first `share` of tokens as one prefill step."""
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": capacity, "top_k": trace.top_k}
    generic = starting_model(trace.num_layers, trace.num_experts)  # frozen: one for every session
    loads, prompt_tokens = dict.fromkeys(POLICIES, 0), 0
    for session, prompt in sessions(trace, share):
        prompt_tokens += prompt
        fresh = {
            "lru": make_policy("lru", **shape), "lru_blind": PromptBlindLRU(), "blind": PromptBlindDefault(generic, **shape), "history": PromptInHistoryDefault(generic, **shape),
            DEFAULT_POLICY: make_policy(DEFAULT_POLICY, **shape),
        }
        for name, policy in fresh.items():
            loads[name] += decode_loads(session, policy, capacity, prompt)
    decode = trace.num_tokens - prompt_tokens
    return {"budget": budget, "sessions": trace.num_sequences, "prompt_tokens": prompt_tokens, "decode_tokens": decode, **loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_replay_arguments(parser, budgets=True)
    parser.add_argument("--prompt-share", type=prompt_share, default=0.5, help="the share of each sequence's tokens that is its prompt (default 0.5)")
    args = parser.parse_args()
    check_outputs(args.json, args.plot)
    halves = shipped_halves()
    jobs = [(name, budget) for name in halves for budget in args.budgets]
    rows = [{"trace": name, **measure(halves[name][0], budget, args.prompt_share)} for name, budget in tqdm(jobs, desc="tasks", unit="run")]
    print(f"each held-out sequence alone from a cold cache, its first {args.prompt_share:.0%} one prefill step;")
    print("decode loads summed over the sessions: LRU's per decode token (the prompt as if")
    print("decoded), the rest as multiples of it: LRU with the prompt's experts as loaded, the")
    print("default blind to the prompt, with the prompt in its learner's history only, and")
    print("learnt (history and candidates); prompt: mean prompt tokens (a refit needs 128)")
    print(f"{'trace':<19} {'bud.':>4} {'sess':>4} {'prompt':>6} {'LRU':>6} {'loaded':>6} {'unseen':>6} {'history':>7} {'learnt':>6}")
    for row in rows:
        lru = row["lru"]
        print(
            f"{row['trace']:<19} {row['budget']:>4.2f} {row['sessions']:>4} {row['prompt_tokens'] / row['sessions']:>6.0f}"
            f" {lru / row['decode_tokens']:>6.1f} {row['lru_blind'] / lru:>6.3f} {row['blind'] / lru:>6.3f} {row['history'] / lru:>7.3f}"
            f" {row[DEFAULT_POLICY] / lru:>6.3f}"
        )
    write_outputs(rows, args.json, args.plot, lambda rows, path: plot_ratio_bars(rows, path, LABELS, "decode loads over all sessions / LRU's"))


if __name__ == "__main__":
    run_script(main)
