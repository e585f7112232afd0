"""The engine's greedy output equals HF transformers `generate`, for every supported architecture.

float64: token for token (differences ~1e-15, so near-ties cannot flip). float32: token for token
up to the first divergence, where each side's token must be in the other's top 5 and the logprob
gap tiny (float32 results legitimately differ between a batch of 1 and a packed batch).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.conftest import ARCH_VARIANTS
from tests.hf_reference import hf_greedy

PROMPT_LENGTHS = [1, 4, 9, 16, 23, 40]  # block_size 7 divides none of them but 0 mod 7 ones
MAX_TOKENS = 24


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids 3.. avoid the special tokens; random ids exercise the whole embedding.
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def hf_generate(path, prompts, dtype) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations and per-step logprobs [steps, V] from HF, one prompt at a time."""
    return hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), prompts, MAX_TOKENS)


@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_greedy_equals_hf_float64(checkpoints, variant):
    path = checkpoints.variant(variant)
    llm = LLM(str(path), dtype="float64", block_size=7, kv_cache_memory_bytes=16 * 2**20)
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    theirs, _ = hf_generate(path, prompts, torch.float64)
    assert ours == theirs
    # Non-trivial output: the model does not just repeat one token everywhere.
    assert len({t for seq in ours for t in seq}) > 5


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_greedy_close_to_hf_float32(checkpoints, variant):
    path = checkpoints.variant(variant)
    llm = LLM(str(path), dtype="float32", block_size=7, kv_cache_memory_bytes=16 * 2**20)
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    theirs, hf_logprobs = hf_generate(path, prompts, torch.float32)
    for out, hf_tokens, hf_lp in zip(outputs, theirs, hf_logprobs, strict=True):
        ours = out.outputs[0].token_ids
        diverge = next(
            (i for i, (a, b) in enumerate(zip(ours, hf_tokens, strict=False)) if a != b), None
        )
        if diverge is None:
            assert len(ours) == len(hf_tokens)
            continue
        our_top = out.outputs[0].logprobs[diverge]
        hf_top5 = hf_lp[diverge].topk(5).indices.tolist()
        assert ours[diverge] in hf_top5
        assert hf_tokens[diverge] in our_top
        gap = abs(hf_lp[diverge, ours[diverge]] - hf_lp[diverge, hf_tokens[diverge]])
        assert gap < 1e-3, f"divergence at {diverge} with logprob gap {gap}"
