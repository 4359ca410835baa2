"""Least recently used: evict the resident expert whose last use is oldest.

A prefill's tokens count as if decoded one by one (on_prompt): an expert last used at prompt
token t of layer l is as recent as decoding would have left it, after every expert of token t at
an earlier layer and before those of token t + 1. The cache sees a prefill step as each layer's
union of experts, loaded and used in one pass; ordered by that pass, the last layers' unions all
look newer than anything the first layers' last tokens used, and at the first decode tokens LRU
evicts the first layers' experts just before each is needed again (BENCHMARKS.md, "Prompts
taken as decoded").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .base import EvictionPolicy, NoVictimError
from .next_use import PromptSummary, summarize_prompt

Stamp = tuple[int, int, int]  # when a key was last used: (token, layer step, use); tuples order as decoding would
BEFORE_THIS_TOKEN: Stamp = (-1, -1, -1)  # the stamp of a key untouched since the token's forward began: older than any


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, num_experts: int | None = None) -> None:
        """num_experts: keys are layer * num_experts + expert; without it a prompt's experts cannot
        be told apart by key, and a prefill is ordered as the cache used its experts."""
        self.num_experts = num_experts
        self._order: OrderedDict[int, None] = OrderedDict()  # resident keys, least recently used first
        self._token, self._layer, self._uses = 0, -1, 0  # the clock: a new token at a layer step not after the last one
        self._next_token = 1  # the next token's number: after a prefill of T tokens, the one after its last
        self._prompt_token: dict[int, int] = {}  # this layer step's prompt keys -> the prompt token of their last use
        self._stamps: dict[int, Stamp] | None = None  # once a prompt came in this token's forward: the keys it touched since

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        if layer <= self._layer:
            self._token, self._next_token = self._next_token, self._next_token + 1
            self._stamps = None
        self._layer = layer
        if self._prompt_token:  # a prompt's, until the next layer step (no new dict at every step)
            self._prompt_token = {}

    def on_prompt(self, layer: int, routing) -> None:
        """Each expert of the prompt's [B, T, K] tokens at `layer` (rows aligned by token) is as
        recent as its last use among them: the resident ones now, the others as the step loads them."""
        if self.num_experts is not None:
            self.learn_prompt(layer, summarize_prompt(routing, self.num_experts))

    def learn_prompt(self, layer: int, summary: PromptSummary) -> None:
        """on_prompt from the prompt's summary at `layer` (each expert's tokens idle since its last use)."""
        low, tokens = layer * self.num_experts, summary.tokens
        self._prompt_token = {low + expert: self._token + tokens - 1 - idle for expert, idle in enumerate(summary.idle.tolist()) if idle < tokens}
        self._next_token = max(self._next_token, self._token + tokens)
        if self._stamps is None:
            self._stamps = {}
        for key in self._prompt_token:  # in key order, as the compiled twin (candidates.cpp)
            if key in self._order:
                self._touch(key)

    def _touch(self, key: int) -> None:
        """`key` used in a forward that brought a prompt: stamp it (a prompt's key at its last use
        in the prompt) and place it before the keys stamped later (those of later prompt tokens at
        earlier layers), walking from the newest end; a key the forward has not touched is older
        than any it has, and ends the walk."""
        order = self._order
        self._uses += 1
        stamp = (self._prompt_token.get(key, self._token), self._layer, self._uses)
        stamps = self._stamps
        stamps[key] = stamp
        order.pop(key, None)
        later = []
        for other in reversed(order):
            if stamps.get(other, BEFORE_THIS_TOKEN) < stamp:
                break
            later.append(other)
        order[key] = None
        for other in reversed(later):
            order.move_to_end(other)

    def on_insert(self, key: int) -> None:
        if self._stamps is None:  # the common case, inline: this is every expert use's bookkeeping
            self._order[key] = None
            self._order.move_to_end(key)
        else:
            self._touch(key)

    def on_access(self, key: int) -> None:
        if self._stamps is None:
            self._order.move_to_end(key)
        else:
            self._touch(key)

    def on_evict(self, key: int) -> None:
        del self._order[key]
        if self._stamps is not None:
            self._stamps.pop(key, None)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        for key in self._order:
            if is_evictable(key):
                return key
        raise NoVictimError("every resident expert is protected")

    def order(self) -> list[int]:
        """Resident keys, least recently used first (for tests and inspection)."""
        return list(self._order)
