"""The routing a cache has seen, kept to refit next-use's reuse model online.

The generic reuse model (next_use.ReuseModel.generic) knows only how age and recent uses predict
reuse; fitted on a task's own traces the model also knows each expert's popularity and the
layers' expert-to-expert transitions, and makes 6-21% fewer loads on ESFT (BENCHMARKS.md). A
user who brings no traces still produces them while serving: this keeps the last few thousand
tokens' experts (decode tokens, and every prompt token of a prefill, which the runtime tells the
policy) and says when enough new ones have arrived, so the adaptive default can
refit its next-use candidate on the routing of the model and task it actually serves.

How often: the more often, the fewer loads (refits every 32 tokens against every few hundred:
0.5-2% fewer loads at 25-50% on the fit halves of ESFT and GPT-OSS, BENCHMARKS.md), so a refit
comes every REFIT_EVERY_TOKENS tokens as long as it costs under REFIT_US_PER_STEP per layer step;
compiled counting (reuse_fit.cpp) made a refit about seven times cheaper, which is what allows
it (on DeepSeek-V2-Lite's 26 x 64 experts, about every 70 tokens early on, every 410 at the
full 2048 tokens of history; on 8 layers of 128 experts, every 200 to 880). In between, the
layers' transitions, which it keeps current as tokens enter and leave (sliding_transitions.py),
are handed over every REFIT_EVERY_TOKENS tokens at a fraction of a refit's cost: most of what
refits every 32 tokens would save (BENCHMARKS.md, "Transitions kept current").
"""

from __future__ import annotations

import threading

import numpy as np

from ..trace import Trace
from .sliding_transitions import SlidingTransitions

HISTORY_TOKENS = 2048  # the routing a refit sees: the most recent decode tokens,
HISTORY_KEYS = 3_500_000  # ... but at most this many (token, expert) cells: a refit's memory and time are bounded
FIRST_REFIT_TOKENS = 128  # the first refit; later ones every REFIT_EVERY_TOKENS tokens,
REFIT_EVERY_TOKENS = 32  # ... at most this often,
REFIT_US_PER_STEP = 8.0  # ... unless refitting would cost more than this per layer step, amortized,
FIT_FIXED_US = 10_000.0  # ... at what a refit costs: this much whatever the history (the model's tables, its hand-over;
#   3-5 ms since the quantile edges come from a sort, kept at 10: more refits moved loads both ways, BENCHMARKS.md),
COMPILED_FIT_NS_PER_CELL = 22.0  # ... and this per (token, key) of history, compiled (reuse_fit.cpp),
NUMPY_FIT_NS_PER_CELL = 160.0  # ... or in numpy (2-core VM, one hour, 4 models x 128-2048 tokens: BENCHMARKS.md)
REFRESH_FIXED_US = 100.0  # between full refits the transitions are handed over afresh as often (sliding_transitions.py), priced as this much
REFRESH_NS_PER_ENTRY = 5.0  # ... and this per entry of the [L, E, E] table (measured 1.7-4.7), within the same REFIT_US_PER_STEP


