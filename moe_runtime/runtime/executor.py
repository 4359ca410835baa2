"""The executor: what one wrapped model runs per MoE layer (assembly.py builds and installs it).

Per MoE layer: the model's router runs -> run_layer(layer, x, top_k_index, top_k_weights) ->
distinct experts -> [hybrid: the misses the cost model gives the CPU; miss_precision: every
miss, computed from its low-bit copy] -> waves of at most S of the rest -> slot cache acquire
(hits in place, misses loaded) -> while loads fly: the CPU's share and the prefetches for the
next layers -> GEMMs from the slots -> release -> out.

The slots are a device pool (execution "device" and "hybrid") or, in place on a CPU ("host"),
references to the experts' host tensors (host_slots.py): the same cache either way.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from dataclasses import asdict

import numpy as np
import psutil
import torch
from torch import nn

from .. import huge_pages
from ..adapters import ExpertLayout, MoEAdapter, MoEBlock
from ..budget import format_bytes, slots_for_budget
from ..expert_format import ExpertFormat
from .slot_cache import SlotCache
from ..compute import LOOP, NATIVE_LAYER, TRITON, choose_kernel_path, choose_path, experts_from_slots, experts_in_place, plain_swiglu
from ..config import OffloadConfig
from ..decode_attention import install_decode_attention
from ..decode_layer import install_decode_layers
from ..kernel_routers import install_kernel_routers
from ..native_norms import install_native_norms
from ..execution import HOST, HYBRID, measure_costs, resolve_execution
from .host_slots import HostSlots
from .expert_loader import Loader
from .forward_shape import ForwardShape, ForwardShapes
from ..offloaded import OffloadedExperts
from .. import wrapped_model
from ..policies import DEFAULT_POLICY, make_policy
from ..prefetch_gate import PrefetchGate
from .slot_pool import SlotPool
from ..stats import RuntimeStats
from ..host_tier import ExpertSource, HostTier, RamSource

RUNTIME_ATTR = "_moe_runtime"
CLOSE_TIMEOUT_SECONDS = 30.0  # unwrap waits this long for loads in flight, then names the stuck one


class Runtime:
    """Everything one wrapped model needs: slot pool, cache, loader, source of cold experts."""

    __deepcopy__ = wrapped_model.refuse_copy("copying")
    __reduce_ex__ = wrapped_model.refuse_copy("pickling")

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        blocks: list[MoEBlock],
        source: ExpertSource,
        config: OffloadConfig,
        *,
        home_device: torch.device = torch.device("cpu"),
        forecaster=None,
        mask=None,
        pinned: list[int] = (),
        transient: list[int] = (),
        dense=None,
        low_bit: ExpertSource | None = None,
    ):
        """config: the options, with the device resolved; forecaster, mask, pinned and transient
        come from its predictor, profile and placement plan, dense (KernelLinears) from its
        quantize_rest or exact=False, low_bit (every expert's low-bit copy in RAM) from its
        miss_precision (see build_runtime)."""
        device = config.device
        self.adapter = adapter
        self.blocks = blocks
        self.source = source
        self.device = device
        self.home_device = home_device  # where the model's weights were before wrap
        self.num_experts = blocks[0].num_experts
        self.top_k = blocks[0].top_k
        self.layout = ExpertLayout.of(blocks[0].experts)
        self.gates = [block.experts._apply_gate for block in blocks]
        self.swiglu = plain_swiglu(self.layout, getattr(blocks[0].experts, "act_fn", None))  # the CPU kernel may gate between its products
        self.mask = mask  # a pruning profile's router mask, or None
        routed = (mask.kept_experts() if mask else None) or len(blocks) * self.num_experts
        # Every check before anything starts (loader threads, slot memory).
        self.num_slots = slots_for_budget(config.budget, source.spec.nbytes, routed, self.top_k)
        self.execution = resolve_execution(config.execution, device, config.kernel)
        in_place = self.execution == HOST
        policy = make_policy(
            _policy_for(config, in_place and low_bit is None, source), num_layers=len(blocks), num_experts=self.num_experts, capacity=self.num_slots,
            top_k=self.top_k, fit=config.policy_fit,
        )
        pinned = sorted(set(pinned) | set(getattr(policy, "pinned", ())))  # a plan's, and a pinned policy's own
        if len(pinned) + self.top_k > self.num_slots:
            raise ValueError(
                f"the placement pins {len(pinned)} experts but the budget holds {self.num_slots}: "
                f"short by {len(pinned) + self.top_k - self.num_slots} slots (pinned + top-k must fit)"
            )
        spec = source.spec
        self.compute_path = LOOP if in_place else choose_kernel_path(config.kernel, device, spec, self.layout, getattr(blocks[0].experts, "act_fn", None))
        self.fallback_path = choose_path(device, spec)  # for multi-wave layers on the Triton path
        self.pool = HostSlots(spec, self.num_slots) if in_place else SlotPool(spec, self.num_slots, device)
        weighs_loads = not in_place and (self.execution == HYBRID or forecaster is not None)  # hybrid splits, gated prefetches
        measured = measure_costs(source, self.pool, self.layout, self.gates[0]) if weighs_loads else None
        self.costs = measured if self.execution == HYBRID else None
        # Prefetches over a copy engine are gated by their expected value (in place from RAM a
        # load is a pointer move: nothing to weigh); layer_ms is kept measured as layers run.
        self.prefetch_gate = PrefetchGate(load_ms=measured.load_ms, layer_ms=measured.device_ms) if measured and forecaster else None
        self._layer_started = None
        if in_place and isinstance(source, HostTier):  # buffers for the misses the tier cannot keep, touched now
            source.reserve(min(self.num_slots, max(0, len(blocks) * self.num_experts - source.capacity)))
        self.stats = RuntimeStats(len(blocks))
        self.loader = Loader(source, self.pool)
        self.cache = SlotCache(
            num_experts=self.num_experts, num_slots=self.num_slots, policy=policy, loader=self.loader, stats=self.stats, pinned=pinned,
            transient=transient,
        )
        self.forecaster = forecaster
        self.dense = dense
        self.exact = config.exact_decode()
        self.decode_attention = []  # DecodeAttention per attention module, installed on a CPU
        self.native_norms = []  # NativeNorm per RMS norm module the native op reproduces, on a CPU
        self.kernel_routers = []  # KernelRouter per router, on a CPU where not exact
        self.decode_layers = []  # DecodeLayer per llama-form decoder layer, on a CPU
        self.low_bit = low_bit
        self.prefetch_width = config.prefetch_width or self.top_k
        self.prefetch_lookahead = config.prefetch_lookahead
        self.stats.info = {
            "execution": self.execution,
            "hybrid_costs_ms": None if self.costs is None else asdict(self.costs),
            "compute_path": self.compute_path,
            "device": str(device),
            "num_slots": self.num_slots,
            "slot_pool_bytes": self.pool.nbytes,
            "bytes_per_expert": self.pool.bytes_per_slot,
            "expert_format": spec.format.name,
            "dense_format": dense.fmt.name if dense else None,
            "miss_precision": low_bit.spec.format.name if low_bit else None,
            "policy": self.cache.policy.name,
            "policy_fit_tokens": None if config.policy_fit is None else config.policy_fit.num_tokens,  # the trace it started from
            "host_tier": type(source).__name__,
            "predictor": forecaster.predictor.name if forecaster else None,
            "prefetch": f"top {self.prefetch_width} x {self.prefetch_lookahead} layer(s) ahead" if forecaster else None,
        }
        self.lock = threading.RLock()  # one MoE layer (or stats read) at a time; see run_layer
        self.routing_log = None  # a RoutingLog while record_routing runs (routing_log.py)
        self.forwards = ForwardShapes(self._forward_started)  # each forward's batch size, from a hook on the model
        self._closer = weakref.finalize(self, Loader.close, self.loader)

    # ------------------------------------------------------------------ forward
    def run_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output [T, H] for one MoE layer, computed through the slot pool.

        One layer at a time per runtime (`lock`): forwards from several threads interleave
        layer by layer, each getting exactly its own output; the cache, forecaster and stats
        are only ever changed under the lock.
        """
        with self.lock:
            if self.prefetch_gate is not None:
                self._time_layers()
            out = self._run_layer(layer, hidden, top_k_index, top_k_weights)
            if self.routing_log is not None:  # once the layer is done: a forward that fails is no token of the log's
                self.routing_log.add(layer, top_k_index, top_k_weights)
            return out

    def _forward_started(self, shape: ForwardShape) -> None:
        if self.routing_log is not None:
            self.routing_log.begin_forward()

    def experts_where_they_lie(self) -> RamSource | None:
        """The source whose tensors a decode row's experts can be computed from before the cache
        accounts for them (`account_in_place`), or None where the cache decides what is
        computed: in place on a CPU from every expert in RAM, with no low-bit copies for misses,
        no forecaster's prefetches and no pruning profile's mask."""
        in_ram = type(self.source) is RamSource
        plain = self.low_bit is None and self.costs is None and self.forecaster is None and self.mask is None
        return self.source if self.execution == HOST and self.device.type == "cpu" and in_ram and plain else None

    def account_in_place(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """The cache's and the stats' account of a decode row of MoE layer `layer` whose experts
        [1, K] were computed where they lie with gate weights [1, K] (layer_front.py; see
        experts_where_they_lie), as `_run_layer` keeps it: the same calls on the cache in the
        same order (one wave: a row's top-k experts always fit beside the pinned ones), and the
        routing log's; stats()["compute_calls"] counts the step as NATIVE_LAYER's."""
        with self.lock:
            needed = list(dict.fromkeys(top_k_index.flatten().tolist()))
            self.cache.start_layer(layer, needed)
            self.cache.begin_acquire(layer, needed)
            try:
                self.cache.finish_acquire(layer, needed)
                self.stats.paths[NATIVE_LAYER] = self.stats.paths.get(NATIVE_LAYER, 0) + 1
            finally:
                self.cache.release(layer, needed, None)
            if self.routing_log is not None:
                self.routing_log.add(layer, top_k_index, top_k_weights)

    def _time_layers(self) -> None:
        """Keep the prefetch gate's layer time measured: the decayed mean time between the
        starts of consecutive MoE layers (gaps over 100 ms, between requests, are skipped)."""
        now = time.perf_counter()
        if self._layer_started is not None and now - self._layer_started < 0.1:
            gate = self.prefetch_gate
            gate.layer_ms = 0.9 * gate.layer_ms + 0.1 * (now - self._layer_started) * 1e3
        self._layer_started = now

    def _run_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # The layer's distinct experts in the router's order (a decode step: highest weight first),
        # the order the simulator replays a trace in. tolist() is this layer's one host sync.
        routed = top_k_index.flatten().tolist()
        needed = list(dict.fromkeys(routed))
        self.cache.start_layer(layer, needed)
        self._tell_prompt(layer, routed, top_k_index.shape[0])
        if self.forecaster is not None:
            self.forecaster.observe(layer, top_k_index, top_k_weights, hidden)
        on_host = self._host_share(layer, needed, routed) if self.costs is not None or self.low_bit is not None else []
        on_device = [e for e in needed if e not in on_host] if on_host else needed
        waves = self.cache.core.waves(layer, on_device)
        self.stats.layers[layer].waves += max(0, len(waves) - 1)
        out = None
        for number, wave in enumerate(waves):
            slots = self.cache.begin_acquire(layer, wave)
            try:  # whatever happens in compute (OOM, an interrupt), the wave's experts are released
                if number == 0:
                    out = self._while_loading(layer, on_host, hidden, top_k_index, top_k_weights)
                self.cache.finish_acquire(layer, wave)
                part = self._compute_wave(layer, wave, slots, hidden, top_k_index, top_k_weights, single=len(waves) == 1 and not on_host)
            finally:
                self.cache.release(layer, wave, self._compute_done())
            out = part if out is None else out + part
        if not waves:  # hybrid: the CPU computes every expert of this step
            out = self._while_loading(layer, on_host, hidden, top_k_index, top_k_weights)
        if on_host and not self.cache.loads_in_flight() and self.cache.core.admission_value.worthwhile():
            self.cache.prefetch(layer, on_host, admission=True)  # an idle copy engine admits what the CPU computed
        return out

    def _tell_prompt(self, layer: int, routed: list[int], rows: int) -> None:
        """A forward of B rows of T > 1 tokens each (a prefill, or a continuation fed whole) tells
        the policy every token's experts [B, T, K] (on_prompt): consecutive tokens of B sequences,
        which a reuse model learns from, where the cache sees one step's union of experts. A
        decode step of a batch (T = 1) is not one sequence's tokens, and is not told."""
        shape = self.forwards.current()
        if shape is None or rows <= shape.batch or rows % shape.batch:
            return
        self.cache.policy.on_prompt(layer, np.asarray(routed, dtype=np.int64).reshape(shape.batch, rows // shape.batch, -1))

    def _while_loading(self, layer: int, on_host: list[int], hidden, top_k_index, top_k_weights) -> torch.Tensor | None:
        """What runs while the first wave's loads are in flight: the CPU's share of the layer
        (hybrid), and the prefetches of the next layers (their copies overlap this compute)."""
        out = None
        if on_host:
            with (self.low_bit or self.source).borrow_run(layer, on_host) as tensors:
                out = self._compute_on_cpu(layer, dict(zip(on_host, tensors)), hidden, top_k_index, top_k_weights)
        if self.forecaster is not None:
            self._prefetch_after(layer)
        return out

    def _compute_on_cpu(self, layer: int, weights: dict, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """[T, H] on the compute device: the contribution of the experts `weights` (host
        tensors), computed on the CPU; the activations go over and the result comes back."""
        self.stats.paths["host"] = self.stats.paths.get("host", 0) + 1
        out = experts_in_place(
            hidden.cpu(), top_k_index.cpu(), top_k_weights.cpu(), weights, self.layout, self.gates[layer], exact=self.exact, swiglu=self.swiglu,
        )
        return out.to(self.device, non_blocking=True)

    def _host_share(self, layer: int, needed: list[int], routed: list[int]) -> list[int]:
        """The missed experts the CPU computes this step: under miss_precision all of them (from
        their low-bit copies), under hybrid execution those the cost model gives it."""
        resident = self.cache.slot_of
        missed = [e for e in needed if self.cache.core.key(layer, e) not in resident]
        if not missed:
            return []
        if self.low_bit is not None:
            on_host = missed
        else:
            counts = Counter(routed)
            tokens = {e: counts[e] for e in missed}
            backlog = self.cache.loads_in_flight() * self.costs.load_ms
            _, on_host = self.costs.split(missed, tokens, backlog)
        self.cache.core.compute_elsewhere(layer, on_host)
        return on_host

    def _compute_wave(self, layer, wave, slots, hidden, top_k_index, top_k_weights, *, single: bool) -> torch.Tensor:
        """[T, H]: the contribution of the experts `wave` (sitting in `slots`) to the layer's output."""
        path = self.compute_path if single or self.compute_path != TRITON else self.fallback_path
        self.stats.paths[path] = self.stats.paths.get(path, 0) + 1
        if path == LOOP:  # each expert read where it lies: a pool slot, or (in place) host RAM
            weights = {expert: self.pool.view(slot) for expert, slot in zip(wave, slots)}
            if self.execution == HOST and self.device.type != "cpu":  # llama.cpp's --cpu-moe: experts stay in RAM
                return self._compute_on_cpu(layer, weights, hidden, top_k_index, top_k_weights)
            return experts_in_place(hidden, top_k_index, top_k_weights, weights, self.layout, self.gates[layer], exact=self.exact, swiglu=self.swiglu)
        table = torch.full((self.num_experts,), -1, dtype=torch.long)
        table[wave] = torch.tensor(slots, dtype=torch.long)
        # On CUDA a copy from pageable memory: staged by the driver, so the host waits for the
        # 8 bytes x E to be staged, not for the GPU. (A pinned double buffer would avoid even that;
        # not written before a GPU can check it.)
        device_table = table.to(self.device, non_blocking=True)
        return experts_from_slots(hidden, top_k_index, top_k_weights, device_table, self.pool, self.layout, self.gates[layer], path)

    def _prefetch_after(self, layer: int) -> None:
        """Prefetch the top experts forecast for the next `prefetch_lookahead` layers."""
        for lookahead in range(1, self.prefetch_lookahead + 1):
            target = layer + lookahead
            if target >= len(self.blocks):
                break
            scores = self.forecaster.forecast(layer, lookahead)
            self.cache.forecast(target, lookahead, np.clip(scores, 0.0, 1.0))
            ranked = np.argsort(-scores, kind="stable")[: self.prefetch_width]
            forecast = {int(e): float(min(scores[e], 1.0)) for e in ranked if scores[e] > 0}
            wanted = list(forecast)
            if self.prefetch_gate is not None:  # as the simulator decides (simulator.replay)
                resident = self.cache.slot_of
                candidates = [(e, forecast[e]) for e in wanted if self.cache.core.key(target, e) not in resident]
                backlog = self.cache.loads_in_flight() * self.prefetch_gate.load_ms
                wanted = self.prefetch_gate.select(candidates, lookahead, backlog, self.cache.core.prefetch_outcomes)
            self.cache.prefetch(target, wanted, probabilities=forecast)

    def _compute_done(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def profile_info(self) -> dict:
        if self.mask is None:
            return {}
        total = len(self.blocks) * self.num_experts
        kept = self.mask.kept_experts()
        return {
            "profile": self.mask.profile.task if self.mask.profile else "auto (not chosen yet)",
            "pruned_experts": None if kept is None else total - kept,
            "kept_experts": kept,
            "profile_match_scores": self.mask.match_scores,
        }

    def prefetch(self, layer: int, experts) -> int:
        """Start background loads of `experts` of MoE layer `layer` (for predictors)."""
        with self.lock:
            return self.cache.prefetch(layer, [int(e) for e in experts])

    # ------------------------------------------------------------------ install / remove
    def install(self, model: nn.Module) -> None:
        for block in self.blocks:
            setattr(block.block, self.adapter.experts_attr, OffloadedExperts(self, block.moe_index, block.experts))
        self.stats.info["kernel_linears"] = self.dense.apply() if self.dense is not None else 0
        weights = self.source.ram_tensors() + (self.low_bit.ram_tensors() if self.low_bit else []) + (self.dense.tensors() if self.dense else [])
        self.stats.info["huge_page_bytes"] = huge_pages.arena_bytes(weights)
        model.to(self.device)
        if self.device.type == "cpu":  # after the kernel linears: their projections are the ones computed together
            self.native_norms = install_native_norms(model, self.exact)
            self.decode_attention = install_decode_attention(model, self.adapter.decode_attention, self.exact, self.native_norms)
            self.kernel_routers = [] if self.exact else install_kernel_routers([block.router for block in self.blocks])
            layers = self.adapter.decoder_layers(model)
            self.decode_layers = install_decode_layers(layers, self.decode_attention, self.blocks, self.adapter, self.kernel_routers, self.native_norms)
        self.stats.info["exact"] = self.exact
        self.stats.info["decode_attention_layers"] = len(self.decode_attention)
        self.stats.info["native_norms"] = len(self.native_norms)
        self.stats.info["kernel_routers"] = len(self.kernel_routers)
        self.stats.info["decode_layers"] = len(self.decode_layers)
        wrapped_model.install(model, self)
        self.forwards.attach(model)
        if self.mask is not None:
            self.mask.attach()
        setattr(model, RUNTIME_ATTR, self)
        self._load_pinned()

    def _load_pinned(self) -> None:
        """Pinned experts (a placement plan's) are loaded once, up front, and never evicted."""
        for layer in range(len(self.blocks)):
            experts = [key - layer * self.num_experts for key in sorted(self.cache.pinned) if key // self.num_experts == layer]
            if experts:
                self.cache.acquire(layer, experts)
                self.cache.release(layer, experts)
        self.stats.reset()

    def remove(self, model: nn.Module) -> None:
        self.drain()  # before anything changes: a stuck load leaves the model wrapped, not half unwrapped
        self._check_room_to_materialise()
        for block in self.blocks:
            original = block.experts
            if any(p.is_meta for p in original.parameters()):
                self._materialise(block)
            setattr(block.block, self.adapter.experts_attr, original)
        for replaced in [*self.decode_layers, *self.decode_attention, *self.native_norms, *self.kernel_routers]:
            replaced.remove()
        self.decode_layers, self.decode_attention, self.native_norms, self.kernel_routers = [], [], [], []
        if self.dense is not None:
            self.dense.undo()
        wrapped_model.remove(model)
        self.forwards.detach()
        self.close()
        model.to(self.home_device)
        delattr(model, RUNTIME_ATTR)

    def _check_room_to_materialise(self) -> None:
        """Refuse, before anything changes, an unwrap whose experts (never in RAM: from_pretrained,
        or freed) would not fit in the available RAM once read back."""
        missing = [block for block in self.blocks if any(p.is_meta for p in block.experts.parameters())]
        if not missing:
            return
        full = self.source.spec.in_format(ExpertFormat())
        needed = full.nbytes * sum(block.num_experts for block in missing)
        available = psutil.virtual_memory().available
        if needed > available:
            raise MemoryError(
                f"unwrap reads every expert back into RAM ({format_bytes(needed)}), and {format_bytes(available)} is available: "
                "keep the model wrapped, or drop it (del model; its runtime stops when it is collected)"
            )

    def _materialise(self, block: MoEBlock) -> None:
        """Give an original experts module real weights again, read from the cold tier."""
        for name, fused in wrapped_model.experts_state(self, block.moe_index).items():
            block.experts._parameters[name] = nn.Parameter(fused, requires_grad=False)

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Stop the loader once every load in flight has finished (see `drain`)."""
        self.drain(timeout)
        if self.mask is not None:
            self.mask.close()
        self._closer()
        self.source.close()

    def drain(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Wait for every load in flight; raises naming a load stuck longer than `timeout`."""
        deadline = time.monotonic() + timeout
        for ticket in list(self.cache.tickets.values()):
            if ticket.submitted and not ticket.join(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(
                    f"the load of expert {ticket.expert} of MoE layer {ticket.layer} into slot {ticket.slot} has not finished "
                    f"after {timeout:.0f} s (a stalled disk read?); the runtime stays installed"
                )


def _policy_for(config: OffloadConfig, in_place: bool, source: ExpertSource):
    """The policy asked for; the default given nothing to fit, where a miss only moves a pointer
    (computed in place at full precision, every expert in RAM), is LRU: nothing to save, and the
    adaptive default's shadow caches cost time (about a tenth of a CPU decode step at 25% in
    Python; a fraction of that compiled, still for nothing: BENCHMARKS.md)."""
    if config.policy == DEFAULT_POLICY and config.policy_fit is None and in_place and not isinstance(source, HostTier):
        return "lru"
    return config.policy
