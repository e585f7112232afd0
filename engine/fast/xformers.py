"""The xformers adapter (`--attention-backend xformers`): `memory_efficient_attention` over the
paged cache on CUDA.

Owns `XformersBackend`. Each step's batch (prompt chunks and decodes together) becomes one call
on a single packed "batch of 1", with the per-request structure carried by an attention-bias
object that the kernel reads instead of a dense mask:

* paged mode (no sliding window, block size a multiple of `paged_block_multiple`):
  `PagedBlockDiagonalCausalWithOffsetPaddedKeysMask` over the cache itself, viewed as
  [1, num_blocks * block_size, Hkv, D], with the block table;
* gathered mode (any other block size, and sliding windows, for which xformers has no paged
  bias): every request's blocks are gathered into one padded row of M * block_size keys and
  `BlockDiagonalCausalWithOffsetPaddedKeysMask` (or, with a window w,
  `BlockDiagonalCausalLocalAttentionPaddedKeysMask` with window_size=w) masks padding and the
  future.

GQA uses xformers' 5-D form: q [1, T, Hkv, G, D] against K/V [1, S, Hkv, 1, D] expanded (stride 0)
over G, so K/V are never copied per query head. Causality is "with offset" (bottom-right
aligned): a request's queries are the last q_len tokens of its context. float64 is not supported
by the kernels and goes to the torch-native backend.

Soft-capping (Gemma 2's attention-logit cap) is refused: memory_efficient_attention has no score
hook, so `supports_softcap` is False and a forward with `softcap` raises a ValueError that names
the backends that can (flash-attn, torch); a model that needs it checks this when it is built.

xformers is imported only when the backend is built without injected ops; tests inject an
emulation of `memory_efficient_attention` that materialises the real bias objects (pure Python,
available without CUDA) into dense masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from engine.attention import AttentionMetadata, write_kv_to_cache
from engine.fast.torch_native import TorchNativeAttention

logger = logging.getLogger(__name__)

SOFTCAP_UNSUPPORTED = (
    "attention_backend 'xformers' cannot soft-cap attention logits (the model's "
    "attn_logit_softcapping); use attention_backend 'flash-attn' or 'torch'"
)


@dataclass(frozen=True, slots=True)
class XformersOps:
    """The xformers entry points the backend uses, and what they accept."""

    attention: Callable[..., torch.Tensor]  # xformers.ops.memory_efficient_attention
    attn_bias: ModuleType  # xformers.ops.fmha.attn_bias
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    # Its paged kernels go through flash-attn's, which page only over multiples of 256.
    paged_block_multiple: int = 256


def load_ops() -> XformersOps:
    """The installed xformers' ops; ImportError when xformers is missing."""
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha import attn_bias

    return XformersOps(attention=memory_efficient_attention, attn_bias=attn_bias)


@dataclass(frozen=True, slots=True)
class _StepBias:
    bias: Any  # an xformers AttentionBias
    paged: bool


class XformersBackend:
    """Implements `engine.attention.AttentionBackend` with xformers' memory-efficient attention."""

    name = "xformers"
    supports_softcap = False

    def __init__(self, ops: XformersOps | None = None) -> None:
        self.ops = ops if ops is not None else load_ops()
        self._fallback = TorchNativeAttention()
        self._warned_dtype = False
        self._step_meta: AttentionMetadata | None = None
        self._biases: dict[tuple[int, int | None], _StepBias] = {}

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_to_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def step_bias(
        self, meta: AttentionMetadata, block_size: int, sliding_window: int | None
    ) -> _StepBias:
        """The attention bias of this step (built once, shared by every layer)."""
        if meta is not self._step_meta:
            self._step_meta, self._biases = meta, {}
        key = (block_size, sliding_window)
        if key in self._biases:
            return self._biases[key]
        ab = self.ops.attn_bias
        qsl = meta.query_start_loc_cpu
        q_lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_requests)]
        seq_lens = list(meta.seq_lens_cpu)
        device = meta.block_table.device
        paged = sliding_window is None and block_size % self.ops.paged_block_multiple == 0
        if paged:
            bias = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=q_lens,
                kv_seqlen=seq_lens,
                block_tables=meta.block_table,
                page_size=block_size,
                device=device,
            )
        else:
            row = meta.block_table.shape[1] * block_size  # padded keys per request
            if sliding_window is None:
                bias = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                    q_seqlen=q_lens, kv_padding=row, kv_seqlen=seq_lens, device=device
                )
            else:
                bias = ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local(
                    q_seqlen=q_lens, kv_padding=row, kv_seqlen=seq_lens, window_size=sliding_window
                ).to(device)
        self._biases[key] = _StepBias(bias=bias, paged=paged)
        return self._biases[key]

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [N, bs, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        if softcap is not None:
            raise ValueError(SOFTCAP_UNSUPPORTED)
        if q.dtype not in self.ops.supported_dtypes:
            if not self._warned_dtype:
                logger.warning(
                    "xformers does not run %s; attention runs on the torch backend", q.dtype
                )
                self._warned_dtype = True
            return self._fallback.forward(q, k_cache, v_cache, meta, scale, sliding_window)

        num_tokens, num_q_heads, head_dim = q.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        group = num_q_heads // num_kv_heads
        step = self.step_bias(meta, block_size, sliding_window)
        if step.paged:
            k, v = k_cache, v_cache  # [N, bs, Hkv, D]: the paged bias indexes it directly
        else:
            ids = meta.block_table.reshape(-1).to(torch.int64)  # [B * M]
            k, v = k_cache.index_select(0, ids), v_cache.index_select(0, ids)
        keys = k.shape[0] * block_size
        k5 = k.view(1, keys, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
        v5 = v.view(1, keys, num_kv_heads, 1, head_dim).expand(-1, -1, -1, group, -1)
        q5 = q.view(1, num_tokens, num_kv_heads, group, head_dim)
        out = self.ops.attention(q5, k5, v5, attn_bias=step.bias, scale=scale)
        return out.reshape(num_tokens, num_q_heads, head_dim)
