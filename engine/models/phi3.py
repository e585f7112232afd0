"""Phi-3 (`Phi3ForCausalLM`): Llama's layer with

fused tensors    the checkpoint stores `qkv_proj` and `gate_up_proj` fused (the engine's
                 own layout: loaded as they are)
partial rotary   only the first partial_rotary_factor * head_dim features of a head rotate
longrope / su    short and long rope factors (rotary.LongRopeEmbedding), chosen per request
                 by whether its context exceeds original_max_position_embeddings
sliding window   config.sliding_window on every layer, when set
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention import AttentionBackend
from engine.config import hf_head_dim
from engine.models.base import CausalLM, DecoderLayer, layer_sliding_window
from engine.models.layers import Attention, GatedMLP, RMSNorm
from engine.models.rotary import RotaryEmbedding, longrope_embedding, rope_parameters


class Phi3ForCausalLM(CausalLM):
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
        params = rope_parameters(cfg)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("longrope", "su"):
            rotary = longrope_embedding(cfg, head_dim, max_model_len, dtype, device)
        else:
            rotary = RotaryEmbedding.from_config(cfg, head_dim, max_model_len, dtype, device)
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
                rotary=rotary.apply,
            )
            mlp = GatedMLP(
                cfg.hidden_size, cfg.intermediate_size, False, cfg.hidden_act, dtype, device
            )
            layers.append(
                DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, RMSNorm, dtype, device)
            )
        super().__init__(cfg, architecture, layers, {"default": rotary}, RMSNorm, dtype, device)
