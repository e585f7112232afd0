"""The vectorised torch backend equals the reference backend on the same paged cache.

Hypothesis draws mixed batches: decodes next to prompt chunks whose earlier tokens are already
cached (chunk offsets), GQA ratios, block sizes, sliding windows and a shuffled block table with
spare blocks full of garbage that must never be read, with and without attention-logit
soft-capping (Gemma 2). Both backends write the new K/V through the slot mapping into copies of
one cache and attend over it; float64 results must agree to 1e-12. One step's layers may differ
in window and soft-cap (Gemma 2 alternates sliding and global layers): the per-layer test runs
several such layers on one backend instance and one metadata object.

`make_batch` is shared with tests/test_fast_backends.py (the flash-attn and xformers contracts).
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.attention import AttentionMetadata
from engine.fast import torch_native
from engine.fast.torch_native import TorchNativeAttention
from engine.reference.attention import ReferenceAttention


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
    backend, batch: Batch, sliding_window: int | None, softcap: float | None = None
) -> tuple[torch.Tensor, ...]:
    """write_kv then forward on private copies of the batch's cache."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    backend.write_kv(batch.k, batch.v, k_cache, v_cache, batch.meta)
    kwargs = {} if softcap is None else {"softcap": softcap}
    out = backend.forward(
        batch.q, k_cache, v_cache, batch.meta, batch.scale, sliding_window, **kwargs
    )
    return out, k_cache, v_cache


# None, or caps from strong (most scores squashed) to weak (about the identity).
softcaps = st.sampled_from([None, 0.7, 3.0, 50.0])


@st.composite
def mixed_batches(draw, max_len: int = 48):
    """Requests that are decodes (q_len 1), whole prompts (q_len = seq_len) or prompt chunks on
    top of a cached prefix, in any order."""
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


# One backend instance across examples, as in an engine: its per-step plan cache must notice
# every new metadata object.
_TORCH = TorchNativeAttention()
_REFERENCE = ReferenceAttention()


@settings(max_examples=150, deadline=None)
@given(
    mixed_batches(),
    st.one_of(st.none(), st.integers(1, 20)),
    st.sampled_from([None, 64, 512]),
    softcaps,
)
def test_torch_backend_equals_reference_float64(params, sliding_window, score_cap, softcap):
    batch = make_batch(**params)
    expected, ref_k, ref_v = run_backend(_REFERENCE, batch, sliding_window, softcap)
    if score_cap is None:
        out, k_cache, v_cache = run_backend(_TORCH, batch, sliding_window, softcap)
    else:  # tiny caps force prompt chunks into several groups
        with mock.patch.object(torch_native, "MAX_SCORE_ELEMENTS", score_cap):
            backend = TorchNativeAttention()
            out, k_cache, v_cache = run_backend(backend, batch, sliding_window, softcap)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(mixed_batches(), st.one_of(st.none(), st.integers(1, 20)), softcaps)
def test_decodes_through_sdpa_equal_reference_float64(params, sliding_window, softcap):
    """With more KV heads than MAX_DECODE_KV_HEADS, decode groups take the SDPA path (or, with
    a soft-cap, its explicit-GEMM twin)."""
    batch = make_batch(**params)
    expected, _, _ = run_backend(_REFERENCE, batch, sliding_window, softcap)
    with mock.patch.object(torch_native, "MAX_DECODE_KV_HEADS", 0):
        backend = TorchNativeAttention()
        out, _, _ = run_backend(backend, batch, sliding_window, softcap)
        assert all(g.value_rows is None for g in backend._plans[next(iter(backend._plans))].groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(mixed_batches(), st.one_of(st.none(), st.integers(1, 20)), softcaps)
def test_torch_backend_close_to_reference_float32(params, sliding_window, softcap):
    batch = make_batch(**params, dtype=torch.float32)
    expected, _, _ = run_backend(_REFERENCE, batch, sliding_window, softcap)
    out, _, _ = run_backend(_TORCH, batch, sliding_window, softcap)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# A step's layers, as Gemma 2 and 3 build them: sliding and global layers alternate, each with
# its own window (and, in Gemma 2, every layer soft-capped).
layer_specs = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(1, 20)), softcaps), min_size=2, max_size=4
)


@settings(max_examples=40, deadline=None)
@given(mixed_batches(), layer_specs)
def test_per_layer_windows_and_softcaps_equal_reference(params, layers):
    """One backend instance, one metadata object, several layers that differ in window and
    soft-cap: each layer's output equals the reference's for its own settings (the per-step plan
    cache must key on them)."""
    batch = make_batch(**params)
    backend = TorchNativeAttention()
    for sliding_window, softcap in layers + layers:  # revisits cached plans too
        expected, _, _ = run_backend(_REFERENCE, batch, sliding_window, softcap)
        out, _, _ = run_backend(backend, batch, sliding_window, softcap)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_softcap_changes_the_output():
    """The cap is applied (a backend ignoring it would pass the equality tests only with the
    reference ignoring it too)."""
    batch = make_batch([(20, 1), (9, 9)], 4, 2, 2, 8, seed=4)
    plain, _, _ = run_backend(_TORCH, batch, None)
    capped, _, _ = run_backend(_TORCH, batch, None, softcap=0.7)
    assert not torch.allclose(plain, capped, atol=1e-3)
    weak, _, _ = run_backend(_TORCH, batch, None, softcap=1e6)  # tanh(s / c) * c ~ s
    torch.testing.assert_close(weak, plain, rtol=1e-8, atol=1e-8)


def test_plan_is_shared_by_layers_and_rebuilt_for_a_new_step():
    backend = TorchNativeAttention()
    first = make_batch([(20, 1), (7, 7), (33, 5)], 4, 2, 2, 8, seed=1)
    second = make_batch([(20, 1), (7, 7), (33, 5)], 4, 2, 2, 8, seed=2)
    plan = backend.plan(first.meta, 4, 2, None)
    assert backend.plan(first.meta, 4, 2, None) is plan  # the next layer of the same step
    assert backend.plan(first.meta, 4, 2, 3) is not plan  # a sliding-window layer
    assert backend.plan(second.meta, 4, 2, None) is not plan  # the next step
    # Decodes and the two prompt chunks (7 and 5 new tokens) are separate groups.
    assert sorted(g.max_query_len for g in plan.groups) == [1, 7]


def test_decode_only_batch_uses_the_gather_free_path():
    batch = make_batch([(9, 1), (30, 1), (1, 1)], 4, 3, 3, 8, seed=3)
    plan = TorchNativeAttention().plan(batch.meta, 4, 3, None, num_kv_heads=3)
    assert len(plan.groups) == 1 and plan.groups[0].query_index is None
    # Decodes weight value rows straight out of the cache: 3 requests x 3 KV heads x 3 query
    # heads per KV head, each over the group's 32 padded key slots (the longest context, 30
    # tokens, fills 8 blocks of 4).
    assert plan.groups[0].value_rows.shape == (3 * 3 * 3 * 32,)
    assert plan.groups[0].bag_offsets.tolist() == list(range(0, 3 * 3 * 3 * 32, 32))
    expected, _, _ = run_backend(_REFERENCE, batch, None)
    out, _, _ = run_backend(TorchNativeAttention(), batch, None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
