"""How an expert's weight matrices are held: the model's dtype, int8 or int4 (quantized once,
when the store or the RAM copy is written; loads then move the quantized bytes).

A quantized expert's tensors describe themselves by name, so compute needs no side table:

    full:  W [N, K] (or [K, N] for transposed families)         model dtype
    int8:  W.int8 [N, K] int8,  W.scale [N] bf16                 w = q * scale[n]
    int4:  W.int4 [N, K/2] uint8 (two inputs per byte, low nibble first),
           or W.int4_cpu: the same nibbles in torch's CPU tile order (for
           torch._weight_int4pack_mm_for_cpu; its order is torch's, so a store
           records a fingerprint of it and is rebuilt when torch packs otherwise),
           W.scales_zeros [K/G, N, 2] bf16                       w = (q - 8) * s + z per group
           or, computed on a CPU by kernels/cpu_gemv.cpp with AVX-512:
           W.int4_tiles [N/16, K/G, 64 + 8G] uint8: per 16 rows and group, the rows'
           (s, z) pairs, then the group's nibbles 4 bytes of each row at a time
           (cpu_gemv.cpp's TILES: 1.2x the plain layout's GB/s there)

N = output features, K = input features; quantized matrices are always [out, in], whatever the
family's orientation. Biases (and everything outside the routed experts) keep the model's dtype.
Scales are bf16, not fp16: torch's CPU int4 and int8 kernels run 28-47x slower with fp16
activations and scales on the 2-core EPYC this was measured on (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
import torch.nn.functional as F

from .expert_tensors import ExpertTensors, Shapes, Specs, allocate_expert, expert_nbytes
from .kernels import cpu_gemv

SCALE_DTYPE = torch.bfloat16
QUANTIZE = ("none", "int8", "int4", "int4-g32", "int4-g64", "int4-g128")
QUANTIZED = QUANTIZE[1:]  # the formats a command-line flag offers
TILE_ROWS = 16  # rows of one int4 tile (kernels/cpu_gemv.cpp's TILES)
CPU_KERNEL_ROWS = 64  # int8 products of up to this many rows go to kernels/cpu_gemv.py on a CPU, more to torch's int8 GEMM
# Full-precision weights go to it (where not exact) for up to this many rows: its cost grows with
# the rows, and on the CPU of BENCHMARKS.md torch's bf16 GEMM (AVX512-BF16) beats it from 4 rows
# on (8 x [1024, 1024]: 0.37 against 0.88 ms at 1 row, 1.32 against 0.82 at 4), while its fp16
# GEMM loses at every count up to 64 (20.7 against 26.9 ms at 64); fp32 (MKL) taken as bf16.
KERNEL_FLOAT_ROWS = {torch.bfloat16: 1, torch.float16: CPU_KERNEL_ROWS, torch.float32: 1}


@dataclass(frozen=True)
class ExpertFormat:
    """scheme: "none", "int8" or "int4"; group: int4's group size along K; cpu_packing: int4 in
    torch's CPU tile order (computed on the CPU) instead of plain nibbles (Triton, GPU);
    cpu_tiles: int4 in our CPU decode kernel's tiles, scales inline, for every matrix whose
    shape allows (tiles_fit), plain nibbles for the rest."""

    scheme: str = "none"
    group: int = 64
    cpu_packing: bool = False
    cpu_tiles: bool = False

    @property
    def name(self) -> str:
        return {"none": "none", "int8": "int8"}.get(self.scheme, f"int4-g{self.group}")

    @property
    def quantized(self) -> bool:
        return self.scheme != "none"

    def specs(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, transposed: bool) -> Specs:
        """{stored tensor name: (shape, dtype)} of one expert whose parameters have `shapes`."""
        out: Specs = {}
        for name, shape in shapes.items():
            if not self.quantized or is_bias(name):
                out[name] = (tuple(shape), dtype)
                continue
            n, k = (shape[1], shape[0]) if transposed else shape
            if self.scheme == "int8":
                out[f"{name}.int8"], out[f"{name}.scale"] = ((n, k), torch.int8), ((n,), SCALE_DTYPE)
                continue
            self._check_int4_shape(name, n, k)
            if self.tiled(n, k):
                out[f"{name}.int4_tiles"] = ((n // TILE_ROWS, k // self.group, 64 + 8 * self.group), torch.uint8)
                continue
            packed = f"{name}.int4_cpu" if self.cpu_packing else f"{name}.int4"
            out[packed] = ((n, k // 2), torch.uint8)
            out[f"{name}.scales_zeros"] = ((k // self.group, n, 2), SCALE_DTYPE)
        return out

    def tiled(self, n: int, k: int) -> bool:
        """Whether an int4 [N, K] matrix is held as tiles."""
        return self.cpu_tiles and tiles_fit(n, k, self.group)

    def _check_int4_shape(self, name: str, n: int, k: int) -> None:
        if k % self.group or (self.cpu_packing and n % 32):
            need = f"input features divisible by the group size {self.group}" + (" and output features by 32" if self.cpu_packing else "")
            raise ValueError(f"int4 experts need {need}; {name} is [{n}, {k}]: use quantize='int8', or a smaller int4 group")

    def encode(self, tensors: ExpertTensors, transposed: bool) -> ExpertTensors:
        """One expert's tensors (the model's dtype and layout) in this format; full precision returns them as they are."""
        if not self.quantized:
            return tensors
        out = {}
        for name, tensor in tensors.items():
            if is_bias(name):
                out[name] = tensor
                continue
            weight = tensor.t() if transposed else tensor  # [N, K]
            if self.scheme == "int8":
                out[f"{name}.int8"], out[f"{name}.scale"] = quantize_int8(weight)
                continue
            self._check_int4_shape(name, *weight.shape)
            q, scales_zeros = quantize_int4(weight, self.group)
            if self.tiled(*weight.shape):
                out[f"{name}.int4_tiles"] = pack_tiles(q, scales_zeros)
                continue
            if self.cpu_packing:
                out[f"{name}.int4_cpu"] = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
            else:
                out[f"{name}.int4"] = pack_nibbles(q)
            out[f"{name}.scales_zeros"] = scales_zeros
        return out

    def describe(self, specs: Specs) -> dict:
        """What a store's manifest records: a store of another description is rebuilt."""
        out = {"scheme": self.scheme}
        if self.scheme == "int4":
            out["group"] = self.group
            out["packing"] = "tiles" if self.cpu_tiles else "torch-cpu" if self.cpu_packing else "nibbles"
            if self.cpu_packing:
                shapes = sorted({shape for name, (shape, _) in specs.items() if name.endswith(".int4_cpu")})
                out["torch_packing"] = [cpu_packing_fingerprint(n, 2 * half) for n, half in shapes]
        return out


