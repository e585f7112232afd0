"""The Llama family (Llama incl. Llama-3 rope scaling, Mistral, Qwen2, Qwen3) over a paged KV cache.

One module serves the four architectures; they differ only in config switches:

    q/k/v bias        Qwen2 always; Llama and Qwen3 when config.attention_bias (o_proj too)
    q/k RMSNorm       Qwen3 (per head, before RoPE)
    sliding window    Mistral (config.sliding_window on every layer); Qwen2/3 per
                      config.layer_types == "sliding_attention"

The shared pieces (linear layers and their weight formats, RMSNorm, attention, gated MLP) live in
layers.py, rotary embeddings in rotary.py and the checkpoint-name mapping in weight_mapper.py;
this file holds only the Llama-family switches and the model's top level.

The forward takes packed tokens (no padding, no batch dimension) and explicit attention metadata:

    forward(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, hidden_size]
    compute_logits(hidden [N, hidden_size]) -> [N, vocab]

Weights are stored fused (q/k/v in one `qkv_proj`, gate/up in one `gate_up_proj`) so that each
layer runs two GEMMs fewer; the weight mapper fills the fused shards from HF's split tensors.

Numerics follow transformers' implementation exactly where it matters for token-for-token
agreement: RMSNorm normalises in float32 and casts back before the weight multiply, and RoPE's
cos/sin are computed in float32 and then cast to the model dtype (also in float64 runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import hf_head_dim
from engine.distributed.parallel_state import current_tp
from engine.kv_cache import LayerKVCache
from engine.models.layers import (
    Attention,
    GatedMLP,
    Linear,
    LinearMethod,
    RMSNorm,
    UnquantizedLinearMethod,
    VocabParallelEmbedding,
    default_linear_method,
    gather_logits,
    lm_head_linear,
)
from engine.models.rotary import RotaryEmbedding
from engine.models.weight_mapper import WeightMapper


def _sliding_window(cfg: Any, architecture: str, layer_idx: int) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    if architecture == "MistralForCausalLM":
        return int(window)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] == "sliding_attention":
        return int(window)
    return None


def llama_attention(
    cfg: Any,
    architecture: str,
    layer_idx: int,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
) -> Attention:
    """The attention module with the family's switches (bias, Qwen3's q/k norms, windows)."""
    num_heads = cfg.num_attention_heads
    head_dim = hf_head_dim(cfg)
    if architecture == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
    q_norm = k_norm = None
    if architecture == "Qwen3ForCausalLM":
        q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, dtype, device)
        k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, dtype, device)
    return Attention(
        hidden_size=cfg.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        backend=backend,
        dtype=dtype,
        device=device,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=_sliding_window(cfg, architecture, layer_idx),
        q_norm=q_norm,
        k_norm=k_norm,
    )


class DecoderLayer(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        architecture: str,
        layer_idx: int,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        cfg = hf_config
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device)
        self.self_attn = llama_attention(cfg, architecture, layer_idx, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype, device)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            bool(getattr(cfg, "mlp_bias", False)),
            getattr(cfg, "hidden_act", "silu"),
            dtype,
            device,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)  # fresh [T, H]
        # attn += x in place (the residual stream), then its norm: no new residual tensor.
        h, x = self.post_attention_layernorm.add_norm(attn, x)
        return self.mlp(h).add_(x)  # the MLP's fresh output takes the residual in place


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        architecture: str,
        backend: AttentionBackend,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        cfg = hf_config
        self.hf_config = cfg
        self.architecture = architecture
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.tp = current_tp()
        self.vocab_size = int(cfg.vocab_size)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, architecture, i, backend, dtype, device)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding.from_config(cfg, head_dim, max_model_len, dtype, device)
        # A tied head gets the embedding's values after loading (see process_weights).
        self.lm_head = lm_head_linear(cfg.hidden_size, cfg.vocab_size, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        """With tensor parallelism rank 0 gets the gathered logits, the others None."""
        return gather_logits(self.lm_head(hidden), self.tp, self.vocab_size)  # type: ignore[return-value]

    # ---- loading ---------------------------------------------------------------------------

    def weight_mapper(self) -> WeightMapper:
        tied = ("lm_head.weight",) if self.tie_word_embeddings else ()
        return WeightMapper(self, skip_params=tied, ignore_names=tied)

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        method_for: Callable[[str, Linear], LinearMethod] | None = None,
    ) -> None:
        """Fills every parameter from checkpoint tensors (HF names), then gives every linear
        layer its weight format (`method_for`, default: `default_linear_method`).

        Raises ValueError for a tensor of the wrong shape and for any weight the checkpoint
        lacks; tensors the model does not use are logged and skipped.
        """
        self.weight_mapper().load(weights)
        self.process_weights(method_for)

    def process_weights(
        self, method_for: Callable[[str, Linear], LinearMethod] | None = None
    ) -> None:
        """Ties the head and converts every linear layer to its method's format.

        A tied head takes the embedding's values: shared storage when its method keeps the
        plain weight (then the embedding takes the head's column-major CPU layout), a packed or
        quantized copy otherwise (the lookup keeps the plain embedding).
        """
        emb = self.embed_tokens.weight
        default = default_linear_method(emb.dtype, emb.device)
        choose = method_for or (lambda _name, _layer: default)
        if self.tie_word_embeddings:
            head_method = choose("lm_head", self.lm_head)
            if isinstance(head_method, UnquantizedLinearMethod) and head_method.cpu_gemm_layout:
                emb.data = emb.data.t().contiguous().t()
            self.lm_head.weight.data = emb.data
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading(choose(name, module))
