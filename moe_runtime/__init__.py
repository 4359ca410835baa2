"""moe-runtime: run Mixture-of-Experts models on GPUs (or CPUs) that cannot hold all their experts."""

from .adapters import SUPPORTED_MODEL_TYPES, adapter_for
from .recording import record_trace
from .trace import Trace, load_trace, load_traces, merge_traces

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Trace",
    "adapter_for",
    "load_trace",
    "load_traces",
    "merge_traces",
    "record_trace",
]
