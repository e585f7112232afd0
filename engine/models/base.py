"""The decoder-only causal LM skeleton that family files fill in (Gemma 2/3, Phi-3, MoE).

A family builds its `DecoderLayer`s (attention + MLP or MoE from layers.py / moe.py, with the
family's norms) and hands them to `CausalLM`, which owns the rest:

    embed_tokens (x embed_scale) -> layers -> norm -> lm_head (-> final soft-cap)

Rotary tables: `rotaries` maps a key to a RotaryEmbedding; each layer names the table it uses
(`DecoderLayer.rope_key`: Gemma 3's local and global layers differ in theta); the tables are
looked up once per forward. Loading: HF checkpoint names through the weight mapper (families add
targets, e.g. stacked experts, in `add_weight_targets`), then every Linear gets its weight
format; a tied head takes the embedding's values.

Forward contract (as llama.py): forward(input_ids [T], positions [T], kv_caches, meta) ->
hidden [T, H]; compute_logits(hidden [N, H]) -> [N, V].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.distributed.parallel_state import current_tp
from engine.kv_cache import LayerKVCache
from engine.models.layers import (
    Attention,
    Linear,
    LinearMethod,
    NormFactory,
    UnquantizedLinearMethod,
    VocabParallelEmbedding,
    default_linear_method,
    gather_logits,
    lm_head_linear,
)
from engine.models.rotary import RotaryEmbedding
from engine.models.weight_mapper import WeightMapper, hf_checkpoint_name

RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (cos, sin) [T, 1, R] each


def layer_sliding_window(cfg: Any, layer_idx: int) -> int | None:
    """The layer's window: per `layer_types` when the config has them (Gemma, Qwen), else
    `sliding_window` on every layer (Mistral, Mixtral, Phi-3); None means global."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if not window:
        return None
    if layer_types is not None:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    return int(window)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; with `sandwich`, Gemma's extra norms after attention and MLP:

        h = x + post_attention_norm(attn(input_norm(x)))         (sandwich)
        out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    or
        h = x + attn(input_norm(x)); out = h + mlp(post_attention_norm(h))
    """

    def __init__(
        self,
        self_attn: Attention,
        mlp: nn.Module,
        hidden_size: int,
        eps: float,
        norm: NormFactory,
        dtype: torch.dtype,
        device: torch.device,
        sandwich: bool = False,
        rope_key: str = "default",
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.rope_key = rope_key
        self.sandwich = sandwich
        self.input_layernorm = norm(hidden_size, eps, dtype, device)
        self.post_attention_layernorm = norm(hidden_size, eps, dtype, device)
        if sandwich:
            self.pre_feedforward_layernorm = norm(hidden_size, eps, dtype, device)
            self.post_feedforward_layernorm = norm(hidden_size, eps, dtype, device)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: RopeTables,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        cos, sin = rope[self.rope_key]
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class CausalLM(nn.Module):
    """Embedding, the family's layers, final norm and LM head; see the module docstring."""

    def __init__(
        self,
        hf_config: Any,
        architecture: str,
        layers: Iterable[DecoderLayer],
        rotaries: dict[str, RotaryEmbedding],
        norm: NormFactory,
        dtype: torch.dtype,
        device: torch.device,
        embed_scale: float | None = None,
        final_logit_softcapping: float | None = None,
        checkpoint_name: Callable[[str], str] = hf_checkpoint_name,
    ) -> None:
        super().__init__()
        cfg = hf_config
        self.hf_config = cfg
        self.architecture = architecture
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.tp = current_tp()
        self.vocab_size = int(cfg.vocab_size)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        # As transformers: the scale is a float32 scalar cast to the model dtype.
        self.embed_scale = (
            None if embed_scale is None else float(torch.tensor(embed_scale).to(dtype))
        )
        self.layers = nn.ModuleList(layers)
        self.rotaries = nn.ModuleDict(rotaries)
        self.norm = norm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = lm_head_linear(cfg.hidden_size, cfg.vocab_size, dtype, device)
        self.final_logit_softcapping = final_logit_softcapping
        self.checkpoint_name = checkpoint_name

    def rope_tables(self, positions: torch.Tensor, meta: AttentionMetadata) -> RopeTables:
        return {key: rotary(positions) for key, rotary in self.rotaries.items()}

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rope = self.rope_tables(positions, meta)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        """With tensor parallelism rank 0 gets the gathered logits, the others None."""
        logits = gather_logits(self.lm_head(hidden), self.tp, self.vocab_size)
        if logits is None:
            return None  # type: ignore[return-value]
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- loading ---------------------------------------------------------------------------

    def add_weight_targets(self, mapper: WeightMapper) -> None:
        """Hook for families whose checkpoint names need more than the default mapping."""

    def weight_mapper(self) -> WeightMapper:
        tied = ("lm_head.weight",) if self.tie_word_embeddings else ()
        mapper = WeightMapper(
            self, checkpoint_name=self.checkpoint_name, skip_params=tied, ignore_names=tied
        )
        self.add_weight_targets(mapper)
        return mapper

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        method_for: Callable[[str, Linear], LinearMethod] | None = None,
    ) -> None:
        """Fills every parameter from HF-named checkpoint tensors (ValueError for a wrong
        shape or a missing weight), then gives every linear layer its weight format."""
        self.weight_mapper().load(weights)
        self.process_weights(method_for)

    def process_weights(
        self, method_for: Callable[[str, Linear], LinearMethod] | None = None
    ) -> None:
        """Ties the head (the embedding's values) and converts every linear layer to its
        method's format (default: `default_linear_method`), as llama.py does."""
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
