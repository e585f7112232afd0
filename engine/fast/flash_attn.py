"""The flash-attn adapter (`--attention-backend flash-attn`): paged attention with FlashAttention-2
kernels on CUDA.

Owns `FlashAttnBackend`, which turns `AttentionMetadata` into the arguments of flash-attn's two
documented entry points:

* decode-only steps (every query is one token) call
  `flash_attn_with_kvcache(q [B, 1, Hq, D], k_cache, v_cache, cache_seqlens=seq_lens,
  block_table=block_table, softmax_scale, causal=True, window_size)`;
* any other step (prompt chunks mixed with decodes) calls
  `flash_attn_varlen_func(q [T, Hq, D], k, v, cu_seqlens_q=query_start_loc,
  cu_seqlens_k=[0, cumsum(seq_lens)], max_seqlen_q, max_seqlen_k, softmax_scale, causal=True,
  window_size, block_table)`.

Constraints honoured: flash-attn reads a paged cache only when the page (our block) size is a
multiple of 256; for other block sizes the step's context is first gathered through the block
table into packed [sum(seq_lens), Hkv, D] tensors and varlen runs on those without a block table.
The kernels take float16 / bfloat16 only; other dtypes (float32 or float64 models) go to the
torch-native backend, with one log line. Causal masks are bottom-right aligned (the query is the
last q_len tokens of the context) and a sliding window w maps to window_size=(w - 1, 0), so a
query at position p sees keys j with p - w < j <= p, as in Hugging Face.

Soft-capping (Gemma 2) maps to the kernels' `softcap` argument (flash-attn >= 2.6); it is passed
only when a layer asks for it, so older flash-attn still runs every other model, and a layer that
needs it on a flash-attn without it is a ValueError naming the version needed. The torch fallback
(unsupported dtypes) caps too.

flash-attn is imported only when the backend is built without injected kernels, never at module
import, so this module loads on any machine; tests inject a pure-torch emulation of the two
functions (`FlashAttnKernels`) to check the arguments and results on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, write_kv_to_cache
from engine.fast.torch_native import TorchNativeAttention

logger = logging.getLogger(__name__)

# flash-attn 2 reads a paged KV cache only with page_block_size a multiple of this.
PAGED_BLOCK_MULTIPLE = 256


@dataclass(frozen=True, slots=True)
class FlashAttnKernels:
    """The two flash-attn functions the backend calls, and what they accept."""

    varlen: Callable[..., torch.Tensor]  # flash_attn_varlen_func
    with_kvcache: Callable[..., torch.Tensor]  # flash_attn_with_kvcache
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    paged_block_multiple: int = PAGED_BLOCK_MULTIPLE
    supports_softcap: bool = True  # the kernels take `softcap` (flash-attn >= 2.6)


def load_kernels() -> FlashAttnKernels:
    """The installed flash-attn's kernels; ImportError when flash-attn is missing or broken."""
    import inspect

    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    return FlashAttnKernels(
        varlen=flash_attn_varlen_func,
        with_kvcache=flash_attn_with_kvcache,
        supports_softcap="softcap" in inspect.signature(flash_attn_varlen_func).parameters,
    )


def window_size(sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right) for HF's window: keys j with p - j < w, i.e. left = w - 1."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


@dataclass(frozen=True, slots=True)
class _StepArgs:
    """Per-step tensors shared by every layer."""

    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    # Cache slot of every context token, packed request after request; only for block sizes
    # flash-attn cannot page over.
    context_slots: torch.Tensor | None  # [sum(seq_lens)] int64


def context_slots(meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    """Cache slots of all requests' context tokens, in packed order."""
    device = meta.block_table.device
    seq_lens = meta.seq_lens.to(torch.int64)  # [B]
    total = int(sum(meta.seq_lens_cpu))
    request = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), seq_lens)
    starts = torch.cumsum(seq_lens, 0) - seq_lens  # [B]
    position = torch.arange(total, device=device) - starts[request]  # [total]
    blocks = meta.block_table.to(torch.int64)[request, position // block_size]
    return blocks * block_size + position % block_size


class FlashAttnBackend:
    """Implements `engine.attention.AttentionBackend` with flash-attn kernels."""

    name = "flash-attn"

    def __init__(self, kernels: FlashAttnKernels | None = None) -> None:
        self.kernels = kernels if kernels is not None else load_kernels()
        self.supports_softcap = self.kernels.supports_softcap
        self._fallback = TorchNativeAttention()
        self._warned_dtype = False
        self._step_meta: AttentionMetadata | None = None
        self._step: dict[int, _StepArgs] = {}

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_to_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def _step_args(self, meta: AttentionMetadata, block_size: int, paged: bool) -> _StepArgs:
        if meta is not self._step_meta:
            self._step_meta, self._step = meta, {}
        if block_size not in self._step:
            seq_lens = meta.seq_lens.to(torch.int32)
            cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=seq_lens.device)
            cu[1:] = torch.cumsum(seq_lens, 0)
            slots = None if paged else context_slots(meta, block_size)
            self._step[block_size] = _StepArgs(cu_seqlens_k=cu, context_slots=slots)
        return self._step[block_size]

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
        kernels = self.kernels
        if softcap is not None and not kernels.supports_softcap:
            raise ValueError(
                "attention_backend 'flash-attn': this flash-attn has no soft-capping (the "
                "model's attn_logit_softcapping needs flash-attn >= 2.6); upgrade it or use "
                "attention_backend 'torch'"
            )
        if q.dtype not in kernels.supported_dtypes:
            if not self._warned_dtype:
                logger.warning(
                    "flash-attn does not run %s; attention runs on the torch backend", q.dtype
                )
                self._warned_dtype = True
            return self._fallback.forward(q, k_cache, v_cache, meta, scale, sliding_window, softcap)

        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        num_requests = meta.num_requests
        paged = block_size % kernels.paged_block_multiple == 0
        window = window_size(sliding_window)
        # Passed only when set: flash-attn before 2.6 has no such argument.
        extra = {} if softcap is None else {"softcap": softcap}
        if paged and meta.max_query_len == 1:
            out = kernels.with_kvcache(
                q.view(num_requests, 1, q.shape[1], q.shape[2]),
                k_cache,
                v_cache,
                cache_seqlens=meta.seq_lens,
                block_table=meta.block_table,
                softmax_scale=scale,
                causal=True,
                window_size=window,
                **extra,
            )  # [B, 1, Hq, D]
            return out.view(q.shape)

        step = self._step_args(meta, block_size, paged)
        if paged:
            k, v, block_table = k_cache, v_cache, meta.block_table
        else:
            assert step.context_slots is not None
            flat = num_blocks * block_size
            k = k_cache.view(flat, num_kv_heads, head_dim).index_select(0, step.context_slots)
            v = v_cache.view(flat, num_kv_heads, head_dim).index_select(0, step.context_slots)
            block_table = None
        return kernels.varlen(
            q,
            k,
            v,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=step.cu_seqlens_k,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale,
            causal=True,
            window_size=window,
            block_table=block_table,
            **extra,
        )  # [T, Hq, D]