@dataclass(frozen=True)
class ExpertSpec:
    """Everything that says how one expert of a model is held: the model's per-expert parameter
    shapes and dtype, their orientation ([in, out] when `transposed`) and the format."""

    shapes: Shapes
    dtype: torch.dtype
    transposed: bool = False
    format: ExpertFormat = ExpertFormat()

    @cached_property
    def specs(self) -> Specs:
        """{stored tensor name: (shape, dtype)} of one expert."""
        return self.format.specs(self.shapes, self.dtype, self.transposed)

    @cached_property
    def nbytes(self) -> int:
        return expert_nbytes(self.specs)

    def allocate(self, *, pin: bool) -> ExpertTensors:
        return allocate_expert(self.specs, pin=pin)

    def in_format(self, fmt: ExpertFormat) -> ExpertSpec:
        """The same expert held in `fmt` (ExpertFormat(): as the checkpoint holds it)."""
        return ExpertSpec(self.shapes, self.dtype, self.transposed, fmt)

    def encode(self, tensors: ExpertTensors) -> ExpertTensors:
        """One expert's parameters (model dtype and layout) in this format."""
        return self.format.encode(tensors, self.transposed)

    def decode(self, tensors: ExpertTensors) -> ExpertTensors:
        """One expert's stored tensors back in the model's dtype and layout."""
        return decode(tensors, self.dtype, self.transposed, self.shapes)

    def describe(self) -> dict:
        """The store manifest's description of this format (empty for full precision, so stores
        written before quantized formats existed still match)."""
        return {"format": self.format.describe(self.specs)} if self.format.quantized else {}


