"""OffloadConfig: every option of `wrap` and `from_pretrained`, held once and validated once.

wrap(model, budget=..., **options) / from_pretrained(path, budget=..., **options) build one from
their keywords (or take `config=OffloadConfig(...)`), and everything past them reads the config:
no option is passed along twice, and a bad field is refused by name with its allowed values
before anything starts.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields, replace

import torch

from .budget import Budget
from .compute import KERNELS
from .execution import EXECUTIONS
from .expert_format import QUANTIZE
from .policies import DEFAULT_POLICY, POLICIES, EvictionPolicy, fit_trace


@dataclass(frozen=True)
class OffloadConfig:
    """How to offload a model's routed experts; see `moe_runtime.wrap` for each field's meaning."""

    budget: Budget  # slot pool memory: bytes, "6GiB", or a fraction in (0, 1] of all routed experts
    device: str | torch.device | None = None  # default: cuda when available
    dtype: torch.dtype | None = None  # from_pretrained only: default the config's, else the checkpoint's
    host_budget: Budget | None = None  # RAM for cold experts
    store_dir: str | os.PathLike | None = None  # where experts that do not fit in RAM are kept
    policy: str | EvictionPolicy = DEFAULT_POLICY
    policy_fit: object = None  # routing of the user's task (a trace file or Trace) the policy is fitted on; read once, here
    predictor: object = None  # a kind, a fitted predictor file, or an instance
    placement: object = None  # a plan path or dict from `moe-runtime place`
    profile: object = None  # a pruning profile path or PruningProfile, or "auto"
    profiles_dir: str | os.PathLike | None = None  # candidates of profile="auto"
    prefetch_width: int | None = None  # default: top-k
    prefetch_lookahead: int = 1
    kernel: str = "auto"
    execution: str = "auto"  # where experts are computed: "auto", "device", "host" or "hybrid" (execution.py)
    devices: tuple | None = None  # multi-GPU plans: the devices, in plan order
    quantize: str | None = None  # routed experts held as "int8" or "int4" (expert_format.py); None: the model's dtype
    quantize_rest: str | None = None  # the other linear layers too, on a CPU (kernel_linears.py)
    miss_precision: str | None = None  # a missed expert computed on the CPU from its copy in this format (HOBBIT)
    exact: bool | None = None  # a CPU decode step bit for bit as torch's ops; None: unless quantize_rest (see exact_decode)

    def __post_init__(self) -> None:
        if self.budget is None or isinstance(self.budget, bool) or not isinstance(self.budget, (int, float, str)):
            raise TypeError(f"OffloadConfig.budget must be bytes (int), a size string or a fraction (float), got {self.budget!r}")
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {', '.join(sorted(POLICIES))}")
        if not isinstance(self.policy, (str, EvictionPolicy)):
            raise TypeError(f"OffloadConfig.policy must be a policy name or an EvictionPolicy, got {type(self.policy).__name__}")
        if self.policy_fit is not None:
            object.__setattr__(self, "policy_fit", fit_trace(self.policy_fit, self.policy))
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if self.prefetch_width is not None and (not isinstance(self.prefetch_width, int) or self.prefetch_width < 1):
            raise ValueError(f"prefetch_width must be a positive int (experts per layer) or None for top-k, got {self.prefetch_width!r}")
        if not isinstance(self.prefetch_lookahead, int) or self.prefetch_lookahead < 1:
            raise ValueError(f"prefetch_lookahead must be an int >= 1 (layers ahead), got {self.prefetch_lookahead!r}")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"OffloadConfig.dtype must be a torch.dtype such as torch.bfloat16, got {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} (or None), got {self.quantize!r}")
        for name in ("quantize_rest", "miss_precision"):
            if getattr(self, name) is not None and getattr(self, name) not in QUANTIZE:
                raise ValueError(f"{name} must be one of {', '.join(QUANTIZE)} (or None), got {getattr(self, name)!r}")
        if self.exact is not None and not isinstance(self.exact, bool):
            raise TypeError(f"exact must be True, False or None (exact unless quantize_rest), got {self.exact!r}")
        if self.miss_precision is not None and self.execution == "hybrid":
            raise ValueError("miss_precision decides where misses are computed (on the CPU, from low-bit copies); drop execution='hybrid'")
        for name in ("quantize", "quantize_rest", "miss_precision"):
            if getattr(self, name) == "none":
                object.__setattr__(self, name, None)
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    def exact_decode(self) -> bool:
        """Whether a CPU decode step must give the outputs torch's own ops give, bit for bit (the
        unwrapped model's, at full precision). Where not, the decode kernel computes every
        product (full-precision experts and dense layers too) and the routers' logits, and one
        native call each query's attention: the same sums in another order. Default: exact
        unless quantize_rest, whose outputs differ from the unwrapped model's anyway."""
        return self.exact if self.exact is not None else self.quantize_rest is None

    def with_device(self, device: torch.device) -> OffloadConfig:
        """The same options with the device resolved (done once, by the entry point)."""
        return replace(self, device=device)


def config_from(config: OffloadConfig | None, options: dict) -> OffloadConfig:
    """`config`, or one built from an entry point's keywords; refuses both at once.

    options: every keyword of the entry point (defaults included) by field name.
    """
    if config is None:
        if options.get("budget") is None:
            raise TypeError("a budget is needed: budget=0.25 (a share of the experts), '6GiB', bytes, or config=OffloadConfig(...)")
        return OffloadConfig(**options)
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be an OffloadConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in fields(OffloadConfig) if f.default is not MISSING}
    given = [name for name, value in options.items() if name in defaults and value is not defaults[name] and value != defaults[name]]
    if options.get("budget") is not None or given:
        raise ValueError(
            f"pass the options either as config=OffloadConfig(...) or as keywords, not both (also given: {', '.join(given or ['budget'])})"
        )
    return config
