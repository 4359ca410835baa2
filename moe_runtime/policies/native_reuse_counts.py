"""The counting passes of next-use's fit compiled (reuse_fit.cpp, in the candidates' extension).

The adaptive default refits its learning candidate on the routing it serves; numpy's passes
over 2048 tokens of DeepSeek-V2-Lite routing (26 x 64 experts) take about half a second on the
2-core EPYC of BENCHMARKS.md, these about a seventh of it, which is what lets refits come every
few dozen tokens (routing_history.py). They give numpy's numbers exactly: the counts are
integers and the transition forecasts fp32 sums in numpy's order, so ReuseModel.fit returns the
same model bit for bit from either (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from ..trace import Trace
from .native_candidates import extension
from .next_use import AGE_CAP, WAIT_VALUES, WINDOW, transition_table


class CompiledReuseCounts:
    """next_use.ReuseCounts' interface over reuse_fit.cpp."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.routing = extension().Routing(torch.from_numpy(np.ascontiguousarray(trace.expert_ids)), trace.num_experts)  # read once for the four passes
        self.offsets = torch.from_numpy(np.ascontiguousarray(trace.seq_offsets, dtype=np.int64))

    def popularity(self) -> np.ndarray:
        return extension().use_counts(self.routing).numpy() / self.trace.num_tokens

    def transitions(self) -> np.ndarray:
        counts, seen = extension().transition_counts(self.routing, self.offsets)
        return transition_table(counts.numpy(), seen.numpy(), self.trace.top_k)

    def forecast(self, transitions: np.ndarray) -> np.ndarray:
        return extension().transition_forecasts(self.routing, torch.from_numpy(transitions)).numpy()

    def cell_sums(self, bucket: np.ndarray, forecast: np.ndarray | None, edges: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        total, count = extension().cell_sums(
            self.routing, self.offsets, torch.from_numpy(np.ascontiguousarray(bucket, dtype=np.int64)),
            torch.zeros(0) if forecast is None else torch.from_numpy(forecast), torch.from_numpy(np.asarray(edges, dtype=np.float64)), shape[0],
            shape[3], AGE_CAP, WINDOW, torch.from_numpy(WAIT_VALUES),
        )
        return total.numpy(), count.numpy()
