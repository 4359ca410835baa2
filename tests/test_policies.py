"""Eviction policies on hand-made access streams with known answers."""

import pytest

from moe_runtime.policies import LFUPolicy, LRUPolicy, NoVictimError, make_policy


def test_lru_evicts_least_recently_used():
    policy = LRUPolicy()
    for key in (1, 2, 3):
        policy.on_insert(key)
    policy.on_access(1)
    assert policy.order() == [2, 3, 1]
    assert policy.choose_victim(lambda k: True) == 2
    assert policy.choose_victim(lambda k: k != 2) == 3  # protected keys are skipped
    policy.on_evict(2)
    assert policy.order() == [3, 1]
    with pytest.raises(NoVictimError):
        policy.choose_victim(lambda k: False)


def test_lfu_evicts_least_frequent_with_lru_ties_and_aging():
    policy = LFUPolicy(age_every=1000)
    for key in (1, 2, 3):
        policy.on_insert(key)
    for key in (1, 1, 1, 2, 2, 3, 3):
        policy.on_access(key)
    assert policy.choose_victim(lambda k: True) == 2  # 2 and 3 tie at 2 uses; 2 was used longer ago
    assert policy.choose_victim(lambda k: k != 2) == 3
    policy.on_evict(2)
    policy.on_insert(4)  # never used: count 0
    assert policy.choose_victim(lambda k: True) == 4
    policy.on_evict(4)
    policy.on_insert(2)  # comes back with its history (2 uses)
    assert policy.count(2) == 2


def test_lfu_aging_lets_old_favourites_fade():
    policy = LFUPolicy(age_every=4)
    policy.on_insert(1)
    policy.on_insert(2)
    for _ in range(3):
        policy.on_access(1)  # tick 3 ...
    policy.on_access(2)  # tick 4: ages, counts 1.5 and 0.5
    assert policy.count(1) == 1.5 and policy.count(2) == 0.5


def test_make_policy():
    assert isinstance(make_policy("lru"), LRUPolicy) and isinstance(make_policy("lfu"), LFUPolicy)
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("random")
