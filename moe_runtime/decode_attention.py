"""A CPU decode step's attention, without the per-call machinery around it.

hidden [B, 1, H] -> q, k, v projections (one kernel call where they share a shape and a
quantized format) -> the family's q/k norms -> rotary -> KV cache (appended in place,
kv_append.py) -> SDPA -> o_proj

At decode on a CPU, transformers' attention spends more time in Python than in arithmetic:
on the peer benchmark's small shape (int8 throughout, 2-core EPYC of BENCHMARKS.md) the
attention of a layer took about 320 us, of which the four projections' kernel calls took
about 110. Most of the rest is the forward's wrappers (the deprecated-argument decorator, the
attention-interface lookup, sdpa_attention_forward's branches) and three projection modules
where one kernel call serves (each of them a call into the kernel, with the call's fixed cost).

For the llama-shaped attention of OLMoE, Qwen2-MoE, Qwen3-MoE and Mixtral (the adapter's
`decode_attention`), a one-token query with no mask through SDPA runs here: the same modules
and the same ops in the same order as transformers' forward, so the outputs are bit-identical
(tested per family, full precision and quantize_rest); projections computed together are too,
since the kernel computes each matrix's rows as it would alone; so is the native rotary
embedding (kernels/cpu_decode_ops.py), used only where it matches the family's function.
Anything else (a prefill, a mask: padding, a static cache, a sliding window in force; eager
attention; another device) goes to transformers' own forward.

Where a step need not be exact (`exact=False`, config.exact_decode: the default under
quantize_rest), SDPA gives way to the native one-query attention (cpu_decode_ops.attend: fp32
throughout, as close to an exact result as SDPA is; 9 us where SDPA took 38 for 16 heads of 20
keys, 0.6 ms where it took 6.3 for 4096 keys on the CPU of BENCHMARKS.md). Every op between the
projections and o_proj is then native (the q/k norms where NativeNorm serves them, the
rotation, the KV append, the attention), and they run as one call (cpu_decode_ops.attend_step,
the same functions in the same order: bit for bit the ops one by one), writing the new key
and value straight into the cache's room (kv_append.room_for). On the peer benchmark's small
model (int4 throughout, 3 x 240 steps with and without in turn) a step's median fell from
10.9 to 10.7 ms in one of the VM's slow spells.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_linears import KernelLinear
from .kv_append import append_kv, room_for
from .native_norms import NativeNorm
from .kernels import cpu_decode_ops, cpu_gemv

NORMS = ("projection", "head", "none")  # where a family's q/k norms sit: on the whole projection, per head, nowhere
STEP_NORMS = {"none": 0, "projection": 1, "head": 2}  # cpu_decode_ops.attend_step's names for them
ROTARY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the native rotary embedding takes


class DecodeAttention:
    """Installed on one attention module (its instance `forward`); `remove` puts transformers' back."""

    def __init__(self, attention: nn.Module, norms: str, exact: bool = True, native_norms: dict[int, NativeNorm] | None = None):
        assert norms in NORMS, f"norms must be one of {NORMS}, got {norms!r}"
        self.attention = attention
        self.norms = norms
        self.attend = _sdpa if exact or not cpu_decode_ops.available() else cpu_decode_ops.attend
        self.family_rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb  # the family's own
        self.rotate = rotation(self.family_rotate)  # native where it gives the same
        native_norms = native_norms or {}
        self.qk_norms = [native_norms.get(id(getattr(attention, name, None))) for name in ("q_norm", "k_norm")] if norms != "none" else []
        self.fused = True  # attend_step where `_fuses` allows (a switch for tests and benchmarks)
        self.clip = getattr(attention.config, "clip_qkv", None)
        self.together = _projection_groups([attention.q_proj, attention.k_proj, attention.v_proj])
        self.steps = 0  # one-token steps served here (the rest went to transformers' forward)
        self.installed = False

    def install(self) -> None:
        self.attention.forward = self.forward
        self.installed = True

    def remove(self) -> None:
        del self.attention.forward  # the instance attribute: the class's forward again
        self.installed = False

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if not self.applies(hidden_states, position_embeddings, attention_mask, cache, kwargs):
            original = type(self.attention).forward
            return original(self.attention, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs)
        return self.decode(hidden_states, position_embeddings, cache, kwargs), None

    def applies(self, hidden_states, position_embeddings, attention_mask, cache, kwargs) -> bool:
        """Whether this step is one `decode` serves (else transformers' forward runs)."""
        attention = self.attention
        return (
            hidden_states.dim() == 3 and hidden_states.shape[1] == 1 and hidden_states.device.type == "cpu"
            and attention_mask is None and cache is not None and position_embeddings is not None
            and not attention.training and not kwargs.get("output_attentions")
            and attention.config._attn_implementation == "sdpa" and attention.head_dim <= 256  # sdpa_attention_forward's enable_gqa
        )

    def decode(self, hidden_states: torch.Tensor, position_embeddings, cache, kwargs) -> torch.Tensor:
        """[B, 1, H]: the attention's output for a step that `applies` (counted in `steps`)."""
        self.steps += 1
        return self._decode(hidden_states, position_embeddings, cache, kwargs)

    def _decode(self, hidden_states: torch.Tensor, position_embeddings, cache, kwargs) -> torch.Tensor:
        """[B, 1, H]: the ops of the family's forward for a one-token query without a mask.
        With one position, [B, 1, heads, D] and its transpose [B, heads, 1, D] are the same
        numbers in the same order: the heads are viewed so at once, and the output's transpose
        back is a reshape (four ops fewer, the values and their order unchanged)."""
        attention = self.attention
        input_shape = hidden_states.shape[:-1]
        heads_shape = (input_shape[0], -1, 1, attention.head_dim)
        query, key, value = self._project(hidden_states)
        if (step := self._step(query, key, value, position_embeddings, cache)) is not None:
            return attention.o_proj(step.view(*input_shape, -1))
        if self.norms == "projection":
            query, key = attention.q_norm(query), attention.k_norm(key)
        if self.clip is not None:
            for states in (query, key, value):
                states.clamp_(min=-self.clip, max=self.clip)
        query, key, value = query.view(heads_shape), key.view(heads_shape), value.view(heads_shape)
        if self.norms == "head":
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = position_embeddings
        query, key = self.rotate(query, key, cos, sin)
        key, value = append_kv(cache, attention.layer_idx, key, value, kwargs)
        out = self.attend(query, key, value, attention.scaling)  # [B, heads, 1, Dv]
        return attention.o_proj(out.reshape(*input_shape, -1).contiguous())

    def _step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_embeddings, cache) -> torch.Tensor | None:
        """[B, Hq*Dv]: the rest of `_decode` up to o_proj in one native call (attend_step, the
        same ops on the same values: bit for bit), for a step whose every op there is native;
        None where it is not (then `_decode` takes them one by one)."""
        if not self._fuses(query.dtype):
            return None
        cos, sin = position_embeddings
        batch, dim = query.shape[0], self.attention.head_dim
        heads_query, heads_key = query.view(batch, -1, 1, dim), key.view(batch, -1, 1, dim)
        if cos.dtype != query.dtype or not _aligned(heads_query, heads_key, cos, sin):
            return None
        found = room_for(cache, self.attention.layer_idx, heads_key, value.view(batch, heads_key.shape[1], 1, -1))
        if found is None:
            return None
        layer, room = found
        out = cpu_decode_ops.attend_step(
            *(states.reshape(batch, -1).contiguous() for states in (query, key, value)), *self.step_norms(), cos.contiguous(), sin.contiguous(),
            room.keys, room.values, room.length, self.attention.scaling,
        )
        layer.keys, layer.values = room.advance()  # only once the new key and value are written
        return out

    def step_norms(self) -> tuple:
        """(norms, q_weight, k_weight, q_eps, k_eps, exact, clip): attend_step's arguments for
        the family's q/k norms and clip_qkv (here, and in layer_front.py's native layer)."""
        norms = [(norm.module.weight, norm.eps) for norm in self.qk_norms] or [(None, 0.0), (None, 0.0)]
        exact = bool(self.qk_norms) and self.qk_norms[0].exact
        return STEP_NORMS[self.norms], norms[0][0], norms[1][0], norms[0][1], norms[1][1], exact, float(self.clip or 0.0)

    def _fuses(self, dtype: torch.dtype) -> bool:
        """Whether this step's norms, rotation and attention are all the native ops (a step that
        need not be exact, each norm served natively for `dtype`, both alike in `exact`)."""
        if not (self.fused and self.attend is cpu_decode_ops.attend and isinstance(self.rotate, NativeRotation)):
            return False
        if self.norms == "none":
            return True
        q_norm, k_norm = self.qk_norms
        return q_norm is not None and k_norm is not None and q_norm.serves(dtype) and k_norm.serves(dtype) and q_norm.exact == k_norm.exact

    def _project(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """[q, k, v], each [B, 1, N]: a group of quantized projections of one shape in one kernel
        call (KernelLinear's ops for each, bias included), any other through its module."""
        outputs = []
        for group in self.together:
            rows = hidden_states.reshape(-1, group[0].in_features)
            if len(group) > 1 and (operands := group_operands(group, len(rows))) is not None:
                products = cpu_gemv.products(rows[None], *operands)  # [len(group), B, N]
                outputs.extend(module.output(y, hidden_states.shape[:-1]) for module, y in zip(group, products))
            else:
                outputs.extend(module(hidden_states) for module in group)
        return outputs


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """transformers' sdpa_attention_forward for a one-token query without a mask."""
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=scale, is_causal=False, **gqa)