class RoutingHistory:
    """A ring of the last tokens' experts [L, K]: HISTORY_TOKENS of them, fewer on models with
    more than HISTORY_KEYS / HISTORY_TOKENS experts in all (a refit at DeepSeek-V2-Lite's 26 x 64
    peaks at about 215 MB; 2048 tokens at 48 x 128 would take 700 MB and 2.6 s on a 2-core VM).
    A decode token is kept when its every layer step used exactly K experts (`record`); a
    prefill step's union of experts is not one token's routing, its tokens come whole from
    `record_prompt`."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, fit_ns_per_cell: float = COMPILED_FIT_NS_PER_CELL):
        """fit_ns_per_cell: what a refit costs per (token, key) of history, which spaces refits."""
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.fit_ns_per_cell = fit_ns_per_cell
        self.capacity = min(HISTORY_TOKENS, max(FIRST_REFIT_TOKENS, HISTORY_KEYS // (num_layers * num_experts)))
        self.ring = np.zeros((self.capacity, num_layers, top_k), dtype=np.int16)
        self.kept = 0  # tokens ever kept
        self.since_fit = 0
        self.refit_due = False  # _refit_due(), as of the last token kept
        self.transitions = SlidingTransitions(num_layers, num_experts, top_k)  # over the kept tokens
        self.since_refresh = 0  # tokens since the last full refit or transitions refresh
        self.refresh_due = False  # _refresh_due(), as of the last token kept
        self.token: list = [None] * num_layers  # the running token's keys at each layer, as recorded
        self.key_offsets = (np.arange(num_layers) * num_experts)[:, None]  # [L, 1] layer * E
        self.layers_seen = 0
        self.layer = num_layers  # the first layer starts a token
        self.prompts: dict[int, list[np.ndarray]] = {}  # thread -> its running prefill's layers so far, [B, T, K] each

    def record(self, layer: int, keys: list[int]) -> None:
        """Layer `layer` of the running token used `keys` (layer * E + expert; a list the caller
        leaves as it is: it is read when the token closes, once for all its layers, which costs
        a layer step a third of what converting each layer's keys did)."""
        if layer <= self.layer:
            self._close_token()
        self.layer = layer
        if len(keys) == self.top_k:
            self.token[layer] = keys
            self.layers_seen += 1

    def record_prompt(self, layer: int, routing: np.ndarray) -> None:
        """Layer `layer` of a prefill step routed B sequences' T tokens to `routing` [B, T, K]
        (expert ids); once every layer has, its B x T tokens are kept, each row's in order (a
        prompt of a few hundred tokens lets the first refit come before the first decode token,
        where the decode tokens alone would take a few hundred steps). Prefills of several
        threads, which the runtime's lock interleaves layer by layer, are kept apart by thread; a
        step cut short (its layers stop before the last) is dropped when the thread's next one
        starts. The step's union of experts, which `record` also saw, is no decode token's."""
        self.layers_seen = 0
        thread = threading.get_ident()
        layers = [] if layer == 0 else self.prompts.get(thread, [])
        if layer != len(layers) or routing.shape[-1] != self.top_k or (layers and routing.shape != layers[0].shape):
            self.prompts.pop(thread, None)
            return
        layers.append(routing)
        self.prompts[thread] = layers
        if len(layers) == self.num_layers:
            del self.prompts[thread]
            self._keep(np.stack(layers, axis=2).reshape(-1, self.num_layers, self.top_k))  # [B x T, L, K]

    def _close_token(self) -> None:
        if self.layers_seen == self.num_layers:
            self._keep((np.asarray(self.token) - self.key_offsets)[None])
        self.layers_seen = 0

    def _keep(self, tokens: np.ndarray) -> None:
        """Add `tokens` [N, L, K] (expert ids) to the ring, the newest `capacity` of them."""
        tokens = tokens[-self.capacity :]
        self._count_transitions(tokens)
        self.ring[(self.kept + np.arange(len(tokens))) % self.capacity] = tokens
        self.kept += len(tokens)
        self.since_fit += len(tokens)
        self.since_refresh += len(tokens)
        self.refit_due = self._refit_due()
        self.refresh_due = not self.refit_due and self._refresh_due()

    def _count_transitions(self, tokens: np.ndarray) -> None:
        """Before `tokens` [N <= capacity, L, K] overwrite the ring: uncount the pair each
        leaving token made with its successor, and count the pairs the new ones make (the first
        with the newest kept token, where that stays)."""
        kept, capacity = self.kept, self.capacity
        stays = max(0, kept + len(tokens) - capacity)  # the index of the oldest token the ring keeps after
        leaving = np.arange(max(0, kept - capacity), min(stays, kept - 1))
        self.transitions.add(self.ring[leaving % capacity], self.ring[(leaving + 1) % capacity], sign=-1)
        if 0 < kept and stays <= kept - 1:
            tokens = np.concatenate([self.ring[(kept - 1) % capacity][None], tokens])
        self.transitions.add(tokens[:-1], tokens[1:])

    def _refit_due(self) -> bool:
        """The first refit after FIRST_REFIT_TOKENS tokens (once, whatever it costs), then one every
        REFIT_EVERY_TOKENS tokens, never so often that a refit, spread over the layer steps since
        the last, costs more than REFIT_US_PER_STEP. The cost is estimated from the history's
        size, not timed, so that a replay makes the same decisions on every machine."""
        if self.kept == self.since_fit:  # none yet
            return self.kept >= FIRST_REFIT_TOKENS
        fit_us = FIT_FIXED_US + min(self.kept, self.capacity) * self.num_layers * self.num_experts * self.fit_ns_per_cell / 1e3
        return self.since_fit >= max(REFIT_EVERY_TOKENS, fit_us / (REFIT_US_PER_STEP * self.num_layers))

    def _refresh_due(self) -> bool:
        """After the first refit, a refresh of the transitions every REFIT_EVERY_TOKENS tokens,
        never so often that one, spread over the layer steps since the last full refit or
        refresh, costs more than REFIT_US_PER_STEP (estimated from the table's size: 61 x 384 x
        384 entries, about 45 ms, every 92 tokens)."""
        if self.kept == self.since_fit:  # no refit yet
            return False
        refresh_us = REFRESH_FIXED_US + self.transitions.pairs.size * REFRESH_NS_PER_ENTRY / 1e3
        return self.since_refresh >= max(REFIT_EVERY_TOKENS, refresh_us / (REFIT_US_PER_STEP * self.num_layers))

    def refreshed(self) -> None:
        """A refresh was due and is taken (or passed over): count anew."""
        self.since_refresh = 0
        self.refresh_due = False

    def as_trace(self) -> Trace:
        """The kept tokens, oldest first, as one sequence; resets the refit and refresh counts."""
        self.since_fit = self.since_refresh = 0
        self.refit_due = self.refresh_due = False
        ids = self.kept_tokens()
        return Trace(ids, np.zeros(ids.shape, dtype=np.float16), np.array([0, len(ids)]), self.num_experts, self.top_k)

    def kept_tokens(self) -> np.ndarray:
        """[T, L, K] the kept tokens' expert ids, oldest first."""
        start = self.kept % self.capacity if self.kept > self.capacity else 0
        return np.roll(self.ring, -start, axis=0)[: min(self.kept, self.capacity)]
