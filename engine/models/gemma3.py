"""Gemma 3 text (`Gemma3ForCausalLM`): Gemma 2's layers (gemma2.py) plus

    q/k norms        (1 + w) RMSNorm per head, before rotary
    rotary per type  local (sliding_attention) and global (full_attention) layers each have
                     their own rope parameters (`rope_parameters[layer_type]`: theta, scaling)
    soft-caps        optional (None in released checkpoints)

Large vocabularies (262k) and head_dim 256 need nothing special here.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention import AttentionBackend
from engine.models.base import CausalLM
from engine.models.gemma2 import check_softcap_support, gemma_layer
from engine.models.layers import OffsetRMSNorm
from engine.models.rotary import RotaryEmbedding


class Gemma3ForCausalLM(CausalLM):
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
        check_softcap_support(backend, getattr(cfg, "attn_logit_softcapping", None))
        layer_types = list(cfg.layer_types)
        layers = [
            gemma_layer(cfg, i, backend, dtype, device, qk_norm=True, rope_key=layer_types[i])
            for i in range(cfg.num_hidden_layers)
        ]
        rotaries = {
            kind: RotaryEmbedding.from_config(
                cfg, cfg.head_dim, max_model_len, dtype, device, layer_type=kind
            )
            for kind in sorted(set(layer_types))
        }
        super().__init__(
            cfg,
            architecture,
            layers,
            rotaries,
            OffsetRMSNorm,
            dtype,
            device,
            embed_scale=cfg.hidden_size**0.5,
            final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        )
