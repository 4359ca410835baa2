"""Whether the experts' popularity persists: the learner keeps the popularity it refits only while it does.

The adaptive default's learner (adaptive.py) refits next-use's reuse model on the recent routing,
each expert's popularity included. On the shipped routing popularity persists: on the held-out
halves, the popularity of the history's earlier tokens predicts the newer tokens' uses better
than uniform at every refit but a few, by 0.11 nats per use on average (ESFT law) to 0.62
(GPT-OSS sorry-bench), and the refitted model saves 4-13% of the loads on ESFT beyond the ages
alone. Where each request brings new favourites and the history holds about one request (the
largest MoEs' shapes, where it is cut to a few hundred tokens: routing_history.py), the
popularity learnt on the request ending leads the cache into the next one with the wrong
favourites until the duel turns away from it: at Qwen3-235B-A22B's shape (Zipf 0.7 redrawn for
each request, 50%) 1.006x LRU's loads.

So each refit scores its newest tokens (those since the refit before; where the history holds no
earlier ones, its newer half) under the popularity of the history's tokens before them: per
layer, with one pseudo-use of every expert, the mean log-likelihood ratio against uniform, in
nats per use. The scores are averaged, each weighted by the tokens since the refit before, the
weights fading by half over the history's length in tokens (what the learner remembers); while
that average is above 0 (the popularity learnt predicts better than knowing none) the learner
keeps its popularity, else it takes the age table, as the other next-use candidate does. At the
largest shapes: over LRU in 8 of 108 cases, at most 1.0047x, instead of 12 and 1.0061x; on every
shipped task the average never fell to 0 and the loads are unchanged (BENCHMARKS.md, "Popularity
that persists, tested at each refit"). The first refit is not judged: its 128 tokens, two halves
of one request, are too few to tell (its halves score ESFT law's held-out half at -0.17, every
later refit at +0.10 to +0.20).
"""

from __future__ import annotations

import numpy as np

from ..trace_stats import expert_uses


class PopularityPersistence:
    def __init__(self, num_experts: int, history_tokens: int):
        """history_tokens: the learner's history length, over which evidence fades by half."""
        self.num_experts, self.history_tokens = num_experts, history_tokens
        self.judged = 0  # refits seen
        self.gain = 0.0  # decayed sum over refits of the tokens since the one before x the nats per use they scored
        self.tokens = 0.0  # ... and of those tokens

    @property
    def persists(self) -> bool:
        """Whether the popularity learnt predicted the tokens after it better than uniform (true
        until judged)."""
        return self.tokens == 0 or self.gain > 0

    def add_refit(self, history: np.ndarray, new_tokens: int) -> None:
        """A refit on `history` [T, L, K] (expert ids, oldest first), whose last `new_tokens`
        arrived since the refit before."""
        self.judged += 1
        if self.judged == 1:
            return
        scored = new_tokens if new_tokens < len(history) else len(history) // 2
        fade = 0.5 ** (new_tokens / self.history_tokens)
        self.gain = self.gain * fade + new_tokens * self.nats_per_use(history[:-scored], history[-scored:])
        self.tokens = self.tokens * fade + new_tokens

    def nats_per_use(self, before: np.ndarray, after: np.ndarray) -> float:
        """Mean log-likelihood ratio of `after`'s uses under `before`'s popularity (per layer,
        one pseudo-use of every expert) against uniform; both [T, L, K] expert ids."""
        seen, used = expert_uses(before, self.num_experts), expert_uses(after, self.num_experts)
        popularity = (seen + 1) / (seen.sum(axis=1, keepdims=True) + self.num_experts)
        return float((used * np.log(self.num_experts * popularity)).sum() / used.sum())