def _projection_groups(projections: list[nn.Module]) -> list[list[nn.Module]]:
    """q, k, v in order, consecutive KernelLinear modules of one shape grouped (all three
    without GQA; k and v with it), every other module alone."""
    groups: list[list[nn.Module]] = []
    for module in projections:
        last = groups[-1][-1] if groups else None
        same = isinstance(module, KernelLinear) and isinstance(last, KernelLinear) and (
            (module.in_features, module.out_features, tuple(module.tensors)) == (last.in_features, last.out_features, tuple(last.tensors))
        )
        if same:
            groups[-1].append(module)
        else:
            groups.append([module])
    return groups


def group_operands(group: list[KernelLinear], rows: int) -> tuple[list, list, int] | None:
    """(matrices, scales, group size) of the modules' weights as cpu_gemv reads them, or None
    where expert_format.linear would not give them these `rows` (KernelLinear.kernel_operands)."""
    each = [module.kernel_operands(rows) for module in group]
    if any(operands is None for operands in each):
        return None
    return [operands[0][0] for operands in each], [scales for operands in each for scales in operands[1]], each[0][2]


def rotation(family_rotate):
    """The native rotary embedding (kernels/cpu_decode_ops.py: one call, 10 us where the
    family's ops took 23 on the CPU of BENCHMARKS.md) where it gives `family_rotate`'s output bit
    for bit on random decode-shaped inputs in every dtype it takes; else `family_rotate` itself."""
    if not cpu_decode_ops.available() or not _rotates_alike(family_rotate):
        return family_rotate
    return NativeRotation(family_rotate)


