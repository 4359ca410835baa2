"""Prefetch a forecast expert only when its expected saving beats its expected cost.

A prefetch for layer l + d, issued as layer l computes, pays off only if the expert is used
(probability p, the forecast) and only by the part of the load that finishes before layer
l + d starts: saving = p x min(load, d x layer - the link's backlog). A wrong one (1 - p) is
pure cost when it still holds the copy engine as the next layer's demand loads arrive: they
wait behind it (a copy in flight cannot be pre-empted): cost = (1 - p) x (backlog + load -
layer) one layer ahead, and (share of steps with a miss) x the same further ahead, plus, when it evicts, the victim's chance of being needed again times a load.
Both probabilities are measured online (outcome_rates.PrefetchOutcomes): the forecast is
replaced by the share of recent prefetches at that forecast that were used. Candidates are taken in order of probability while the saving wins, each one adding its
load to the backlog the next must wait behind, so a busy link stops prefetching by itself.

Why: with DeepSeek-V2-Lite experts on PCIe 4.0 a load takes 0.69 ms and a layer 0.25 ms, so a
prefetch one layer ahead hides at most 0.25 ms when right and delays demand loads by up to
0.44 ms when wrong (further ahead it delays the next layer's loads even when right); every
ungated prefetching configuration cost modelled time in `bench`.
The constants are the runtime's own measurements (or the simulator's timing model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .outcome_rates import PrefetchOutcomes


@dataclass
class PrefetchGate:
    load_ms: float  # one expert over the copy engine
    layer_ms: float  # one MoE layer's compute: the lead a one-layer-ahead prefetch has (the runtime keeps it measured)

    def select(
        self, candidates: Sequence[tuple[int, float]], lookahead: int, link_backlog_ms: float, outcomes: PrefetchOutcomes,
    ) -> list[int]:
        """The experts to prefetch among `candidates` ((expert, forecast probability), best
        first) for the layer `lookahead` layers ahead, the copy engine being busy for
        `link_backlog_ms`. `outcomes` turns a forecast into the share of such prefetches that
        were used on this routing, and says how often a prefetch's victim was needed again
        (which costs a load)."""
        chosen = []
        backlog = max(0.0, link_backlog_ms)
        lead = lookahead * self.layer_ms
        victim_cost = outcomes.victim_reuse.value * self.load_ms
        for expert, forecast in candidates:
            probability = outcomes.calibrated(forecast)
            saving = probability * min(self.load_ms, max(0.0, lead - backlog))
            overrun = max(0.0, backlog + self.load_ms - self.layer_ms)  # still on the link when the next layer starts
            # One layer ahead, a right prefetch is a load that layer needed anyway; further ahead
            # it delays the next layer's demand loads, right or wrong, whenever there are any.
            delayed = (1.0 - probability) if lookahead == 1 else outcomes.step_missed.value
            cost = delayed * overrun + victim_cost
            if saving <= cost:
                break
            chosen.append(expert)
            backlog += self.load_ms
        return chosen
