"""Disk layout: an order of each layer's experts in the store file so that reads are contiguous.

A token's K experts of one layer are read together (a cold layer, or a layer's misses). Put in
a file order, they form `runs` maximal stretches of adjacent experts, and each run is one
contiguous read. With the co-activation counts C[l, i, j] (tokens that chose both i and j at
layer l), the expected runs per read are exactly

    K - sum over adjacent pairs (a, b) of the order of C[l, a, b] / T,

so the best order is a maximum-weight Hamiltonian path through the co-activation graph. That is
NP-hard in general; we build it greedily (heaviest edges first, no vertex of degree > 2, no
cycle) and improve it with best-improvement 2-opt (segment reversals) until no move gains.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace


def order_experts(weights: np.ndarray) -> np.ndarray:
    """A file order [E] (expert ids, first to last) maximising the adjacent pairs' weight.

    weights: [E, E] symmetric co-activation counts (the diagonal is ignored).
    """
    weights = np.asarray(weights, dtype=np.float64)
    weights = (weights + weights.T) / 2
    np.fill_diagonal(weights, 0.0)
    return _two_opt(_greedy_path(weights), weights)


def path_weight(order: np.ndarray, weights: np.ndarray) -> float:
    """Sum of `weights` over the adjacent pairs of `order`."""
    order = np.asarray(order)
    return float(np.asarray(weights)[order[:-1], order[1:]].sum())


def disk_layout(coactivation: np.ndarray) -> np.ndarray:
    """[L, E] file order of every layer's experts from co-activation counts [L, E, E]."""
    return np.stack([order_experts(layer) for layer in coactivation])


def expert_id_order(num_layers: int, num_experts: int) -> np.ndarray:
    """[L, E] the checkpoint's own order (expert ids), the baseline a layout is compared with."""
    return np.tile(np.arange(num_experts), (num_layers, 1))


def runs_per_read(order: np.ndarray, trace: Trace) -> float:
    """Mean contiguous reads needed for one token's K experts of one layer under `order` [L, E]."""
    order = np.asarray(order, dtype=np.int64)
    position = np.argsort(order, axis=1)  # [L, E]: where each expert sits in its layer's file
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    places = np.sort(np.take_along_axis(position[None], ids, axis=2), axis=2)
    runs = 1 + (np.diff(places, axis=2) > 1).sum(axis=2)
    return float(runs.mean())


def _greedy_path(weights: np.ndarray) -> np.ndarray:
    """Heaviest edges first into a set of paths, then the paths end to end, as one order."""
    experts = len(weights)
    degree = np.zeros(experts, dtype=np.int64)
    component = list(range(experts))
    neighbours: list[list[int]] = [[] for _ in range(experts)]

    def root(node: int) -> int:
        while component[node] != node:
            component[node] = component[component[node]]
            node = component[node]
        return node

    upper_i, upper_j = np.triu_indices(experts, k=1)
    for index in np.argsort(-weights[upper_i, upper_j], kind="stable"):
        a, b = int(upper_i[index]), int(upper_j[index])
        if degree[a] < 2 and degree[b] < 2 and root(a) != root(b):
            component[root(a)] = root(b)
            degree[a] += 1
            degree[b] += 1
            neighbours[a].append(b)
            neighbours[b].append(a)
    start = next(node for node in range(experts) if degree[node] < 2)
    order, previous = [start], -1
    while len(order) < experts:
        following = [node for node in neighbours[order[-1]] if node != previous]
        previous = order[-1]
        order.append(following[0])
    return np.asarray(order, dtype=np.int64)


def _two_opt(order: np.ndarray, weights: np.ndarray, max_moves: int = 10_000) -> np.ndarray:
    """Reverse the segment whose reversal gains most, until none gains.

    The path is padded with a weightless sentinel at both ends, so reversing a prefix or a
    suffix (one edge changed) is the same move as reversing an inner segment (two edges).
    """
    experts = len(order)
    padded_weights = np.zeros((experts + 1, experts + 1))
    padded_weights[:experts, :experts] = weights
    path = np.concatenate([[experts], order, [experts]])
    upper = np.triu(np.ones((experts, experts), dtype=bool), k=1)
    for _ in range(max_moves):
        before, inner, after = path[:-2], path[1:-1], path[2:]
        kept = padded_weights[before, inner]  # edge into position i, for i = 1..E
        gains = (
            padded_weights[np.ix_(before, inner)]  # new edge: before(i) - inner(j)
            + padded_weights[np.ix_(inner, after)]  # new edge: inner(i) - after(j)
            - kept[:, None]
            - padded_weights[inner, after][None, :]
        )
        gains[~upper] = 0.0
        i, j = np.unravel_index(np.argmax(gains), gains.shape)
        if gains[i, j] <= 1e-9:
            break
        path[i + 1 : j + 2] = path[i + 1 : j + 2][::-1].copy()
    return path[1:-1].copy()