def expert_format(quantize: str | None, *, on_cpu: bool) -> ExpertFormat:
    """The format for a `quantize=` option ("int4" is group 64); int4 experts computed on the
    CPU (`on_cpu`) are our decode kernel's tiles where kernels/cpu_gemv.py is built with AVX-512
    (plain nibbles, which it reads too, elsewhere), else torch's CPU tile order; plain nibbles
    off the CPU (the Triton kernels read them)."""
    if quantize in (None, "none"):
        return ExpertFormat()
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize == "int8":
        return ExpertFormat("int8")
    group = int(quantize.split("-g")[1]) if "-g" in quantize else 64
    torch_order = on_cpu and not cpu_gemv.available() and int4_cpu_kernel_available()
    return ExpertFormat("int4", group, cpu_packing=torch_order, cpu_tiles=on_cpu and cpu_gemv.reads_tiles())


REFERENCE_SHAPES = {"gate_up_proj": (2816, 2048), "down_proj": (2048, 1408)}  # DeepSeek-V2-Lite's experts


def format_size_ratio(quantize: str | None, shapes: Shapes = REFERENCE_SHAPES) -> float:
    """Bytes of an expert in `quantize`'s format over its bf16 bytes, at `shapes` (by default
    DeepSeek-V2-Lite's, whose bf16 size is the simulator's default expert_mb): 1.0 for None."""
    held = ExpertSpec(shapes, torch.bfloat16, format=expert_format(quantize, on_cpu=False)).nbytes
    return held / ExpertSpec(shapes, torch.bfloat16).nbytes


def is_bias(name: str) -> bool:
    return name.endswith("_bias")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] int8, scale [N] bf16): symmetric per output channel, absmax / 127."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] uint8 in 0..15, scales_zeros [K/G, N, 2] bf16): asymmetric min-max per
    group of G inputs, w ~ (q - 8) * s + z; q is rounded against the stored (bf16) s and z."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-12).to(SCALE_DTYPE).float()  # [N, K/G]
    zero = (low + 8 * scale).to(SCALE_DTYPE).float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=2).to(SCALE_DTYPE).contiguous()
    return q, scales_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8, input 2j in the low nibble, 2j+1 in the high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def tiles_fit(n: int, k: int, group: int) -> bool:
    """Whether an int4 [N, K] matrix of group `group` can be held as tiles: whole tiles of
    rows, whole groups, and the kernel's integer path (G a multiple of its 64-input blocks)."""
    return n % TILE_ROWS == 0 and k % group == 0 and group % 64 == 0


