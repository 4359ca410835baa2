"""How much of a task's routing a profile keeps: retained gate mass and selection coverage.

retained gate mass = gate weight the trace sends to kept experts / all its gate weight;
selection coverage = share of the trace's (token, layer, k) selections that hit kept experts.
"""

from __future__ import annotations

import numpy as np

from ..trace import Trace
from .importance import gate_mass
from .profile import PruningProfile


def profile_figures(profile: PruningProfile, trace: Trace) -> dict:
    profile.check_shape(trace.num_layers, trace.num_experts, trace.top_k)
    mask = profile.keep_mask()
    mass = gate_mass(trace)
    kept = mask[np.arange(trace.num_layers)[None, :, None], trace.expert_ids.astype(np.int64)]  # [T, L, K]
    per_layer = (mass * mask).sum(axis=1) / np.maximum(mass.sum(axis=1), 1e-12)
    return {
        "task": profile.task,
        "kept_share": profile.kept_share(),
        "retained_gate_mass": float((mass * mask).sum() / mass.sum()),
        "selection_coverage": float(kept.mean()),
        "per_layer_retained_gate_mass": [float(x) for x in per_layer],
    }
