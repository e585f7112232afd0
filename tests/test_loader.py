"""Checkpoint loading: sharded == single file; dtypes; KV cache sizing and its start-up log."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.loader import INDEX_FILE, checkpoint_files
from tests.greedy_compare import assert_same_greedy_tokens


def test_sharded_checkpoint_gives_the_same_outputs(checkpoints, llama_path):
    sharded = checkpoints("llama-sharded", "LlamaForCausalLM", max_shard_size="40KB")
    assert (sharded / INDEX_FILE).is_file()
    assert len(checkpoint_files(sharded)) > 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9] * 20]
    single = LLM(str(llama_path), dtype="float64").generate(prompts, params, use_tqdm=False)
    multi = LLM(str(sharded), dtype="float64").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in multi] == [o.outputs[0].token_ids for o in single]


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float64", torch.float64),
    ],
)
def test_dtypes(llama_path, dtype, expected):
    llm = LLM(str(llama_path), dtype=dtype, kv_cache_memory_bytes=2**20)
    engine = llm.llm_engine
    assert engine.model_config.dtype == expected
    assert all(p.dtype == expected for p in engine.model.parameters())
    assert engine.runner.kv_caches[0].k.dtype == expected
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_kv_cache_shape_and_startup_log(llama_path, caplog):
    with caplog.at_level(logging.INFO, logger="engine"):
        llm = LLM(str(llama_path), block_size=8, max_model_len=128, num_gpu_blocks_override=40)
    engine = llm.llm_engine
    cache = engine.runner.kv_caches
    cfg = engine.model_config
    assert len(cache) == cfg.num_layers
    assert cache[0].k.shape == (40, 8, cfg.num_kv_heads, cfg.head_dim)
    assert cache[0].v.shape == cache[0].k.shape
    text = caplog.text
    assert "40 blocks of 8 tokens" in text and "320 token slots" in text
    assert "max concurrency at max_model_len=128: 2.50x" in text


def test_block_count_from_memory_budget(llama_path):
    llm = LLM(str(llama_path), block_size=16, kv_cache_memory_bytes=2**20)
    cfg = llm.llm_engine.model_config
    per_block = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32
    assert llm.llm_engine.cache_config.num_blocks == 2**20 // per_block


def test_onednn_linears_match_plain_ones(llama_path, monkeypatch):
    """float32 on CPU: every linear layer is packed for oneDNN and keeps its plain weight for the
    split GEMV (a tied head shares the embedding's storage); bfloat16 keeps the packed copy and
    the bag GEMV's table; ENGINE_SPLIT_GEMV=0 keeps the packed copy only. Outputs equal the
    plain-GEMM model's up to float32 rounding."""
    from engine.models.cpu_gemm import can_pack_for_cpu
    from engine.models.layers import OneDNNLinearMethod
    from engine.models.llama import Linear

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7, 8], [9] * 20, list(range(3, 40))]
    onednn_llm = LLM(str(llama_path), dtype="float32", kv_cache_memory_bytes=2**20)
    model = onednn_llm.llm_engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(
        isinstance(m.method, OneDNNLinearMethod)
        and m.method.split_gemv
        and m.packed is not None
        and m.weight.shape[0] > 0
        and m.weight.is_contiguous()
        for m in linears
    )
    if model.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    packed = onednn_llm.generate(prompts, params, use_tqdm=False)

    def packed_only(llm: LLM) -> bool:
        return all(
            m.packed is not None and m.weight.shape[0] == 0
            for m in llm.llm_engine.model.modules()
            if isinstance(m, Linear)
        )

    if can_pack_for_cpu(torch.bfloat16, torch.device("cpu")):  # + the bag GEMV's tables
        bf16_llm = LLM(str(llama_path), dtype="bfloat16", kv_cache_memory_bytes=2**20)
        assert packed_only(bf16_llm) and all(
            m.method.bag_gemv and m.gemv_table is not None
            for m in bf16_llm.llm_engine.model.modules()
            if isinstance(m, Linear)
        )
        del bf16_llm
    monkeypatch.setenv("ENGINE_SPLIT_GEMV", "0")
    no_split = LLM(str(llama_path), dtype="float32", kv_cache_memory_bytes=2**20)
    assert packed_only(no_split)
    torch.testing.assert_close(
        no_split.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids,
        packed[0].outputs[0].token_ids,
    )

    monkeypatch.setenv("ENGINE_ONEDNN_LINEAR", "0")
    plain_llm = LLM(str(llama_path), dtype="float32", kv_cache_memory_bytes=2**20)
    assert all(
        not isinstance(m.method, OneDNNLinearMethod) and m.weight.shape[0] > 0
        for m in plain_llm.llm_engine.model.modules()
        if isinstance(m, Linear)
    )
    plain = plain_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(packed, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp_a = [next(iter(p.values())).logprob for p in a.outputs[0].logprobs]
        lp_b = [next(iter(p.values())).logprob for p in b.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=1e-4, atol=1e-4)


def test_bfloat16_batch1_decode_takes_the_bag_gemv(llama_path, monkeypatch):
    """bfloat16 on CPU: a request decoding alone runs its linears on the bag GEMV (one row),
    and gives oneDNN's tokens (ENGINE_SPLIT_GEMV=0: no tables, oneDNN at every row count)."""
    from engine.models import layers
    from engine.models.cpu_gemm import can_pack_for_cpu
    from engine.models.llama import Linear

    if not can_pack_for_cpu(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bfloat16 kernels on this CPU")
    calls: list[int] = []
    real = layers.bag_gemv
    monkeypatch.setattr(layers, "bag_gemv", lambda *args: calls.append(1) or real(*args))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7, 8], [9] * 20, list(range(3, 40))]

    def run(llm: LLM) -> list:  # one request at a time: every decode step has one row
        return [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]

    bag_llm = LLM(str(llama_path), dtype="bfloat16", kv_cache_memory_bytes=2**20)
    num_linears = sum(isinstance(m, Linear) for m in bag_llm.llm_engine.model.modules())
    with_bag = run(bag_llm)
    # Every linear of every decode step (11 per request after the prompt's step).
    assert len(calls) >= len(prompts) * 11 * num_linears
    del bag_llm
    monkeypatch.setenv("ENGINE_SPLIT_GEMV", "0")
    calls.clear()
    onednn_llm = LLM(str(llama_path), dtype="bfloat16", kv_cache_memory_bytes=2**20)
    assert all(
        m.gemv_table is None for m in onednn_llm.llm_engine.model.modules() if isinstance(m, Linear)
    )
    without = run(onednn_llm)
    assert not calls
    for ours, theirs in zip(with_bag, without, strict=True):
        assert_same_greedy_tokens(ours, theirs, tol=0.1, tie_tol=0.1)