def pack_tiles(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """q [N, K] values 0..15 and scales_zeros [K/G, N, 2] bf16 -> [N/16, K/G, 64 + 8G] uint8:
    per 16 rows and group, the rows' (s, z) (16 x 4 bytes), then the group's plain nibbles
    (pack_nibbles) as G/8 chunks of 4 bytes of each of the 16 rows."""
    n, k = q.shape
    groups = scales_zeros.shape[0]
    group = k // groups
    nibbles = pack_nibbles(q).reshape(n // TILE_ROWS, TILE_ROWS, groups, group // 8, 4).permute(0, 2, 3, 1, 4)  # [T, groups, G/8, 16, 4]
    scales = scales_zeros.contiguous().view(torch.uint8).reshape(groups, n // TILE_ROWS, 4 * TILE_ROWS).transpose(0, 1)  # [T, groups, 64]
    return torch.cat([scales, nibbles.reshape(n // TILE_ROWS, groups, 8 * group)], dim=2).contiguous()


def tile_group(tiles: torch.Tensor) -> int:
    """The int4 group G of tiles [N/16, K/G, 64 + 8G]."""
    return (tiles.shape[2] - 64) // 8


def unpack_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N/16, K/G, 64 + 8G] uint8 -> (q [N, K] values 0..15, scales_zeros [K/G, N, 2] bf16)
    (inverse of pack_tiles)."""
    count, groups, _ = tiles.shape
    group, n = tile_group(tiles), count * TILE_ROWS
    scales = tiles[..., :64].reshape(count, groups, TILE_ROWS, 4).permute(1, 0, 2, 3).reshape(groups, n, 4).contiguous().view(torch.bfloat16)
    nibbles = tiles[..., 64:].reshape(count, groups, group // 8, TILE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(n, groups * group // 2)
    return unpack_nibbles(nibbles), scales


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] values 0..15 (inverse of pack_nibbles)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(tensors: ExpertTensors, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Parameter `name` of one expert as an [N, K] matrix of `dtype` (full precision: as stored)."""
    if name in tensors:
        return tensors[name].to(dtype)
    if f"{name}.int8" in tensors:
        return (tensors[f"{name}.int8"].to(torch.float32) * tensors[f"{name}.scale"].float()[:, None]).to(dtype)
    q, scales_zeros = _int4_values(tensors, name)
    group = q.shape[1] // scales_zeros.shape[0]
    scale = scales_zeros[..., 0].t().repeat_interleave(group, dim=1)
    zero = scales_zeros[..., 1].t().repeat_interleave(group, dim=1)
    return ((q.float() - 8) * scale + zero).to(dtype)


def _int4_values(tensors: ExpertTensors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] values 0..15, scales_zeros [K/G, N, 2] fp32) of int4 parameter `name`,
    whichever its packing."""
    if f"{name}.int4_tiles" in tensors:
        q, scales_zeros = unpack_tiles(tensors[f"{name}.int4_tiles"])
        return q, scales_zeros.float()
    scales_zeros = tensors[f"{name}.scales_zeros"].float()
    if f"{name}.int4" in tensors:
        return unpack_nibbles(tensors[f"{name}.int4"]), scales_zeros
    packed = tensors[f"{name}.int4_cpu"]
    return unpack_int4_cpu(packed, scales_zeros.shape[1], 2 * packed.shape[1]), scales_zeros


def linear(x: torch.Tensor, tensors: ExpertTensors, name: str, transposed: bool, *, exact: bool = True) -> torch.Tensor:
    """x [M, K] times parameter `name` of one expert: [M, N], whatever its format.

    On the CPU, plain-nibble and tiled int4, a few rows (decode) of int8 and, where not
    `exact`, of full precision go to kernels/cpu_gemv.py; more int8 rows, or where it is not
    built, torch's weight-only kernels (int8: x in bf16; int4: the CPU tile order) read the
    packed bytes without expanding them; elsewhere (and for plain-nibble int4 without the
    kernel) the matrix is dequantized for the one product.
    """
    if x.device.type == "cpu" and (operands := cpu_kernel_operands(tensors, name, rows=x.shape[0], exact=exact or transposed)):
        return cpu_gemv.products(x[None], *operands)[0]
    if name in tensors:
        return torch.matmul(x, tensors[name]) if transposed else F.linear(x, tensors[name])
    if f"{name}.int8" in tensors and x.device.type == "cpu":
        return torch._weight_int8pack_mm(x.to(SCALE_DTYPE), tensors[f"{name}.int8"], tensors[f"{name}.scale"]).to(x.dtype)
    packed = tensors.get(f"{name}.int4_cpu")
    if packed is not None:
        scales_zeros = tensors[f"{name}.scales_zeros"]
        group = x.shape[1] // scales_zeros.shape[0]
        return torch._weight_int4pack_mm_for_cpu(x.to(SCALE_DTYPE).contiguous(), packed, group, scales_zeros).to(x.dtype)
    return F.linear(x, dequantize(tensors, name, x.dtype))


def cpu_kernel_operands(tensors: ExpertTensors, name: str, rows: int = 1, *, exact: bool = True) -> tuple[list, list, int] | None:
    """([matrix], [scales], group): parameter `name` as kernels/cpu_gemv.py reads it for `rows`
    input rows, or None where it is not used (see _kernel_names)."""
    names = _kernel_names(tensors, name, rows, exact)
    if names is None:
        return None
    values, scales, group = names
    return [tensors[values]], [tensors[scales]] if scales else [], group


def _kernel_names(tensors: ExpertTensors, name: str, rows: int, exact: bool) -> tuple[str, str | None, int] | None:
    """(the matrix's tensor name, its scales' or None, the int4 group or 0) of parameter `name`
    as the decode kernel reads it, or None where it is not used: full precision when `exact`
    (torch's kernels keep a wrapped model's outputs equal to the unwrapped model's; else an
    [N, K] matrix goes to the kernel for up to KERNEL_FLOAT_ROWS rows), torch's int4 tile order,
    int8 with more than CPU_KERNEL_ROWS rows (torch's int8 GEMM), or the kernel not built here.
    Plain-nibble and tiled int4 go to it at any row count: dequantizing the whole matrix was
    3-5x slower even at 512."""
    int8, scale, int4, scales_zeros, tiles = _quantized_names(name)
    if int8 in tensors:
        names = (int8, scale, 0) if rows <= CPU_KERNEL_ROWS else None
    elif int4 in tensors:
        names = (int4, scales_zeros, 2 * tensors[int4].shape[1] // tensors[scales_zeros].shape[0])
    elif tiles in tensors:
        names = (tiles, None, tile_group(tensors[tiles]))
    elif not exact and name in tensors and tensors[name].dim() == 2 and rows <= KERNEL_FLOAT_ROWS.get(tensors[name].dtype, 0):
        names = (name, None, 0)
    else:
        names = None
    return names if names is not None and cpu_gemv.available() else None


@lru_cache(maxsize=None)
def _quantized_names(name: str) -> tuple[str, str, str, str, str]:
    """A parameter's quantized tensor names, made once (this is asked per GEMM at decode)."""
    return f"{name}.int8", f"{name}.scale", f"{name}.int4", f"{name}.scales_zeros", f"{name}.int4_tiles"


def kernel_operands_many(experts: list[ExpertTensors], name: str, rows: int = 1, *, exact: bool = True) -> tuple[list, list, int] | None:
    """([matrix per expert], [scales per expert], group): parameter `name` of each of the
    experts (one format, as a runtime holds them) as kernels/cpu_gemv.py reads it for `rows`
    input rows each, or None where it is not used (see _kernel_names)."""
    names = _kernel_names(experts[0], name, rows, exact)
    if names is None:
        return None
    values, scales, group = names
    return [tensors[values] for tensors in experts], [tensors[scales] for tensors in experts] if scales else [], group


def linear_many(
    x: torch.Tensor, experts: list[ExpertTensors], name: str, combine: torch.Tensor | None = None, *, exact: bool = True,
) -> torch.Tensor | None:
    """[M, R, N] in x's dtype: x [1 or M, R, K] times parameter `name` of each of M experts (one
    format, as a runtime holds them), in one call of kernels/cpu_gemv.py (a decode step's
    experts on the CPU); with `combine` [M], their weighted sum [1, R, N]. None where it does
    not apply (see _kernel_names), and the caller computes expert by expert."""
    operands = kernel_operands_many(experts, name, x.shape[1], exact=exact)
    if operands is None:
        return None
    return cpu_gemv.products(x, *operands, combine)


def decode(tensors: ExpertTensors, dtype: torch.dtype, transposed: bool, shapes: dict[str, tuple[int, ...]]) -> ExpertTensors:
    """One expert back in the model's layout and dtype (for state_dict, save_pretrained, unwrap)."""
    out = {}
    for name in shapes:
        if name in tensors:
            out[name] = tensors[name]
        else:
            weight = dequantize(tensors, name, dtype)
            out[name] = weight.t().contiguous() if transposed else weight
    return out


def int4_cpu_kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


@lru_cache(maxsize=None)
def _cpu_tile_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's CPU int4 tile order at [n, k], the flat (row * k + input)
    index it holds: found by packing index-coding matrices (4 bits per call), never assumed."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        digits = ((index >> shift) & 0xF).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(digits, 2)
        order |= unpack_nibbles(packed).reshape(-1).to(torch.int64) << shift
    return order


def unpack_int4_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """torch's CPU int4 tile order [N, K/2] -> [N, K] values 0..15 (for decode and tests)."""
    values = unpack_nibbles(packed).reshape(-1)
    out = torch.empty(n * k, dtype=values.dtype)
    out[_cpu_tile_order(n, k)] = values
    return out.reshape(n, k)


@lru_cache(maxsize=None)
def cpu_packing_fingerprint(n: int, k: int) -> str:
    """A short hash of torch's CPU int4 tile order at [n, k]: stores record it, and one packed
    by a torch that orders tiles otherwise is rebuilt instead of misread."""
    return f"{n}x{k}:" + hashlib.sha256(_cpu_tile_order(n, k).numpy().tobytes()).hexdigest()[:16]
