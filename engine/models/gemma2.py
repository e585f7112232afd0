"""Gemma 2 (`Gemma2ForCausalLM`) and the pieces Gemma 3 shares.

What differs from Llama, all from the config:
    norms            (1 + w) RMSNorm in float32 (OffsetRMSNorm), and "sandwich" layers: extra
                     norms after attention and around the MLP
    embedding        scaled by sqrt(hidden_size)
    MLP              GeGLU: gelu(tanh approximation)(gate) * up (`hidden_activation`)
    attention        scale query_pre_attn_scalar ** -0.5; logits soft-capped
                     (attn_logit_softcapping, an attention-backend parameter); sliding-window
                     and global layers alternate per `layer_types`
    logits           final soft-cap: c * tanh(logits / c) (final_logit_softcapping)
Checkpoint names are HF's; the embedding is tied to the head unless the config says otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention import AttentionBackend
from engine.models.base import CausalLM, DecoderLayer, layer_sliding_window
from engine.models.layers import Attention, GatedMLP, OffsetRMSNorm
from engine.models.rotary import RotaryEmbedding


def check_softcap_support(backend: AttentionBackend, softcap: float | None) -> None:
    """A ValueError at load time, not mid-step, when the backend cannot soft-cap."""
    if softcap is not None and not getattr(backend, "supports_softcap", False):
        raise ValueError(
            f"attention_backend {backend.name!r} cannot soft-cap attention logits, which this "
            "model needs (attn_logit_softcapping); use attention_backend 'torch' or 'flash-attn'"
        )


def gemma_layer(
    cfg: Any,
    layer_idx: int,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    qk_norm: bool,
    rope_key: str = "default",
) -> DecoderLayer:
    """One Gemma 2 / 3 decoder layer (Gemma 3 adds q/k norms and per-type rotary)."""
    head_dim = cfg.head_dim
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    attn = Attention(
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        backend=backend,
        dtype=dtype,
        device=device,
        qkv_bias=bool(cfg.attention_bias),
        o_bias=bool(cfg.attention_bias),
        scale=cfg.query_pre_attn_scalar**-0.5,
        sliding_window=layer_sliding_window(cfg, layer_idx),
        q_norm=OffsetRMSNorm(head_dim, cfg.rms_norm_eps, dtype, device) if qk_norm else None,
        k_norm=OffsetRMSNorm(head_dim, cfg.rms_norm_eps, dtype, device) if qk_norm else None,
        backend_kwargs={} if softcap is None else {"softcap": float(softcap)},
    )
    mlp = GatedMLP(
        cfg.hidden_size, cfg.intermediate_size, False, cfg.hidden_activation, dtype, device
    )
    return DecoderLayer(
        attn,
        mlp,
        cfg.hidden_size,
        cfg.rms_norm_eps,
        OffsetRMSNorm,
        dtype,
        device,
        sandwich=True,
        rope_key=rope_key,
    )


class Gemma2ForCausalLM(CausalLM):
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
        layers = [
            gemma_layer(cfg, i, backend, dtype, device, qk_norm=False)
            for i in range(cfg.num_hidden_layers)
        ]
        rotary = RotaryEmbedding.from_config(cfg, cfg.head_dim, max_model_len, dtype, device)
        super().__init__(
            cfg,
            architecture,
            layers,
            {"default": rotary},
            OffsetRMSNorm,
            dtype,
            device,
            embed_scale=cfg.hidden_size**0.5,
            final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        )
