"""moe-runtime: run Mixture-of-Experts models on GPUs (or CPUs) that cannot hold all their experts.

    model = moe_runtime.wrap(model, budget="4GiB")            # or a fraction of all experts: 0.25
    model = moe_runtime.from_pretrained(path, budget=0.25)   # experts stay on disk / in host RAM
    moe_runtime.stats(model)                                  # hits, misses, loads, stalls, per layer
    with moe_runtime.replay_routing(model, trace): ...        # route as a recorded trace says
    with moe_runtime.record_routing(model) as log: ...        # record the routing served: log.trace()
"""

from .adapters import SUPPORTED_MODEL_TYPES, adapter_for
from .runtime.assembly import reset_stats, runtime_of, stats, unwrap, wrap
from .config import OffloadConfig
from .errors import InvalidFileError, OutputPathError
from .pretrained import from_pretrained
from .recording import record_trace
from .routing_log import record_routing
from .routing_replay import replay_routing
from .trace import Trace, load_trace, load_traces, merge_traces

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "InvalidFileError",
    "OffloadConfig",
    "OutputPathError",
    "Trace",
    "adapter_for",
    "from_pretrained",
    "load_trace",
    "load_traces",
    "merge_traces",
    "record_routing",
    "record_trace",
    "replay_routing",
    "reset_stats",
    "runtime_of",
    "stats",
    "unwrap",
    "wrap",
]
