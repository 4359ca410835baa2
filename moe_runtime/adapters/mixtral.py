"""Mixtral: plain top-k softmax router (renormalised), no shared expert.

Checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate), w3 (up),
w2 (down); transformers renames and fuses them at load time.
"""

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    model_type = "mixtral"
    checkpoint_gate_up = ("w1.weight", "w3.weight")
    checkpoint_down = "w2.weight"
    checkpoint_renames = ((".mlp.", ".block_sparse_moe."),)
    always_renormalise = True
    cast_weights = False
    decode_attention = "none"
