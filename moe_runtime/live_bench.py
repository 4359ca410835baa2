"""`bench --live`: the real engine on a trace's real routing at a real model's shape, beside the
simulator's figures for the same routing, with timing constants measured in the same run.

preset architecture (or the trace's shape) / --scale -> a random-weight bf16 checkpoint, built
once into the cache -> from_pretrained(budget, policy, host_budget) on the CPU -> the trace's
routing replayed (routing_replay.py) while the first N tokens of its sequences decode one at a
time with a KV cache -> measured ms/token, loads, hit rate, stalls, disk bytes -> the simulator
replays the same tokens with the same policy and capacity, its clock set from constants measured
here: the ms one demand load takes through the engine, and the ms per MoE layer of the same
decode with every expert resident (so nothing but the misses differs).
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from .atomic import staging_directory
from .budget import format_bytes
from .bench import policy_for
from .embedded import cache_root
from .expert_format import format_size_ratio
from .hf_cache import cache_keyword
from .inspection import describe_model_dir
from .policies import DEFAULT_POLICY
from .random_checkpoint import write_random_checkpoint
from .routing_replay import replay_routing
from .simulator import TimingModel, replay
from .tiny_models import expert_fields, tiny_config, tiny_model
from .trace import Trace

RESIDENT_SHARE_OF_RAM = 0.7  # the resident pass of measure_constants runs when the experts fit in this share


@dataclass(frozen=True)
class Arch:
    """A real MoE's shape: what the live bench builds (hidden sizes divided by --scale)."""

    family: str
    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    dense_layers: int = 0  # leading dense decoder layers (DeepSeek's first_k_dense_replace)
    extra: dict = field(default_factory=dict)  # other widths, divided by the scale too

    def config(self, scale: int) -> dict:
        hidden = max(16, int(self.hidden / scale) // 16 * 16)
        overrides = {
            "hidden_size": hidden,
            "num_hidden_layers": self.moe_layers + self.dense_layers,
            **expert_fields(self.family, num_experts=self.experts, intermediate_size=max(8, round(self.expert_intermediate / scale)), top_k=self.top_k),
        }
        overrides.update({name: (max(8, round(value / scale)) if name.endswith("_size") else value) for name, value in self.extra.items()})
        return overrides


ARCHES = {
    "deepseek-v2-lite": Arch("deepseek_v2", 26, 64, 6, 2048, 1408, dense_layers=1, extra={"intermediate_size": 10944, "n_shared_experts": 2, "first_k_dense_replace": 1}),
    "gpt-oss-20b": Arch("gpt_oss", 24, 32, 4, 2880, 2880),
    "mixtral-8x7b": Arch("mixtral", 32, 8, 2, 4096, 14336),
    "qwen3-30b-a3b": Arch("qwen3_moe", 48, 128, 8, 2048, 768),
    "olmoe-1b-7b": Arch("olmoe", 16, 64, 8, 2048, 1024),
}
MODEL_TYPES = {"deepseek_v2": "deepseek-v2-lite", "gpt_oss": "gpt-oss-20b", "mixtral": "mixtral-8x7b", "qwen3_moe": "qwen3-30b-a3b", "olmoe": "olmoe-1b-7b"}


def arch_for(trace: Trace, name: str | None) -> str:
    """`name`, else the preset of the trace's model_type, else the preset of its (L, E, K)."""
    if name is not None:
        if name not in ARCHES:
            raise ValueError(f"unknown --arch {name!r}; choose one of {', '.join(ARCHES)}")
        chosen = name
    elif trace.model_type in MODEL_TYPES:
        chosen = MODEL_TYPES[trace.model_type]
    else:
        shape = (trace.num_layers, trace.num_experts, trace.top_k)
        chosen = next((n for n, a in ARCHES.items() if (a.moe_layers, a.experts, a.top_k) == shape), None)
        if chosen is None:
            raise ValueError(f"no preset has the trace's (L, E, K) = {shape}; pass --arch and a trace of that shape")
    arch = ARCHES[chosen]
    if (arch.moe_layers, arch.experts, arch.top_k) != (trace.num_layers, trace.num_experts, trace.top_k):
        raise ValueError(
            f"--arch {chosen} routes (L, E, K) = {(arch.moe_layers, arch.experts, arch.top_k)}, the trace "
            f"{(trace.num_layers, trace.num_experts, trace.top_k)}: replay a trace of that model"
        )
    return chosen


def checkpoint_for(name: str, scale: int) -> Path:
    """The random-weight bf16 checkpoint of preset `name` at `scale`, built once (atomically);
    refused before any work when the disk cannot hold it. One that would take more than half
    of the available RAM is written a MoE layer at a time (random_checkpoint.py)."""
    target = cache_root() / "live" / f"{name}-scale{scale}"
    if (target / "config.json").is_file():
        return target
    arch = ARCHES[name]
    needed = checkpoint_bytes(arch, scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise OSError(
            f"the {name} checkpoint at --scale {scale} takes {format_bytes(needed)}, {target.parent} has {format_bytes(free)} free: "
            f"pass a larger --scale (hidden sizes divided by it)"
        )
    with staging_directory(target, "live bench checkpoint", legacy=lambda folder: (folder / "config.json").is_file()) as staging:
        if needed > psutil.virtual_memory().available // 2:
            write_random_checkpoint(tiny_config(arch.family, **arch.config(scale)), staging)
        else:
            tiny_model(arch.family, dtype=torch.bfloat16, **arch.config(scale)).save_pretrained(staging)
    return target


def checkpoint_bytes(arch: Arch, scale: int) -> int:
    """The bf16 bytes of the preset's weights at `scale` (counted on the meta device)."""
    config = tiny_config(arch.family, **arch.config(scale))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 2 * sum(parameter.numel() for parameter in model.parameters())


def first_tokens(trace: Trace, tokens: int) -> Trace:
    """The first `tokens` tokens of the trace's sequences, in order (the last one cut short)."""
    lengths = np.minimum(np.diff(trace.seq_offsets), np.maximum(0, tokens - trace.seq_offsets[:-1]))
    lengths = lengths[lengths > 0]
    end = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Trace(trace.expert_ids[:end], trace.gate_weights[:end], offsets, trace.num_experts, trace.top_k, model_type=trace.model_type)


def decode(model, part: Trace) -> float:
    """Decode every token of `part` one at a time (a fresh KV cache per sequence) with its
    routing replayed; returns the wall seconds."""
    ids = torch.randint(3, model.config.vocab_size, (part.num_tokens,), generator=torch.Generator().manual_seed(0))
    keyword = cache_keyword(model)
    started = time.perf_counter()
    with torch.no_grad(), replay_routing(model, part):
        for begin, end in zip(part.seq_offsets[:-1], part.seq_offsets[1:]):
            past = DynamicCache(config=model.config)
            for position in range(int(begin), int(end)):
                model(input_ids=ids[position : position + 1][None], **{keyword: past}, use_cache=True)
    return time.perf_counter() - started


@dataclass
class LiveRow:
    trace: str
    arch: str
    scale: int
    quantize: str  # the experts' format: "none", "int8", "int4-g64", ...
    policy: str
    budget: float
    tokens: int
    measured_ms_per_token: float
    simulated_ms_per_token: float | None  # None when the clock's layer time could not be measured (see measure_constants)
    measured_loads_per_token: float
    simulated_loads_per_token: float
    hit_rate: float
    stall_ms_per_token: float
    disk_bytes_per_token: float


def uncache(model) -> None:
    """Emulate a store much larger than RAM: its pages leave the page cache now and after every
    read, so each miss is read from the disk (dirty pages are written back first)."""
    import moe_runtime

    os.sync()
    disk = getattr(moe_runtime.runtime_of(model).source, "disk", None)  # none when every expert is in RAM
    files = getattr(disk, "files", None) or getattr(getattr(disk, "checkpoint", None), "files", ())  # a store's, or the checkpoint's
    for file in files:
        file.uncached_reads = True
        file.drop_cached_pages()


def measure_constants(path: Path, part: Trace, host_budget, *, uncached: bool = False, **options) -> dict:
    """The simulator's clock on this machine: the ms per MoE layer of `part`'s decode with every
    expert resident (a second pass after a first one loaded them all; None when the experts do
    not fit in the available RAM, and then nothing is simulated), and the ms one demand load
    takes through the engine (queue, workers, store read or RAM, hand-over), timed on a separate
    runtime with the same host budget and K slots loading K cold experts per layer step, as a
    decode step does (the workers read them side by side: the per-load figure is a layer's wall
    time / K). uncached, options (quantize, store_dir): as the rows run."""
    shape = describe_model_dir(path)
    held = shape["total_expert_bytes"] * format_size_ratio(options.get("quantize"))
    layer_ms = None
    if held < RESIDENT_SHARE_OF_RAM * psutil.virtual_memory().available:
        seconds = with_model(path, lambda model: (decode(model, part), decode(model, part))[1], budget=1.0, host_budget=1.0, **options)
        layer_ms = seconds / part.num_tokens / shape["num_moe_layers"] * 1e3
    budget = part.top_k * shape["bytes_per_expert"]
    load_ms, per_expert = with_model(path, lambda model: _time_loads(model, part.top_k, uncached), budget=budget, host_budget=host_budget, **options)
    return {"layer_ms": layer_ms, "load_ms": load_ms, "bytes_per_expert": per_expert}


def _time_loads(model, top_k: int, uncached: bool) -> tuple[float, int]:
    """(ms per demand load, bytes per expert): K cold experts per layer step, the second of two
    rounds timed."""
    import moe_runtime

    if uncached:
        uncache(model)
    runtime = moe_runtime.runtime_of(model)
    blocks, cache = len(runtime.blocks), runtime.cache
    step = list(range(0, cache.core.num_experts, max(1, cache.core.num_experts // top_k)))[:top_k]
    for _ in range(2):  # the second round is timed: its buffers are recycled ones, as in a long decode
        started = time.perf_counter()
        for layer in range(blocks):  # a layer step's misses go to the loader together, as in a decode
            cache.acquire(layer, step)
            cache.release(layer, step)
    return (time.perf_counter() - started) / (blocks * len(step)) * 1e3, runtime.pool.bytes_per_slot


def with_model(path: Path, work, **options):
    """work(model) on from_pretrained(path, device="cpu", **options); then the runtime stops and
    the model is collected. (unwrap would read every expert back into RAM: at full width more
    than the machine has.)"""
    import moe_runtime

    model = moe_runtime.from_pretrained(path, device="cpu", **options)
    try:
        return work(model)
    finally:
        moe_runtime.runtime_of(model).close()
        del model
        gc.collect()


def decode_row(part: Trace, uncached: bool, model) -> tuple:
    """(seconds, stats, expert format, disk reads, slots) of `part` decoded on `model`."""
    import moe_runtime

    runtime = moe_runtime.runtime_of(model)
    expert_format = runtime.source.spec.format.name
    if runtime.low_bit is not None:
        expert_format += f", misses {runtime.low_bit.spec.format.name}"
    if uncached:
        uncache(model)
    seconds = decode(model, part)
    return seconds, moe_runtime.stats(model), expert_format, getattr(runtime.source, "disk_reads", 0), runtime.num_slots


def run_live(
    name: str, trace: Trace, *, arch: str | None, scale: int, tokens: int, budgets, policy: str, host_budget=0, store_dir=None,
    quantize: str | None = None, uncached: bool = False, miss_precision: str | None = None,
) -> dict:
    """Measured against simulated rows, one per budget, and the constants measured.
    host_budget: RAM for cold experts (default 0: every miss read from the store on disk).
    quantize: hold the experts as int8 / int4 (in a store beside the checkpoint unless store_dir).
    uncached: every read of the experts from the disk, never the page cache (see `uncache`).
    miss_precision: misses computed from low-bit copies in RAM (the rows only: the simulator's
    columns and the constants stay those of loading every miss, the baseline it is measured against)."""
    preset = arch_for(trace, arch)
    path = checkpoint_for(preset, scale)
    if quantize is not None and store_dir is None:
        store_dir = path.parent / f"{path.name}-{quantize}-store"
    options = {"quantize": quantize, "store_dir": store_dir}
    part = first_tokens(trace, tokens)
    constants = measure_constants(path, part, host_budget, uncached=uncached, **options)
    expert_mb = constants["bytes_per_expert"] / 1e6
    timing = TimingModel(expert_mb=expert_mb, h2d_gbps=expert_mb / constants["load_ms"], layer_ms=constants["layer_ms"] or 0.0)
    rows = []
    live_policy = DEFAULT_POLICY if policy == "default" else policy
    for budget in budgets:
        seconds, counters, expert_format, disk_reads, capacity = with_model(
            path, functools.partial(decode_row, part, uncached), budget=budget, host_budget=host_budget, policy=live_policy,
            miss_precision=miss_precision, **options,
        )
        disk_bytes = disk_reads * constants["bytes_per_expert"]
        simulated = replay(part, policy_for(policy, part, capacity, None), capacity, timing=timing)
        n = part.num_tokens
        rows.append(LiveRow(
            name, preset, scale, expert_format, policy, budget, n, seconds / n * 1e3,
            None if constants["layer_ms"] is None else simulated.total_ms / n, counters["loads"] / n,
            simulated.loads / n, counters["hit_rate"], counters["stall_seconds"] / n * 1e3, disk_bytes / n,
        ))
    return {"live": [asdict(row) for row in rows], "constants": constants}
