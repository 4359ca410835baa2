"""The learner's popularity test (popularity_persistence.py) on routing whose favourites stay or move."""

import numpy as np

from moe_runtime.policies.popularity_persistence import PopularityPersistence
from moe_runtime.synthetic import flat_routing


def _tokens(favourites: list[int], count: int, layers: int = 2, seed: int = 0) -> np.ndarray:
    """[count, layers, 2] expert ids, each token two distinct experts of `favourites`."""
    rng = np.random.default_rng(seed)
    return np.stack([[rng.choice(favourites, 2, replace=False) for _ in range(layers)] for _ in range(count)]).astype(np.int16)


def test_popularity_learnt_predicts_the_same_favourites_and_misleads_once_they_move():
    judge = PopularityPersistence(num_experts=16, history_tokens=256)
    before = _tokens([0, 1, 2, 3], 64)
    assert judge.nats_per_use(before, _tokens([0, 1, 2, 3], 32, seed=1)) > 1.0  # log(16 / 4) = 1.39 at best
    assert judge.nats_per_use(before, _tokens([12, 13, 14, 15], 32, seed=1)) < -1.0
    assert judge.nats_per_use(before, _tokens(list(range(16)), 32, seed=1)) < 0  # uniform after: the learnt popularity only misleads


def _refits(trace, every: int, judge: PopularityPersistence) -> None:
    """Refits every `every` tokens on the last history_tokens of `trace`, as adaptive.py's."""
    for end in range(every, trace.num_tokens + 1, every):
        judge.add_refit(trace.expert_ids[max(0, end - judge.history_tokens) : end], every)


def test_popularity_persists_where_favourites_stay_and_not_where_each_request_moves_them():
    """Qwen1.5-MoE's shape, Zipf 0.7, a history of 200 tokens refitted every 50: kept where the
    favourites stay; set aside where they are redrawn for each request of 150 tokens."""
    for drift, persists in ((0.0, True), (1.0, False)):
        judge = PopularityPersistence(num_experts=60, history_tokens=200)
        _refits(flat_routing(24, 60, 4, 1200, reuse=0.3, skew=0.7, drift=drift, sequences=8, seed=0), 50, judge)
        assert judge.persists == persists


def test_the_first_refit_is_not_judged():
    """Its tokens are all new: too few to split in two and tell."""
    judge = PopularityPersistence(num_experts=16, history_tokens=256)
    judge.add_refit(np.concatenate([_tokens([0, 1, 2, 3], 64), _tokens([12, 13, 14, 15], 64)]), 128)
    assert judge.persists and judge.tokens == 0
    judge.add_refit(np.concatenate([_tokens([0, 1, 2, 3], 64), _tokens([12, 13, 14, 15], 64)]), 200)  # refits further apart than the history: its halves
    assert not judge.persists
