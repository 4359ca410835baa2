"""Cross-layer gate (Fate's observation): the router inputs of neighbouring layers are close, so
applying the routers of layers l+1..l+d to layer l's router input forecasts their routing.

No training: it reads the live model's own router modules. Scores: the router's top-k weights
for the experts it would choose (exactly the family's routing rule, group limits included),
plus a small softmax-of-logits term that orders the rest.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_runtime.adapters import adapter_for

from .base import RoutingPredictor
from .context import RoutingContext


class CrossLayerGatePredictor(RoutingPredictor):
    name = "cross-layer-gate"
    needs_hidden = True

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        blocks = adapter_for(model).blocks(model)
        self.routers = [block.router for block in blocks]
        self.num_layers, self.num_experts = len(blocks), blocks[0].num_experts

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        if context.hidden is None:
            raise ValueError("the cross-layer gate needs router inputs: record the trace with router_inputs=True")
        router = self.routers[layer + lookahead]
        weight = next(router.parameters())
        hidden = torch.as_tensor(context.hidden[:, layer]).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            logits, weights, index = router.forward(hidden)  # not __call__: no hooks (e.g. a recorder) fire
            scores = 1e-3 * torch.softmax(logits.float(), dim=-1)
            scores.scatter_add_(1, index.long(), weights.float().abs() + 1.0)
        return scores.cpu().numpy()
