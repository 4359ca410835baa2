"""Task-conditioned expert pruning: importance from traces, keep plans, profiles, retrieval, masks.

    profile = make_profile(trace, "law", keep=0.5); profile.save("profiles/law.json")
    model = moe_runtime.wrap(model, budget=0.25, profile="profiles/law.json")
"""

from __future__ import annotations

import os
from pathlib import Path

from .evaluation import profile_figures
from .importance import METHODS, task_importance
from .masking import RouterMask
from .plan import keep_plan
from .profile import PruningProfile, load_profile, make_profile
from .retrieval import match_trace


def load_profiles(directory: str | os.PathLike) -> list[PruningProfile]:
    """Every profile (*.json) in a folder."""
    paths = sorted(Path(directory).glob("*.json"))
    if not paths:
        raise ValueError(f"no profiles (*.json) in {directory}")
    return [load_profile(path) for path in paths]


__all__ = [
    "METHODS",
    "PruningProfile",
    "RouterMask",
    "keep_plan",
    "load_profile",
    "load_profiles",
    "make_profile",
    "match_trace",
    "profile_figures",
    "task_importance",
]
