"""Reference paged attention equals dense causal attention on the same K/V.

Hypothesis draws request lengths (with part of each context already cached), head counts with
GQA ratios, block sizes, sliding windows, attention-logit soft-caps (Gemma 2) and a shuffled
block assignment; the K/V are written through the slot
mapping, so the test also checks the write path and the block-table gather. The strategy and the
dense attention come from the research kit (engine/testing/strategies.py).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings

from engine.attention import AttentionMetadata
from engine.reference.attention import ReferenceAttention
from engine.testing.strategies import dense_causal_attention
from engine.testing.strategies import reference_batches as batches


@settings(max_examples=60, deadline=None)
@given(batches())
def test_reference_paged_equals_dense(batch):
    block_size, num_kv_heads, group, head_dim, requests, window, softcap, seed = batch
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    num_q_heads = num_kv_heads * group
    blocks_needed = [-(-s // block_size) for s, _ in requests]
    num_blocks = sum(blocks_needed) + 3  # spare blocks hold garbage that must never be read
    order = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled block ids
    k_cache = torch.randn(
        num_blocks, block_size, num_kv_heads, head_dim, generator=gen, dtype=dtype
    )
    v_cache = torch.randn(
        num_blocks, block_size, num_kv_heads, head_dim, generator=gen, dtype=dtype
    )

    tables, contexts_k, contexts_v = [], [], []
    for seq_len, n_blocks in zip([s for s, _ in requests], blocks_needed, strict=True):
        tables.append([order.pop() for _ in range(n_blocks)])
        contexts_k.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, dtype=dtype))
        contexts_v.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, dtype=dtype))

    backend = ReferenceAttention()
    # Earlier steps' tokens are already in the cache; write them the same way.
    for (seq_len, q_len), table, k, v in zip(requests, tables, contexts_k, contexts_v, strict=True):
        cached = seq_len - q_len
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(cached)],
            dtype=torch.int64,
        )
        if cached:
            k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[:cached]
            v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[:cached]

    qsl, slot_mapping, new_k, new_v, queries = [0], [], [], [], []
    for (seq_len, q_len), table, k, v in zip(requests, tables, contexts_k, contexts_v, strict=True):
        qsl.append(qsl[-1] + q_len)
        for p in range(seq_len - q_len, seq_len):
            slot_mapping.append(table[p // block_size] * block_size + p % block_size)
        new_k.append(k[seq_len - q_len :])
        new_v.append(v[seq_len - q_len :])
        queries.append(torch.randn(q_len, num_q_heads, head_dim, generator=gen, dtype=dtype))
    width = max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = [s for s, _ in requests]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        block_table=block_table,
        max_query_len=max(q for _, q in requests),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_cpu=tuple(qsl),
        seq_lens_cpu=tuple(seq_lens),
    )
    scale = head_dim**-0.5
    backend.write_kv(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, meta)
    out = backend.forward(torch.cat(queries), k_cache, v_cache, meta, scale, window, softcap)

    for i, ((seq_len, q_len), k, v, q) in enumerate(
        zip(requests, contexts_k, contexts_v, queries, strict=True)
    ):
        expected = dense_causal_attention(q, k, v, scale, seq_len - q_len, window, softcap)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], expected, rtol=1e-12, atol=1e-12)