class NativeRotation:
    """apply_rotary_pos_emb(q, k, cos, sin) in one native call, the family's own function for
    inputs of mixed dtypes (a class, not a closure: a wrapped model stays picklable up to the
    runtime's own refusal)."""

    def __init__(self, family_rotate):
        self.family_rotate = family_rotate

    def __call__(self, query, key, cos, sin):
        if query.dtype == key.dtype == cos.dtype == sin.dtype and query.dtype in ROTARY_DTYPES and _aligned(query, key, cos, sin):
            return cpu_decode_ops.rotate(query, key, cos, sin)
        return self.family_rotate(query, key, cos, sin)


def _aligned(query, key, cos, sin) -> bool:
    """Whether q, k [B, H, S, D] and cos, sin [B or 1, S, D] have the shapes the native op takes
    (for anything else the family's function broadcasts, or refuses, as it would)."""
    if query.dim() != 4 or key.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, length, width = query.shape
    return cos.shape[0] in (1, batch) and tuple(cos.shape[1:]) == (length, width) and (key.shape[0], *key.shape[2:]) == (batch, length, width)


@lru_cache(maxsize=None)  # one verdict per family function
@torch.no_grad()
def _rotates_alike(family_rotate) -> bool:
    generator = torch.Generator().manual_seed(0)
    for dtype in ROTARY_DTYPES:
        query, key = (torch.randn(2, heads, 1, 64, generator=generator).to(dtype) for heads in (4, 2))
        angles = torch.randn(2, 1, 64, generator=generator) * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        want, got = family_rotate(query, key, cos, sin), cpu_decode_ops.rotate(query, key, cos, sin)
        if not all(torch.equal(a, b) for a, b in zip(want, got)):
            return False
    return True


def install_decode_attention(model: nn.Module, norms: str | None, exact: bool = True, native_norms: list[NativeNorm] = ()) -> list[DecodeAttention]:
    """A DecodeAttention on every attention module of `model`'s decoder layers (`self_attn`),
    for a family whose adapter names its `norms` (`exact`: see the module's docstring; the
    `native_norms` installed on its q/k norms let a step run as one native call); none for
    None, nor on a module whose forward someone has already replaced (theirs is left to run)."""
    if norms is None:
        return []
    by_module = {id(norm.module): norm for norm in native_norms}
    installed = []
    for module in model.modules():
        attention = getattr(module, "self_attn", None)
        if (
            isinstance(attention, nn.Module) and "forward" not in attention.__dict__
            and all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))
        ):
            installed.append(DecodeAttention(attention, norms, exact, by_module))
            installed[-1].install()
    return installed
