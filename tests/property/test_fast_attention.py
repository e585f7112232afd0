"""The vectorised torch backend equals the reference backend on the same paged cache.

Hypothesis draws mixed batches: decodes next to prompt chunks whose earlier tokens are already
cached (chunk offsets), GQA ratios, block sizes, sliding windows and a shuffled block table with
spare blocks full of garbage that must never be read, with and without attention-logit
soft-capping (Gemma 2). Both backends write the new K/V through the slot mapping into copies of
one cache and attend over it; float64 results must agree to 1e-12. One step's layers may differ
in window and soft-cap (Gemma 2 alternates sliding and global layers): the per-layer test runs
several such layers on one backend instance and one metadata object.

`make_batch`, `run_backend` and the strategies come from the research kit
(engine/testing/strategies.py), which any new backend can use the same way
(`engine.testing.check_attention_backend`; the last test here applies it to the torch backend).
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.fast import torch_native
from engine.fast.torch_native import TorchNativeAttention
from engine.reference.attention import ReferenceAttention
from engine.testing import check_attention_backend
from engine.testing.strategies import make_batch, mixed_batches, run_backend, softcaps

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


@settings(max_examples=60, deadline=None)
@given(mixed_batches(), st.one_of(st.none(), st.integers(1, 20)), softcaps)
def test_fresh_prompts_through_the_causal_kernel_equal_reference_float64(
    params, sliding_window, softcap
):
    """With CAUSAL_MIN_QUERY at 1, every group of fresh prompts takes SDPA's causal kernel
    (unfolded query heads, enable_gqa); the rest of the batch is unchanged."""
    batch = make_batch(**params)
    expected, _, _ = run_backend(_REFERENCE, batch, sliding_window, softcap)
    with mock.patch.object(torch_native, "CAUSAL_MIN_QUERY", 1):
        out, _, _ = run_backend(TorchNativeAttention(), batch, sliding_window, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fresh_prompt_groups_take_the_causal_kernel(dtype):
    """Two fresh prompts of different lengths (the shorter padded, with garbage past its end)
    make a causal group; a prompt chunk after cached tokens, a window or a query shorter than
    CAUSAL_MIN_QUERY keep the mask. Equal to the reference either way."""
    fresh = make_batch([(9, 9), (5, 5)], 4, 3, 3, 8, seed=7, dtype=dtype)
    chunked = make_batch([(9, 9), (12, 8)], 4, 3, 3, 8, seed=7, dtype=dtype)  # one group
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    with mock.patch.object(torch_native, "CAUSAL_MIN_QUERY", 5):
        plan = TorchNativeAttention().plan(fresh.meta, 4, 3, None, dtype, num_kv_heads=3)
        assert [g.causal for g in plan.groups] == [True]
        windowed = TorchNativeAttention().plan(fresh.meta, 4, 3, 6, dtype, num_kv_heads=3)
        assert not any(g.causal for g in windowed.groups)
        mixed = TorchNativeAttention().plan(chunked.meta, 4, 3, None, dtype, num_kv_heads=3)
        assert [g.causal for g in mixed.groups] == [False]  # 4 cached tokens before one
        for batch in (fresh, chunked):
            expected, _, _ = run_backend(_REFERENCE, batch, None)
            out, _, _ = run_backend(TorchNativeAttention(), batch, None)
            torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    with mock.patch.object(torch_native, "CAUSAL_MIN_QUERY", 10):
        plan = TorchNativeAttention().plan(fresh.meta, 4, 3, None, dtype, num_kv_heads=3)
        assert not any(g.causal for g in plan.groups)


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


@pytest.mark.parametrize(
    "requests",
    [[(1, 1)], [(17, 1)], [(64, 1)], [(17, 1), (9, 9)], [(30, 1), (12, 5), (3, 3)]],
    ids=["one-key", "partial-block", "full-blocks", "with-a-prompt", "with-two-prompts"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_one_decode_request_takes_the_unmasked_sdpa_path(requests, dtype):
    """A group of one decode request (batch-1 decode, or one decode beside prompt chunks) gets
    `single_len` = L and runs `_attend_group`'s SDPA over exactly its L cached keys without a
    mask; equal to the reference (float64 to 1e-12), GQA folded (3 KV heads x 3 query heads),
    with garbage past seq_len."""
    batch = make_batch(requests, 4, 3, 3, 8, seed=5, dtype=dtype)
    plan = TorchNativeAttention().plan(batch.meta, 4, 3, None, dtype, num_kv_heads=3)
    singles = [g for g in plan.groups if g.single_len is not None]
    assert [g.single_len for g in singles] == [requests[0][0]]
    windowed = TorchNativeAttention().plan(batch.meta, 4, 3, 5, dtype, num_kv_heads=3)
    assert all(g.single_len is None for g in windowed.groups)  # windows keep the masked paths
    expected, _, _ = run_backend(_REFERENCE, batch, None)
    out, _, _ = run_backend(TorchNativeAttention(), batch, None)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_lone_decode_reuses_its_views_across_layers_and_rebuilds_them_per_step():
    """A batch of one decode request gathers into scratch whose attention views the first layer
    of a step makes: every later layer (other caches, other queries) still reads its own keys,
    and a new step (new metadata, another length), another dtype or block size rebuilds them."""
    backend = TorchNativeAttention()
    steps = [([(17, 1)], 4, torch.float64), ([(40, 1)], 4, torch.float64),
             ([(5, 1)], 4, torch.float32), ([(23, 1)], 8, torch.float32)]  # fmt: skip
    for step, (requests, block_size, dtype) in enumerate(steps):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        batch = make_batch(requests, block_size, 3, 3, 8, seed=step, dtype=dtype)
        gen = torch.Generator().manual_seed(step)
        for layer in range(3):  # one metadata object (one step), three layers
            if layer:  # another layer: its own cache contents, query and new K/V
                batch = dataclasses.replace(
                    batch,
                    **{
                        name: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype)
                        for name, t in vars(batch).items()
                        if name in ("q", "k", "v", "k_cache", "v_cache")
                    },
                )
            expected, _, _ = run_backend(_REFERENCE, batch, None)
            out, _, _ = run_backend(backend, batch, None)
            torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        assert backend._lone is not None and backend._lone.group.single_len == requests[0][0]


def test_torch_backend_passes_the_kit(tmp_path):
    """The kit's own check (the entry point for new backends) on the torch backend."""
    check_attention_backend(TorchNativeAttention, max_examples=40, repro_dir=tmp_path)
    check_attention_backend(
        TorchNativeAttention, dtype=torch.float32, max_examples=20, repro_dir=tmp_path
    )
