"""Run in a fresh process: from_pretrained a large checkpoint with a small host tier, report RSS.

Prints one JSON object: the peak RSS after importing the libraries a model needs (baseline),
the peak RSS after loading and generating, and the model's byte counts.
"""

import json
import resource
import sys

import torch
from transformers import AutoModelForCausalLM  # noqa: F401 - part of the baseline
from transformers.models.mixtral import modeling_mixtral  # noqa: F401 - part of the baseline

import moe_runtime
from moe_runtime.inspection import describe_model_dir


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


path, host_budget = sys.argv[1], sys.argv[2]
info = describe_model_dir(path)
baseline = peak_rss()
model = moe_runtime.from_pretrained(path, budget=2 * info["bytes_per_expert"], device="cpu", host_budget=host_budget)
with torch.no_grad():
    model.generate(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]]), max_new_tokens=4, do_sample=False)
counters = moe_runtime.stats(model)
print(
    json.dumps(
        {
            "baseline_rss": baseline,
            "peak_rss": peak_rss(),
            "non_expert_bytes": info["non_expert_bytes"],
            "total_expert_bytes": info["total_expert_bytes"],
            "slot_pool_bytes": counters["slot_pool_bytes"],
            "loads": counters["loads"],
        }
    )
)
