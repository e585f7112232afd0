"""Rotary position embeddings (rotate-half convention), shared by every family.

`RotaryEmbedding` precomputes cos/sin tables for every position up to max_model_len; a model
looks them up once per forward (`rotary(positions) -> (cos, sin)`, each [T, 1, rotary_dim]) and
each attention layer applies them with `rotary.apply` (or `apply_rope`).

Inverse frequencies come from transformers' own init functions (`ROPE_INIT_FUNCTIONS`) for every
scaled variant, so a checkpoint's `rope_parameters` / `rope_scaling` means what it means in HF;
the plain ("default") variant is computed here with the same float32 arithmetic. Partial rotary
(`partial_rotary_factor` < 1) rotates the first `rotary_dim` features of each head and passes the
rest through, as transformers does. Numerics: cos/sin are computed in float32 and cast to the
model dtype (also in float64 runs), as in transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Variants whose tables depend on the current sequence length ("dynamic") are not supported:
# the tables here are computed once.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "proportional")


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameter dict of a config (new `rope_parameters` or legacy `rope_scaling`).

    Configs with per-layer-type parameters (`{"sliding_attention": {...}, ...}`) are indexed
    with `layer_type`.
    """
    params = (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return dict(params)


def rope_inv_freq(
    hf_config: Any, head_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] (float32) and the cos/sin scaling, as in HF."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        partial = float(
            params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
        )
        dim = int(head_dim * partial)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (theta**exponents), 1.0
    if rope_type in SUPPORTED_ROPE_TYPES:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[rope_type]
        if layer_type is not None:
            inv_freq, scaling = init(hf_config, torch.device("cpu"), layer_type=layer_type)
        else:
            inv_freq, scaling = init(hf_config, torch.device("cpu"))
        return inv_freq.to(torch.float32), float(scaling)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_len, rotate-half convention.

    The sin table carries rotate-half's sign (-sin on the first half), so that a rotation is
    x * cos + roll(x, D / 2) * sin: the same products as transformers' rotate_half, in fewer ops.
    Invariant: `cos` and `sin` are [max_len, rotary_dim] in the model dtype.
    """

    def __init__(
        self,
        inv_freq: torch.Tensor,  # [rotary_dim / 2] float32
        scaling: float,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = 2 * inv_freq.shape[0]
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [L, R / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, R]
        sign = torch.ones(self.rotary_dim)
        sign[: self.rotary_dim // 2] = -1.0
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        self.register_buffer("cos", cos.to(dtype).to(device), persistent=False)
        self.register_buffer("sin", (sin.to(dtype) * sign.to(dtype)).to(device), persistent=False)

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        layer_type: str | None = None,
    ) -> RotaryEmbedding:
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim, layer_type)
        return cls(inv_freq, scaling, head_dim, max_len, dtype, device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, R] each: broadcast over heads by every layer without re-indexing.
        return self.cos[positions, None], self.sin[positions, None]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates the first rotary_dim features of every head of x [T, H, D]."""
        if self.rotary_dim == x.shape[-1]:
            return apply_rope(x, cos, sin)
        rot, rest = x.split([self.rotary_dim, x.shape[-1] - self.rotary_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin), rest), dim=-1)


def apply_rope(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, 1, D]
    sin: torch.Tensor,  # [T, 1, D], with rotate-half's sign (see RotaryEmbedding)
) -> torch.Tensor:
    # (x2, x1) times the signed sin = rotate_half(x) * sin exactly. The halves swap as one
    # flip of a [.., 2, D / 2] view (one copy; roll would narrow, cat and copy), and the
    # products accumulate in place on the fresh temporaries: 11 op calls instead of 17.
    *lead, dim = x.shape
    swapped = x.reshape(*lead, 2, dim // 2).flip(-2).reshape(*lead, dim)
    return (x * cos).add_(swapped.mul_(sin))


def longrope_original_max(hf_config: Any) -> int:
    params = rope_parameters(hf_config)
    value = params.get("original_max_position_embeddings") or getattr(
        hf_config, "original_max_position_embeddings", None
    )
    if not value:
        raise ValueError("longrope scaling needs original_max_position_embeddings in the config")
    return int(value)


def longrope_embedding(
    hf_config: Any, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device
) -> RotaryEmbedding:
    """Phi-3's `longrope` (alias `su`) table: the long factors when the engine serves contexts
    longer than `original_max_position_embeddings` (max_len = max_model_len above it), the short
    factors otherwise. Both carry the same attention scaling.

    The choice is per engine, not per sequence (as vLLM does): a key's rotation must not depend
    on which request computed it, or prefix caching and chunked prefill would mix tables.
    transformers instead picks per forward (long once the sequence passes the threshold) and
    recomputes the whole cache when a sequence crosses it; the two agree token for token when
    max_model_len <= original_max_position_embeddings, and for prompts already past it
    otherwise.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original_max = longrope_original_max(hf_config)
    seq_len = original_max + 1 if max_len > original_max else None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](
        hf_config, torch.device("cpu"), seq_len=seq_len
    )
    return RotaryEmbedding(inv_freq.float(), float(scaling), head_dim, max_len, dtype, device)
