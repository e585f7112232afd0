"""Reference paged attention: one request at a time, gathered through the block table.

For each request the context's K/V are gathered block by block into a dense [S, Hkv, D] tensor,
and plain softmax attention runs over it with a causal mask offset by the number of tokens that
were already cached before this step. Scores and softmax are computed in float32 (float64 when the
model runs in float64), whatever the cache dtype.

Soft-capping (Gemma 2's `attn_logit_softcapping` c): scaled scores s become c * tanh(s / c)
before the mask and the softmax, bounding every logit to (-c, c).
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, write_kv_to_cache


def gather_context(
    cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_ids: list[int],
    seq_len: int,
) -> torch.Tensor:  # [seq_len, Hkv, D]
    """The first seq_len tokens of a request's context, in position order."""
    blocks = [cache[block_id] for block_id in block_ids]  # each [block_size, Hkv, D]
    return torch.cat(blocks, dim=0)[:seq_len]


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c * tanh(scores / c), or the scores unchanged when softcap is None."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def attention_mask(
    query_positions: torch.Tensor,  # [Q]
    key_positions: torch.Tensor,  # [S]
    sliding_window: int | None,
) -> torch.Tensor:  # [Q, S] bool, True where the query may see the key
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible &= (query_positions[:, None] - key_positions[None, :]) < sliding_window
    return visible


class ReferenceAttention:
    """Implements `engine.attention.AttentionBackend` in the plainest way."""

    name = "reference"
    supports_softcap = True

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv_to_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        num_q_heads = q.shape[1]
        num_kv_heads = k_cache.shape[2]
        group = num_q_heads // num_kv_heads  # query heads per KV head (GQA)
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        for i in range(meta.num_requests):
            q_start, q_end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            seq_len = meta.seq_lens_cpu[i]
            q_len = q_end - q_start
            num_blocks = -(-seq_len // block_size)
            block_ids = meta.block_table[i, :num_blocks].tolist()

            k = gather_context(k_cache, block_ids, seq_len)  # [S, Hkv, D]
            v = gather_context(v_cache, block_ids, seq_len)
            # Each KV head serves `group` consecutive query heads.
            k = k.repeat_interleave(group, dim=1).to(compute_dtype)  # [S, Hq, D]
            v = v.repeat_interleave(group, dim=1).to(compute_dtype)
            q_i = q[q_start:q_end].to(compute_dtype)  # [Q, Hq, D]

            scores = torch.einsum("qhd,khd->hqk", q_i, k) * scale  # [Hq, Q, S]
            scores = soft_cap(scores, softcap)
            # The query tokens are the last q_len tokens of the context.
            query_positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
            key_positions = torch.arange(seq_len, device=q.device)
            mask = attention_mask(query_positions, key_positions, sliding_window)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        return out
