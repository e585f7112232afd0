"""Hypothesis strategies and batch builders for attention backends (the suite's own, moved here
so that a new backend is tested with exactly the cases the project's backends pass).

`make_batch` builds one step's inputs on a paged cache: requests that are decodes, whole prompts
or prompt chunks on a cached prefix; a shuffled block table; spare blocks and the unused tails of
blocks filled with large garbage that a correct backend never reads. `mixed_batches` draws its
arguments (mixed request kinds, block sizes, GQA ratios, head dims); `reference_batches` draws
the reference-vs-dense cases; `sliding_windows` and `softcaps` the per-layer settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from engine.attention import AttentionMetadata


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new keys of this step
    v: torch.Tensor
    k_cache: torch.Tensor  # [N, bs, Hkv, D], earlier steps' tokens already written
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(
    requests: list[tuple[int, int]],  # (seq_len, q_len) per request
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    spare_blocks: int = 3,
    device: str = "cpu",
) -> Batch:
    """A deterministic batch (same arguments, same tensors) for `requests`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    blocks_needed = [-(-s // block_size) for s, _ in requests]
    num_blocks = sum(blocks_needed) + spare_blocks
    free = torch.randperm(num_blocks, generator=gen).tolist()
    # Garbage everywhere, including the unused tails of blocks, to catch reads past seq_len.
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim) * 100
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim) * 100
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]

    def slot(table: list[int], p: int) -> int:
        return table[p // block_size] * block_size + p % block_size

    qsl, slot_mapping, new_k, new_v = [0], [], [], []
    for (seq_len, q_len), table in zip(requests, tables, strict=True):
        context_k, context_v = (
            randn(seq_len, num_kv_heads, head_dim),
            randn(seq_len, num_kv_heads, head_dim),
        )
        cached = seq_len - q_len  # earlier steps wrote these
        for p in range(cached):
            k_cache.view(-1, num_kv_heads, head_dim)[slot(table, p)] = context_k[p]
            v_cache.view(-1, num_kv_heads, head_dim)[slot(table, p)] = context_v[p]
        new_k.append(context_k[cached:])
        new_v.append(context_v[cached:])
        slot_mapping += [slot(table, p) for p in range(cached, seq_len)]
        qsl.append(qsl[-1] + q_len)
    width = max(len(t) for t in tables)
    seq_lens = [s for s, _ in requests]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        block_table=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
        ),
        max_query_len=max(q for _, q in requests),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_cpu=tuple(qsl),
        seq_lens_cpu=tuple(seq_lens),
    )
    return Batch(
        q=randn(qsl[-1], num_kv_heads * group, head_dim).to(device),
        k=torch.cat(new_k).to(device),
        v=torch.cat(new_v).to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        meta=meta,
        scale=head_dim**-0.5,
    )


def run_backend(
    backend: Any, batch: Batch, sliding_window: int | None, softcap: float | None = None
) -> tuple[torch.Tensor, ...]:
    """write_kv then forward on private copies of the batch's cache: (out, k_cache, v_cache)."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    backend.write_kv(batch.k, batch.v, k_cache, v_cache, batch.meta)
    kwargs = {} if softcap is None else {"softcap": softcap}
    out = backend.forward(
        batch.q, k_cache, v_cache, batch.meta, batch.scale, sliding_window, **kwargs
    )
    return out, k_cache, v_cache


def dense_causal_attention(q, k, v, scale, q_offset, sliding_window=None, softcap=None):
    """q [Q, Hq, D], k/v [S, Hkv, D]; query i sits at position q_offset + i. With softcap c,
    scores s become c * tanh(s / c) (HF Gemma 2's eager attention)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qpos = torch.arange(q.shape[0])[:, None] + q_offset
    kpos = torch.arange(k.shape[0])[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= qpos - kpos < sliding_window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# None, or caps from strong (most scores squashed) to weak (about the identity).
softcaps = st.sampled_from([None, 0.7, 3.0, 50.0])
sliding_windows = st.one_of(st.none(), st.integers(1, 20))


@st.composite
def mixed_batches(draw, max_len: int = 48):
    """make_batch's arguments: requests that are decodes (q_len 1), whole prompts (q_len =
    seq_len) or prompt chunks on top of a cached prefix, in any order."""
    requests = []
    for _ in range(draw(st.integers(1, 6))):
        seq_len = draw(st.integers(1, max_len))
        kind = draw(st.sampled_from(["decode", "prompt", "chunk"]))
        if kind == "decode":
            q_len = 1
        elif kind == "prompt":
            q_len = seq_len
        else:
            q_len = draw(st.integers(1, seq_len))
        requests.append((seq_len, q_len))
    return dict(
        requests=requests,
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        num_kv_heads=draw(st.integers(1, 3)),
        group=draw(st.sampled_from([1, 2, 3, 4])),
        head_dim=draw(st.sampled_from([4, 8, 16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def reference_batches(draw):
    """(block_size, num_kv_heads, group, head_dim, requests, window, softcap, seed) for the
    reference-vs-dense test: any mix of cached prefix and new tokens per request."""
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    num_kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    requests = []
    for _ in range(draw(st.integers(1, 4))):
        seq_len = draw(st.integers(1, 40))
        q_len = draw(st.integers(1, seq_len))  # the rest was cached by earlier steps
        requests.append((seq_len, q_len))
    window = draw(sliding_windows)
    softcap = draw(st.sampled_from([None, 0.5, 2.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return block_size, num_kv_heads, group, head_dim, requests, window, softcap, seed
