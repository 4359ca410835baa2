"""Apply a profile to a live model: routers choose only among kept experts.

A forward hook on each router replaces its (weights, index) by the family's own top-k rule
applied to its logits with pruned experts at -inf (adapter.select), so the top-k is renormalised
the way the family normalises. With `auto`, the first request runs unpruned, its first N tokens'
routing picks the closest stored profile (retrieval.py), and the mask applies from then on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..adapters import MoEAdapter, MoEBlock
from .profile import PruningProfile
from .retrieval import match_sequence

AUTO_TOKENS = 16  # tokens of the first request used to choose a profile


class RouterMask:
    """Router hooks enforcing a profile (or, with candidates, the one the first request picks)."""

    def __init__(self, adapter: MoEAdapter, blocks: list[MoEBlock], profile: PruningProfile | None, candidates: Sequence[PruningProfile] = ()):
        self.adapter, self.blocks = adapter, blocks
        self.candidates = list(candidates)
        self.profile: PruningProfile | None = None
        self.keep: list[torch.Tensor] | None = None
        self.match_scores: dict | None = None
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []  # auto: first request's routing per layer
        self._handles = []
        if profile is not None:
            self.apply(profile)

    def attach(self) -> None:
        """Hook the routers (the runtime does this on install, once every check has passed)."""
        self._handles = [block.router.register_forward_hook(self._hook(block.moe_index)) for block in self.blocks]

    def apply(self, profile: PruningProfile) -> None:
        mask = torch.as_tensor(profile.keep_mask())
        device = next(self.blocks[0].router.parameters()).device
        self.keep = [mask[layer].to(device) for layer in range(len(self.blocks))]
        self.profile = profile

    def _hook(self, layer: int):
        def choose(router, inputs, output):
            logits = output[0]
            if self.keep is None:
                self._remember(layer, output)
                return output
            weights, index = self.adapter.select(router, logits, self.keep[layer].to(logits.device))
            return logits, weights, index

        return choose

    def _remember(self, layer: int, output) -> None:
        """auto: collect the first request's routing; after its last layer, pick a profile."""
        if not self.candidates:
            return
        _, weights, index = output
        rows = min(AUTO_TOKENS, index.shape[0])
        self._seen.append((index[:rows].cpu().numpy(), weights[:rows].detach().float().cpu().numpy()))
        if layer == len(self.blocks) - 1:
            ids = np.stack([ids for ids, _ in self._seen], axis=1)
            gates = np.stack([gate for _, gate in self._seen], axis=1)
            task, self.match_scores = match_sequence(self.candidates, ids, gates)
            self.apply(next(p for p in self.candidates if p.task == task))
            self._seen = []

    def kept_experts(self) -> int | None:
        return None if self.profile is None else int(self.profile.keep_mask().sum())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
