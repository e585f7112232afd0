"""Mixtral (`MixtralForCausalLM`): Llama attention (sliding window on every layer when set) and
a sparse MoE block in place of the MLP: softmax over `num_local_experts`, top
`num_experts_per_tok`, always renormalised.

Checkpoint names: the MoE block is `block_sparse_moe` (ours: `mlp`), its router `gate`, expert
e's gate / up / down `experts.{e}.w1 / w3 / w2`.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention import AttentionBackend
from engine.config import hf_head_dim
from engine.models.base import CausalLM, DecoderLayer, layer_sliding_window
from engine.models.layers import Attention, RMSNorm
from engine.models.moe import SparseMoeBlock
from engine.models.rotary import RotaryEmbedding
from engine.models.weight_mapper import WeightMapper, hf_checkpoint_name


def _checkpoint_name(param_name: str) -> str:
    return hf_checkpoint_name(param_name).replace(".mlp.", ".block_sparse_moe.")


class MixtralForCausalLM(CausalLM):
    def __init__(
        self,
        hf_config: Any,
        architecture: str,
        backend: AttentionBackend,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        cfg = hf_config
        head_dim = hf_head_dim(cfg)
        layers = []
        for i in range(cfg.num_hidden_layers):
            attn = Attention(
                hidden_size=cfg.hidden_size,
                num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads,
                head_dim=head_dim,
                backend=backend,
                dtype=dtype,
                device=device,
                sliding_window=layer_sliding_window(cfg, i),
            )
            moe = SparseMoeBlock(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_local_experts,
                cfg.num_experts_per_tok,
                True,
                dtype,
                device,
                hidden_act=cfg.hidden_act,
                implementation="reference" if backend.name == "reference" else None,
            )
            layers.append(
                DecoderLayer(attn, moe, cfg.hidden_size, cfg.rms_norm_eps, RMSNorm, dtype, device)
            )
        rotary = RotaryEmbedding.from_config(cfg, head_dim, max_model_len, dtype, device)
        super().__init__(
            cfg,
            architecture,
            layers,
            {"default": rotary},
            RMSNorm,
            dtype,
            device,
            checkpoint_name=_checkpoint_name,
        )

    def add_weight_targets(self, mapper: WeightMapper) -> None:
        for i, layer in enumerate(self.layers):
            layer.mlp.add_expert_targets(
                mapper, f"model.layers.{i}.block_sparse_moe", f"layers.{i}.mlp", ("w1", "w3", "w2")
            )
