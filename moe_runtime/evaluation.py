"""Quality of an offloaded model on a text: perplexity, and how far its next-token
distributions move from the unquantized, unpruned model's (KL divergence, top-1 agreement).

token ids [N] -> windows of the model's context -> logits of the offloaded model (budget,
quantize, profile) -> mean negative log-likelihood -> perplexity; with a reference: the same
windows through the model with every expert resident and unquantized -> KL(reference || model)
per position, averaged, and the share of positions whose argmax agrees.

`one_at_a_time` scores the same positions one token at a time through the KV cache, as
generation runs them: every expert product then takes the decode path (on a CPU the decode
kernel of kernels/cpu_gemv.py, whose activations are quantized to int8 for int8 / int4 experts),
where a window's prefill takes the many-row path.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .hf_cache import cache_keyword
from .runtime.assembly import runtime_of
from .pretrained import from_pretrained

DEFAULT_TOKENS = 512


@dataclass(frozen=True)
class Evaluation:
    tokens: int  # positions scored (each predicts the next token)
    perplexity: float
    kl_to_reference: float | None  # mean KL(reference || model) in nats, None without a reference
    top1_agreement: float | None  # share of positions whose most likely next token is the reference's

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_checkpoint(
    model_dir: str | os.PathLike, token_ids: list[int], *, budget=1.0, quantize: str | None = None, profile=None,
    store_dir: str | os.PathLike | None = None, reference: bool = True, device: str | None = "cpu", one_at_a_time: bool = False,
) -> Evaluation:
    """Score `token_ids` with the checkpoint offloaded as asked (a quantized store goes to
    `store_dir`, or to a temporary folder removed afterwards); with `reference`, also against
    the model with every expert resident in its own dtype."""
    if len(token_ids) < 2:
        raise ValueError(f"the text is {len(token_ids)} token(s) long; evaluation needs at least 2")
    with tempfile.TemporaryDirectory(prefix="moe-runtime-evaluate-") as scratch:
        store = store_dir if store_dir is not None or quantize is None else os.path.join(scratch, "store")
        logits = _offloaded_logits(
            model_dir, token_ids, one_at_a_time, budget=budget, quantize=quantize, profile=profile, store_dir=store, device=device,
        )
    base = _offloaded_logits(model_dir, token_ids, False, budget=1.0, device=device) if reference else None
    return score(logits, torch.tensor(token_ids[1:]), base)


def score(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> Evaluation:
    """logits [N-1, V] predicting targets [N-1]; reference [N-1, V] or None."""
    log_probs = logits.float().log_softmax(dim=-1)
    nll = F.nll_loss(log_probs, targets).item()
    if reference is None:
        return Evaluation(len(targets), math.exp(nll), None, None)
    reference_log_probs = reference.float().log_softmax(dim=-1)
    kl = F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="batchmean").item()
    agreement = (log_probs.argmax(dim=-1) == reference_log_probs.argmax(dim=-1)).float().mean().item()
    return Evaluation(len(targets), math.exp(nll), max(0.0, kl), agreement)


def _offloaded_logits(model_dir, token_ids: list[int], one_at_a_time: bool, *, device, **options) -> torch.Tensor:
    """[N-1, V] next-token logits of positions 0..N-2, in windows of the model's context (each
    window in one forward, or `one_at_a_time` through the KV cache)."""
    model = from_pretrained(model_dir, device=device, **options)
    try:
        window = min(len(token_ids), getattr(model.config, "max_position_embeddings", len(token_ids)) or len(token_ids))
        pieces = []
        with torch.inference_mode():
            for start in range(0, len(token_ids) - 1, window):
                ids = torch.tensor([token_ids[start : start + window]], device=model.device)
                pieces.append(_stepwise_logits(model, ids) if one_at_a_time else model(ids).logits[0].float().cpu())
        return torch.cat(pieces)[: len(token_ids) - 1]
    finally:
        runtime_of(model).close()  # not unwrap: it would read every expert back into RAM


def _stepwise_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[T, V]: the logits of ids [1, T], fed one token at a time through a fresh KV cache."""
    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    rows = [model(input_ids=ids[:, t : t + 1], **{keyword: cache}, use_cache=True).logits[0, -1] for t in range(ids.shape[1])]
    return torch.stack(rows).float().cpu()
