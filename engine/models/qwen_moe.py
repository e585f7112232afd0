"""Qwen2-MoE and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`).

Attention as in Qwen2 (q/k/v bias, `qkv_bias`) or Qwen3 (per-head q/k RMSNorm,
`attention_bias`); sliding windows per `layer_types` (Qwen2-MoE) or on every layer when set.
Layer i is sparse unless i is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0
(those get a dense gated MLP of `intermediate_size`). The MoE block: softmax over `num_experts`,
top `num_experts_per_tok`, renormalised when `norm_topk_prob`; experts of
`moe_intermediate_size`; Qwen2-MoE adds a shared expert (`shared_expert_intermediate_size`)
scaled by sigmoid(`shared_expert_gate`). Checkpoint names are HF's (`mlp.experts.{e}.gate_proj`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention import AttentionBackend
from engine.config import hf_head_dim
from engine.models.base import CausalLM, DecoderLayer, layer_sliding_window
from engine.models.layers import Attention, GatedMLP, RMSNorm
from engine.models.moe import SparseMoeBlock
from engine.models.rotary import RotaryEmbedding
from engine.models.weight_mapper import WeightMapper


def _is_sparse(cfg: Any, layer_idx: int) -> bool:
    return (
        layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
        and cfg.num_experts > 0
        and (layer_idx + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0
    )


class QwenMoeForCausalLM(CausalLM):
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
        qwen3 = architecture == "Qwen3MoeForCausalLM"
        head_dim = hf_head_dim(cfg)
        eps = cfg.rms_norm_eps
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
                qkv_bias=bool(cfg.attention_bias if qwen3 else getattr(cfg, "qkv_bias", True)),
                o_bias=bool(cfg.attention_bias) if qwen3 else False,
                sliding_window=layer_sliding_window(cfg, i),
                q_norm=RMSNorm(head_dim, eps, dtype, device) if qwen3 else None,
                k_norm=RMSNorm(head_dim, eps, dtype, device) if qwen3 else None,
            )
            mlp: nn.Module
            if _is_sparse(cfg, i):
                mlp = SparseMoeBlock(
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                    cfg.num_experts,
                    cfg.num_experts_per_tok,
                    bool(cfg.norm_topk_prob),
                    dtype,
                    device,
                    shared_expert_intermediate_size=getattr(
                        cfg, "shared_expert_intermediate_size", None
                    ),
                    hidden_act=cfg.hidden_act,
                    implementation="reference" if backend.name == "reference" else None,
                )
            else:
                mlp = GatedMLP(
                    cfg.hidden_size, cfg.intermediate_size, False, cfg.hidden_act, dtype, device
                )
            layers.append(DecoderLayer(attn, mlp, cfg.hidden_size, eps, RMSNorm, dtype, device))
        rotary = RotaryEmbedding.from_config(cfg, head_dim, max_model_len, dtype, device)
        super().__init__(cfg, architecture, layers, {"default": rotary}, RMSNorm, dtype, device)

    def add_weight_targets(self, mapper: WeightMapper) -> None:
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.add_expert_targets(mapper, f"model.layers.{i}.mlp", f"layers.{i}.mlp")
