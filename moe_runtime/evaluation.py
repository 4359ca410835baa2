"""Quality of an offloaded model on a text: perplexity, and how far its next-token
distributions move from the unquantized, unpruned model's (KL divergence, top-1 agreement).

token ids [N] -> windows of the model's context -> logits of the offloaded model (budget,
quantize, profile) -> mean negative log-likelihood -> perplexity; with a reference: the same
windows through the model with every expert resident and unquantized -> KL(reference || model)
per position, averaged, and the share of positions whose argmax agrees.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

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
    store_dir: str | os.PathLike | None = None, reference: bool = True, device: str | None = "cpu",
) -> Evaluation:
    """Score `token_ids` with the checkpoint offloaded as asked (a quantized store goes to
    `store_dir`, or to a temporary folder removed afterwards); with `reference`, also against
    the model with every expert resident in its own dtype."""
    if len(token_ids) < 2:
        raise ValueError(f"the text is {len(token_ids)} token(s) long; evaluation needs at least 2")
    with tempfile.TemporaryDirectory(prefix="moe-runtime-evaluate-") as scratch:
        store = store_dir if store_dir is not None or quantize is None else os.path.join(scratch, "store")
        logits = _offloaded_logits(model_dir, token_ids, budget=budget, quantize=quantize, profile=profile, store_dir=store, device=device)
    base = _offloaded_logits(model_dir, token_ids, budget=1.0, device=device) if reference else None
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


def _offloaded_logits(model_dir, token_ids: list[int], *, device, **options) -> torch.Tensor:
    """[N-1, V] next-token logits of positions 0..N-2, in windows of the model's context."""
    model = from_pretrained(model_dir, device=device, **options)
    try:
        window = min(len(token_ids), getattr(model.config, "max_position_embeddings", len(token_ids)) or len(token_ids))
        pieces = []
        with torch.no_grad():
            for start in range(0, len(token_ids) - 1, window):
                ids = torch.tensor([token_ids[start : start + window]], device=model.device)
                pieces.append(model(ids).logits[0].float().cpu())
        return torch.cat(pieces)[: len(token_ids) - 1]
    finally:
        runtime_of(model).close()  # not unwrap: it would read every expert back into RAM
