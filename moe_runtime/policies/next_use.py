"""Next use: evict the expert whose next use is expected farthest away (a forecast Belady).

Belady evicts the expert used farthest in the future; this policy estimates that time from
what routing traces teach about reuse. Tokens walk the L layers in order, so an expert's next
chance comes once per token, at its own layer. Whether it is used at the coming chances depends
on four things about it, all known when its layer has just run:

- its age a: tokens since its last use (0 if the running token used it);
- its recent uses r: how many of the last WINDOW tokens used it (bursts come back);
- its popularity bucket b: how often the fit traces use it at all;
- its transition bucket f: how likely the next token picks it at this layer given the experts
  the running token picked there, P(e' next | e now) averaged over the token's experts e
  (an E x E table per layer, fitted), cut into FORECAST_BUCKETS quantiles.

For each cell (b, a, r, f) the fit traces give w = E[v(D)], D the tokens until the next use and
v(D) = min(D, NEAR) + TAIL_WEIGHT (min(D, FAR) - min(D, NEAR)): the wait, counted in full for
the first NEAR tokens, at a quarter for the next ones up to FAR, not beyond. After a key's layer
runs at step s its next use is expected at step s + L w. Capping D at a few tokens matters: a
pool of 25% of the experts holds under three tokens' worth of them, so whether an expert returns
within a few tokens decides a hit, while the mean of the long tail (an expert unused for 60
tokens) only adds noise. The light tail tells apart experts that a hard cap at NEAR tokens
calls equally "far", which matters where the pool holds many tokens' worth: fitted next-use
makes 0.5-1.4% fewer loads at 50% and up to 0.4% fewer at 25% than with the hard cap, and the
same within 0.2% at 10% (BENCHMARKS.md). On held-out ESFT sequences at a 25% budget (fit on
the first half of each task's sequences): 1.48-1.62x Belady's loads (the hard cap: 1.50-1.62x);
without the transition bucket 1.59-1.71x, with an uncapped estimate from age and popularity
alone 1.67-1.85x, and LRU 1.87-2.02x. The cap, the window, the tail and the cells were chosen
by cross-validation within the fit halves.

Ages past AGE_CAP share one cell, and there every expert is "far"; each further IDLE_PER_WAIT
tokens idle add a token to w (_expected_wait), so that in a large pool, where nearly every victim
is that old, the one idle longest goes first, as LRU's would. 64 was chosen by replaying the
second half of each fit half's sequences: from 16 to 1024 the default's mean loads at 75-90%
moved by at most 1.1% of LRU's, 64 among the best (BENCHMARKS.md, "The idle slope, cross-validated").

A prefill's tokens (on_prompt) set a layer's ages and recent uses as decoding them would have;
the step's union of experts alone would make each of them look just used (learn_prompt).

A predictor's forecast q for a coming layer of the running token makes that chance certain
with probability q: due = chance + (1 - q) L w(age after a miss).

Scores are absolute due times in layer steps: a key's expected next use only changes when its
own layer is visited or a forecast for that layer arrives, so each step recomputes E entries
and an eviction is one argmax over resident keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..trace import Trace, load_traces
from .base import EvictionPolicy, NoVictimError

AGE_CAP = 64  # tokens; older (or never used) ages share one cell,
IDLE_PER_WAIT = 64  # ... and every this many tokens idle beyond it add a token to the wait (cross-validated in the fit halves)
WINDOW = 16  # tokens over which recent uses are counted
NEAR = 4  # tokens: a next use within them counts in full in the wait,
FAR = 8  # ... one between NEAR and FAR tokens away at TAIL_WEIGHT a token, and farther ones as FAR_WAIT
TAIL_WEIGHT = 0.25
POPULARITY_BUCKETS = 8
FORECAST_BUCKETS = 8
NEVER_AGAIN = 2**30  # tokens to the next use of a key the sequence never uses again
SHIPPED_ROUTING = Path(__file__).resolve().parent.parent / "data" / "routing" / "esft-vanilla-lite"


@dataclass(frozen=True)
class ReuseModel:
    """Fitted reuse statistics: each key's popularity bucket, the layers' expert transitions and
    the expected weighted wait per cell."""

    bucket: np.ndarray  # [L*E] int, popularity bucket of each (layer, expert)
    wait: np.ndarray  # [B, AGE_CAP + 1, WINDOW + 1, F] E[weighted_wait(D)] tokens, D >= 1
    transitions: np.ndarray | None = None  # [L, E, E] P(e' used by the next token | e used now); None: F = 1
    forecast_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [F - 1] quantiles cutting the transition forecast

    @classmethod
    def uniform(cls, num_layers: int, num_experts: int, top_k: int) -> ReuseModel:
        """No fit data: every expert used with probability K/E at every chance, independently."""
        miss = 1 - top_k / num_experts
        steps = np.diff(WAIT_VALUES, prepend=0.0)  # [FAR] v(d + 1) - v(d): E[v(D)] = sum_d steps[d] P(D > d)
        wait = float(np.sum(steps * miss ** np.arange(FAR)))
        return cls(np.zeros(num_layers * num_experts, dtype=np.int64), np.full((1, AGE_CAP + 1, WINDOW + 1, 1), wait))

    @classmethod
    def generic(cls, num_layers: int, num_experts: int) -> ReuseModel:
        """No fit data for this model: the age x recent-uses table of the shipped ESFT routing (all
        four tasks; popularity and transitions left out, as they name this model's experts). It
        transfers across tasks: fitted on three tasks, it makes 6-13% fewer loads than LRU on the
        fourth's held-out half (25%)."""
        return cls(np.zeros(num_layers * num_experts, dtype=np.int64), generic_wait())

    def select_layers(self, layers: list[int], num_experts: int) -> ReuseModel:
        """The model of `layers` only, renumbered 0, 1, ... (for a cache that sees a sample of the
        layers, as the adaptive default's shadows do)."""
        transitions = None if self.transitions is None else self.transitions[layers]
        return ReuseModel(self.bucket.reshape(-1, num_experts)[layers].ravel(), self.wait, transitions, self.forecast_edges)

    def flat_layout(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(row [L*E], wait [cells], forecast buckets F, age stride): a key's expected wait is
        wait[row[key] + age * age_stride + recent * F + forecast] (flat lookups: 4-D fancy
        indexing is slow)."""
        forecasts = self.wait.shape[3]
        age_stride = (WINDOW + 1) * forecasts
        return self.bucket * (AGE_CAP + 1) * age_stride, self.wait.ravel(), forecasts, age_stride

    @classmethod
    def fit(
        cls, trace: Trace, popularity_buckets: int = POPULARITY_BUCKETS, forecast_buckets: int = FORECAST_BUCKETS, prior: np.ndarray | None = None,
        prior_weight: float = 5.0, compiled: bool | None = None,
    ) -> ReuseModel:
        """Average the weighted wait per (popularity, age, recent uses, transition) cell over `trace`,
        each cell drawn towards `prior` (a wait per age and recent uses, [1, AGE_CAP + 1, WINDOW + 1, 1],
        as generic_wait gives, or one wait for all; None: FAR_WAIT, "far")
        with the weight of `prior_weight` observations. compiled: count with reuse_fit.cpp, which
        gives numpy's counts exactly in a fraction of the time (None: where it can be built)."""
        return cls.fit_with_age_table(trace, popularity_buckets, forecast_buckets, prior, prior_weight, compiled)[0]

    @classmethod
    def fit_with_age_table(
        cls, trace: Trace, popularity_buckets: int = POPULARITY_BUCKETS, forecast_buckets: int = FORECAST_BUCKETS, prior: np.ndarray | None = None,
        prior_weight: float = 5.0, compiled: bool | None = None, transitions: np.ndarray | None = None,
    ) -> tuple[ReuseModel, ReuseModel]:
        """(fit's model, the age x recent-uses model of the same counts): the second pools the
        popularity and transition buckets, as fit(popularity_buckets=1, forecast_buckets=1) would
        (the same table: tested) without counting the trace twice. transitions: the trace's
        [L, E, E] transitions where the caller holds them already (the routing history keeps them
        counted: sliding_transitions.py), else counted here."""
        counts = _counter(trace, compiled)
        bucket = _quantile_buckets(counts.popularity(), popularity_buckets)[1]
        if forecast_buckets == 1:
            transitions = None
        elif transitions is None:
            transitions = counts.transitions()
        forecast = None if transitions is None else counts.forecast(transitions)
        edges = np.zeros(0) if forecast is None else _quantile_edges(forecast, forecast_buckets)
        shape = (popularity_buckets, AGE_CAP + 1, WINDOW + 1, forecast_buckets)
        total, count = (cells.reshape(shape) for cells in counts.cell_sums(bucket, forecast, edges, shape))
        pooled = (total.sum(axis=(0, 3), keepdims=True), count.sum(axis=(0, 3), keepdims=True))

        def smoothed(total: np.ndarray, count: np.ndarray) -> np.ndarray:
            towards = np.broadcast_to(FAR_WAIT if prior is None else prior, total.shape)
            return (total + prior_weight * towards) / (count + prior_weight)

        age_table = cls(np.zeros_like(bucket), smoothed(*pooled))
        return cls(bucket, smoothed(total, count), transitions, edges), age_table


def _counter(trace: Trace, compiled: bool | None):
    """The counting passes of a fit: compiled (native_reuse_counts.py) where asked for or, by
    default, where they can be built; else numpy's (ReuseCounts)."""
    from . import native_candidates, native_reuse_counts  # they import this module

    if compiled is None:
        compiled = native_candidates.available()
    return native_reuse_counts.CompiledReuseCounts(trace) if compiled else ReuseCounts(trace)


class ReuseCounts:
    """What ReuseModel.fit counts over a trace, in numpy: the reference for reuse_fit.cpp."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.used = used_matrix(trace)

    def popularity(self) -> np.ndarray:
        """[L*E] share of tokens that used each key."""
        return self.used.mean(axis=0)

    def transitions(self) -> np.ndarray:
        return expert_transitions(self.trace, self.used)

    def forecast(self, transitions: np.ndarray) -> np.ndarray:
        return transition_forecast(self.trace, transitions)

    def cell_sums(self, bucket: np.ndarray, forecast: np.ndarray | None, edges: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(sum of the weighted waits, count) per cell of `shape`, flat; `forecast` [T, L*E] is cut
        into transition buckets by `edges` (None: one bucket)."""
        buckets = np.broadcast_to(np.int64(0), self.used.shape) if forecast is None else np.searchsorted(edges, forecast)  # a view: no [T, N] of zeros
        total, count = np.zeros(int(np.prod(shape))), np.zeros(int(np.prod(shape)))
        for begin, end in zip(self.trace.seq_offsets[:-1], self.trace.seq_offsets[1:]):
            age, recent, wait = reuse_history(self.used[begin:end])
            cells = np.ravel_multi_index((np.broadcast_to(bucket, age.shape), age, recent, buckets[begin:end]), shape)
            total += np.bincount(cells.ravel(), weights=wait.ravel(), minlength=total.size)
            count += np.bincount(cells.ravel(), minlength=count.size)
        return total, count


@functools.cache
def generic_wait() -> np.ndarray:
    """[1, AGE_CAP + 1, WINDOW + 1, 1] waits fitted on the shipped traces (about 1.5 s, once per process)."""
    return ReuseModel.fit(load_traces(sorted(SHIPPED_ROUTING.glob("*.npz"))), popularity_buckets=1, forecast_buckets=1).wait


QUANTILE_SAMPLE = 250_000  # quantile edges are cut from at most about this many values, evenly strided


def _quantile_edges(values: np.ndarray, buckets: int) -> np.ndarray:
    """[buckets - 1] edges cutting `values` into equal-count buckets, cut from an evenly strided
    sample of them (sorting all 10^7 forecasts of a trace takes seconds): np.quantile's linear
    interpolation between order statistics, taken from a full sort, which numpy vectorises, where
    np.quantile partitions (a refit's 200,000 forecasts: 1.3 ms against 10, BENCHMARKS.md)."""
    ordered = np.sort(values.ravel()[:: max(1, values.size // QUANTILE_SAMPLE)])
    position = (ordered.size - 1) * np.linspace(0, 1, buckets + 1)[1:-1]
    below = np.floor(position).astype(np.int64)
    low, high, weight = ordered[below], ordered[np.minimum(below + 1, ordered.size - 1)], position - below
    step = high - low  # in the values' own precision, as numpy's _lerp (to the bit: tested)
    return np.where(weight >= 0.5, high - step * (1 - weight), low + step * weight)


def _quantile_buckets(values: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges [buckets - 1], bucket of each value): equal-count buckets of `values`."""
    edges = _quantile_edges(values, buckets)
    return edges, np.searchsorted(edges, values)


def used_matrix(trace: Trace) -> np.ndarray:
    """[T, L*E] bool: token t used key l * E + e."""
    used = np.zeros((trace.num_tokens, trace.num_layers * trace.num_experts), dtype=bool)
    keys = trace.expert_ids.astype(np.int64) + (np.arange(trace.num_layers) * trace.num_experts)[None, :, None]
    np.put_along_axis(used, keys.reshape(trace.num_tokens, -1), True, axis=1)
    return used


def expert_transitions(trace: Trace, used: np.ndarray) -> np.ndarray:
    """[L, E, E] P(expert e' at layer l for token t + 1 | e at layer l for token t), within
    sequences (transition_table of the counts)."""
    num_layers, num_experts = trace.num_layers, trace.num_experts
    has_next = np.ones(trace.num_tokens, dtype=bool)
    has_next[trace.seq_offsets[1:] - 1] = False
    now = np.flatnonzero(has_next)
    counts = np.zeros((num_layers, num_experts, num_experts))
    seen = np.zeros((num_layers, num_experts))
    for layer in range(num_layers):
        span = slice(layer * num_experts, (layer + 1) * num_experts)
        current, following = used[now, span].astype(np.float64), used[now + 1, span].astype(np.float64)
        counts[layer] = current.T @ following  # [E, E]: tokens using e now and e' next
        seen[layer] = current.sum(axis=0)
    return transition_table(counts, seen, trace.top_k)


def transition_table(counts: np.ndarray, seen: np.ndarray, top_k: int) -> np.ndarray:
    """[L, E, E] fp32 transition probabilities from the counts of (e now, e' next) [L, E, E] and of
    e now with a next token [L, E], smoothed towards the base rate K/E with the weight of 10
    observations."""
    prior = 10.0
    return ((counts + prior * top_k / counts.shape[-1]) / (seen[:, :, None] + prior)).astype(np.float32)


def transition_forecast(trace: Trace, transitions: np.ndarray) -> np.ndarray:
    """[T, L*E] for each token and key: the mean over the token's experts e at the key's layer of
    P(key's expert next | e)."""
    forecast = np.empty((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
    for layer in range(trace.num_layers):
        forecast[:, layer] = transitions[layer][trace.expert_ids[:, layer].astype(np.int64)].mean(axis=1)
    return forecast.reshape(trace.num_tokens, -1)


def reuse_history(used: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence's [T, N] use flags -> after each token t: age (capped), uses in the last
    WINDOW tokens, and weighted_wait(D) for D the tokens until the next use (FAR_WAIT if none)."""
    tokens = np.arange(len(used))[:, None]
    last = np.maximum.accumulate(np.where(used, tokens, -AGE_CAP), axis=0)
    age = np.minimum(tokens - last, AGE_CAP)
    uses = np.cumsum(used, axis=0, dtype=np.int32)
    recent = uses - np.vstack([np.zeros((WINDOW, used.shape[1]), np.int32), uses[:-WINDOW]])[: len(used)]
    return age, recent, weighted_wait(tokens_to_next_use(used))


def weighted_wait(tokens: np.ndarray) -> np.ndarray:
    """v(D) for D tokens to the next use: D up to NEAR, then TAIL_WEIGHT a token up to FAR. With
    TAIL_WEIGHT a quarter its values are multiples of 1/4, so sums of them are exact in any order
    (the compiled fit's totals equal numpy's to the bit)."""
    near = np.minimum(tokens, NEAR)
    return near + TAIL_WEIGHT * (np.minimum(tokens, FAR) - near)


WAIT_VALUES = weighted_wait(np.arange(1, FAR + 1))  # [FAR] v(1), ..., v(FAR): the compiled fit's table
FAR_WAIT = float(WAIT_VALUES[-1])  # the wait of a key not used again within FAR tokens


def tokens_to_next_use(used: np.ndarray) -> np.ndarray:
    """One sequence's [T, N] use flags -> [T, N] tokens from t to each key's next use after t
    (NEVER_AGAIN, a large number, if none)."""
    tokens = np.arange(len(used))[:, None]
    never = len(used) + NEVER_AGAIN
    upcoming = np.minimum.accumulate(np.where(used, tokens, never)[::-1], axis=0)[::-1]
    return np.vstack([upcoming[1:], np.full((1, used.shape[1]), never)]) - tokens


@dataclass(frozen=True)
class PromptSummary:
    """What next-use takes from a prefill's tokens at one layer, as if they had been decoded:
    the experts of its last (up to WINDOW) tokens, oldest first (a batch's rows together, in
    first-use order), and the tokens between each expert's last use and the prompt's end."""

    recent: list[np.ndarray]  # [min(T, WINDOW)] experts each of the last tokens used
    idle: np.ndarray  # [E] int64: 0 if the last token used it, ..., `tokens` if none did
    tokens: int  # T


def summarize_prompt(routing: np.ndarray, num_experts: int) -> PromptSummary:
    """The PromptSummary of one layer's prefill routing [B, T, K] (expert ids)."""
    routing = np.asarray(routing, dtype=np.int64)
    tokens = routing.shape[1]
    by_token = routing.transpose(1, 0, 2).reshape(tokens, -1)  # [T, B x K]
    recent = [np.fromiter(dict.fromkeys(row.tolist()), dtype=np.int64) for row in by_token[-WINDOW:]]
    last = np.full(num_experts, -1, dtype=np.int64)
    np.maximum.at(last, by_token.ravel(), np.repeat(np.arange(tokens), by_token.shape[1]))
    return PromptSummary(recent, np.where(last >= 0, tokens - 1 - last, tokens), tokens)


class NextUsePolicy(EvictionPolicy):
    name = "next-use"
    tracks_accesses = False  # uses are recorded per layer step, in on_layer_start

    @classmethod
    def fitted(cls, trace: Trace) -> NextUsePolicy:
        """A policy for the model `trace` was recorded on, fitted on it, to pass as wrap(policy=...).
        wrap(policy_fit=trace) starts the adaptive default from the same fit instead, which a fit
        that misleads costs far less (BENCHMARKS.md, "A fit that misleads")."""
        return cls(trace.num_layers, trace.num_experts, ReuseModel.fit(trace))

    def __init__(self, num_layers: int, num_experts: int, model: ReuseModel):
        size = num_layers * num_experts
        self.num_layers, self.num_experts = num_layers, num_experts
        self.use_model(model)
        self.last_use = np.full(size, -AGE_CAP)  # token index of each key's last use
        self.recent = np.zeros(size, dtype=np.int64)  # uses in the last WINDOW tokens (<= WINDOW)
        no_keys = np.zeros(0, dtype=np.int64)
        self._window = [[no_keys] * num_layers for _ in range(WINDOW)]  # [t % WINDOW][layer]: keys token t used
        self.layer, self.token, self.step = num_layers, -1, -1  # the first layer start opens token 0
        # Layer l's first visit is step l, as if it had last been visited at step l - L.
        last_visit = np.repeat(np.arange(num_layers), num_experts) - num_layers
        self.due = last_visit + num_layers * self._lookup(np.full(size, AGE_CAP))
        self.resident = np.zeros(size, dtype=bool)
        self.scores = np.full(size, -np.inf)  # due time of resident keys, -inf elsewhere
        self._dormant = False
        self._visits: dict[int, tuple[int, int, np.ndarray]] = {}  # while dormant: layer -> (step, token, keys) of its last visit

    def use_model(self, model: ReuseModel) -> None:
        """Predict with `model` from now on (a refit); what was recorded about each key stays, and
        each layer's expected next uses are recomputed at its next visit."""
        if model.bucket.shape != (self.num_layers * self.num_experts,):
            raise ValueError(f"the reuse model describes {model.bucket.shape[0]} experts, not {self.num_layers} layers x {self.num_experts}")
        self.model = model
        self._row, self._wait, self._forecasts, self._age_stride = model.flat_layout()
        self._transitions, self._forecast_edges = model.transitions, model.forecast_edges
        self.forecast = np.zeros(len(model.bucket), dtype=np.int64)  # transition bucket at the key's last visit

    def _lookup(self, age: np.ndarray, span: slice = slice(None)) -> np.ndarray:
        """Expected weighted wait (weighted_wait, in tokens) until the next use of the keys in `span`, at `age`."""
        cell = self._row[span] + age * self._age_stride + self.recent[span] * self._forecasts + self.forecast[span]
        return self._wait.take(cell)

    def _expected_wait(self, idle: np.ndarray, span: slice) -> np.ndarray:
        """The wait of the keys in `span` after `idle` tokens unused: their cell's at the capped age,
        plus a token per IDLE_PER_WAIT tokens idle beyond the cap. The cells cannot tell an expert idle
        for 65 tokens from one idle for 1600 (both "far"), and in a large pool nearly every victim
        is that far: next-use then evicted from the layer just run (97% of its victims, median idle
        63 tokens, where LRU's oldest resident was idle 1652; GPT-OSS mmlu-pro at 90%) and made
        1.35x LRU's loads; with the idle term 1.004x, while at 10-50%, where under 0.2% of victims
        are idle past the cap, its loads moved by at most 0.3% of LRU's on the shipped tasks
        (BENCHMARKS.md, "Idle beyond the age cap")."""
        return self._lookup(np.minimum(idle, AGE_CAP), span) + np.maximum(idle - AGE_CAP, 0) / IDLE_PER_WAIT

    def _span(self, layer: int) -> slice:
        return slice(layer * self.num_experts, (layer + 1) * self.num_experts)

    def _set_due(self, span: slice, due: np.ndarray) -> None:
        self.due[span] = due
        self.scores[span] = np.where(self.resident[span], due, -np.inf)

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        if layer <= self.layer:
            self.token += 1  # layers restart (or the only layer runs again): a new forward step
        self.step += 1
        self.layer = layer
        keys = np.asarray(keys, dtype=np.int64)
        self._record(layer, keys)
        if self._dormant:
            self._visits[layer] = (self.step, self.token, keys)
        else:
            self._visit(layer, self.step, self.token, keys)

    def _visit(self, layer: int, step: int, token: int, keys: np.ndarray) -> None:
        """Layer `layer`'s expected next uses after its visit at `step` (token `token`) used `keys`."""
        span = self._span(layer)
        if self._transitions is not None:
            self.forecast[span] = self._transition_bucket(layer, keys - span.start)
        self._set_due(span, step + self.num_layers * self._expected_wait(token - self.last_use[span], span))

    def set_dormant(self, dormant: bool) -> None:
        """Dormant: uses are recorded, expected next uses not computed. Woken, each layer's are
        computed from its last visit, exactly as they were then (a layer's ages and recent uses
        change only at its own visits); forecasts received while dormant are not kept."""
        self._dormant = dormant
        if not dormant:
            for layer, visit in self._visits.items():
                self._visit(layer, *visit)
            self._visits = {}

    def on_prompt(self, layer: int, routing) -> None:
        self.learn_prompt(layer, summarize_prompt(routing, self.num_experts))

    def learn_prompt(self, layer: int, prompt: PromptSummary) -> None:
        """Layer `layer`'s visit just now was a prefill of `prompt.tokens` tokens: its ages and
        recent uses become what decoding them would have left, not "every expert of the union
        just used once" (which made next-use 1.09-1.10x LRU's loads at 50% in the short decodes
        after a prefill: BENCHMARKS.md, "Learning from the prompt"). The prompt's last tokens
        take this layer's places in the recent-uses window, the last one the running token's;
        an expert the prompt did not use has idled through it; the transitions are the last
        token's. The clock still counts the prefill as one token."""
        span = self._span(layer)
        for back, experts in enumerate(reversed(prompt.recent)):
            uses = self._window[(self.token - back) % WINDOW]
            self.recent[uses[layer]] -= 1
            keys = experts + span.start
            self.recent[keys] += 1
            uses[layer] = keys
        unused = prompt.idle >= prompt.tokens
        self.last_use[span] = np.where(unused, np.minimum(self.last_use[span], self.token - prompt.tokens), self.token - prompt.idle)
        last = prompt.recent[-1] + span.start
        if self._dormant:
            self._visits[layer] = (self.step, self.token, last)
        else:
            self._visit(layer, self.step, self.token, last)

    def _transition_bucket(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """[E] bucket of P(each expert next | this token's `experts`), averaged over them."""
        return np.searchsorted(self._forecast_edges, np.add.reduce(self._transitions[layer].take(experts, axis=0), axis=0) / len(experts))

    def _record(self, layer: int, keys: np.ndarray) -> None:
        """Count `keys` as used by the running token; what this layer used WINDOW tokens ago leaves
        the window. (A fancy-index increment counts a repeated key once, as one use per token.)"""
        uses = self._window[self.token % WINDOW]
        self.recent[uses[layer]] -= 1
        self.recent[keys] += 1
        uses[layer] = keys
        self.last_use[keys] = self.token

    def on_forecast(self, layer: int, probabilities) -> None:
        """q for `layer`'s coming visit (in this token, `layer - self.layer` steps from now)."""
        if layer <= self.layer or self._dormant:
            return
        span = self._span(layer)
        wait = self._expected_wait(self.token - self.last_use[span], span)  # after a miss at the coming chance
        chance = self.step + layer - self.layer
        forecast = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
        self._set_due(span, chance + (1 - forecast) * self.num_layers * wait)

    def on_insert(self, key: int) -> None:
        self.resident[key] = True
        self.scores[key] = self.due[key]

    def on_access(self, key: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        self.resident[key] = False
        self.scores[key] = -np.inf

    def expected_steps(self) -> np.ndarray:
        """[L*E] expected layer steps from now until each expert's next use."""
        return self.due - self.step

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        skipped = []
        try:
            while True:
                key = int(self.scores.argmax())
                if self.scores[key] == -np.inf:
                    raise NoVictimError("every resident expert is protected")
                if is_evictable(key):
                    return key
                skipped.append((key, self.scores[key]))
                self.scores[key] = -np.inf
        finally:
            for key, score in skipped:
                self.scores[key] = score
