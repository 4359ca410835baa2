"""Online shares of outcomes the cache core learns from: recent, decayed, starting at a prior.

- AdmissionRate: how often an expert admitted after a CPU computation (hybrid execution) was
  used again before its eviction; admissions continue while at least half were.
- PrefetchOutcomes: how often a prefetch issued at forecast probability p was used (per band
  of p: the predictor's calibration as this routing shows it), and how often an expert a
  prefetch evicted was needed again within a token (what a prefetch's victim costs), and how
  often a layer step has a demand load at all (what a copy still in flight can delay).
Both feed decisions that must hold on routing nobody fitted them on: they measure, then decide.
"""

from __future__ import annotations

from collections import deque


class DecayedShare:
    """The share of recent events that were successes (exponential decay per event)."""

    DECAY = 0.98

    def __init__(self, prior: float, weight: float = 2.0):
        self.successes, self.events = prior * weight, weight

    def record(self, success: bool) -> None:
        self.successes = self.successes * self.DECAY + float(success)
        self.events = self.events * self.DECAY + 1.0

    @property
    def value(self) -> float:
        return self.successes / self.events


class AdmissionRate(DecayedShare):
    """Keep admitting while at least THRESHOLD of recent admissions were used again; a single
    trial admission per TRIAL_EVERY refusals keeps the share measurable."""

    THRESHOLD = 0.5
    TRIAL_EVERY = 64

    def __init__(self):
        super().__init__(prior=0.5)
        self.refused = 0

    def worthwhile(self) -> bool:
        if self.value >= self.THRESHOLD:
            return True
        self.refused += 1
        return self.refused % self.TRIAL_EVERY == 0


class PrefetchOutcomes:
    """Calibration of forecast probabilities and the reuse of prefetch victims, measured online."""

    BANDS = 5

    def __init__(self, horizon_steps: int):
        self.used = [DecayedShare(prior=(band + 0.5) / self.BANDS) for band in range(self.BANDS)]  # trust the forecast at first
        self.victim_reuse = DecayedShare(prior=0.25)  # unknown at first: a quarter, then measured
        self.step_missed = DecayedShare(prior=1.0)  # the share of layer steps with a demand load
        self.horizon = horizon_steps  # a victim not needed again within this many layer steps was free to evict
        self.step = 0
        self.victims: dict[int, int] = {}  # key -> step it was evicted by a prefetch
        self.expiry: deque[tuple[int, int]] = deque()

    def band(self, probability: float) -> int:
        return min(self.BANDS - 1, max(0, int(probability * self.BANDS)))

    def calibrated(self, probability: float) -> float:
        """The share of recent prefetches issued at about this probability that were used."""
        return self.used[self.band(probability)].value

    def record_use(self, probability: float, used: bool) -> None:
        self.used[self.band(probability)].record(used)

    def evicted_by_prefetch(self, key: int) -> None:
        self.victims[key] = self.step
        self.expiry.append((self.step, key))

    def next_step(self, missed: list[int]) -> None:
        """One layer step: victims missed again count as reused; those past the horizon as free."""
        self.step += 1
        self.step_missed.record(bool(missed))
        for key in missed:
            if self.victims.pop(key, None) is not None:
                self.victim_reuse.record(True)
        while self.expiry and self.expiry[0][0] <= self.step - self.horizon:
            _, key = self.expiry.popleft()
            if key in self.victims and self.victims[key] <= self.step - self.horizon:  # not evicted again since
                del self.victims[key]
                self.victim_reuse.record(False)
