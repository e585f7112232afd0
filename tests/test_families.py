"""Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen2-MoE and Qwen3-MoE equal HF transformers.

Each family's checkpoint is made with its own HF config and model class (tests/family_checkpoints
.py): 2 layers, hidden 64, 4 experts for MoE, windows of 8-12 tokens. Prompts of 1-40 tokens run
in one batch with block size 7, so they cross block boundaries and (with 24 new tokens) every
sliding window. float64: greedy tokens equal HF `generate` exactly; float32: the suite's
closeness rule (tests/test_hf_equivalence.py). `python -m engine.diff` (reference engine, fast
engine, HF) agrees on every family. MoE in float64 runs HF's experts with
experts_implementation="eager" (its grouped-mm kernel has no float64).

Sizes: the families' float64 and float32 runs and diffs together take about 15-25 s here.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams, diff
from engine.models import registry
from tests.family_checkpoints import FAMILY_VARIANTS, family_checkpoint
from tests.hf_reference import hf_greedy

MAX_TOKENS = 24
PROMPT_LENGTHS = [1, 4, 9, 16, 23, 40]
# Phi-3's longrope (original_max_position_embeddings 32 here): the engine rotates with the short
# factors when max_model_len <= 32, the long ones otherwise (rotary.longrope_embedding), where
# transformers picks per forward by the sequence's length. They agree on sequences that stay
# under the threshold (8 + 24 - 1 = 31 positions) with max_model_len 32, and on prompts already
# past it with a longer max_model_len.
PHI3_RUNS = {32: [1, 4, 8, 2, 6, 5], 256: [33, 40, 47, 34, 60, 41]}
MOE = {"mixtral", "qwen2-moe", "qwen3-moe"}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def runs(key: str) -> list[tuple[int | None, list[int]]]:
    """(max_model_len or None for the config's, prompt lengths) of each engine to compare."""
    if key.startswith("phi3"):
        return list(PHI3_RUNS.items())
    return [(None, PROMPT_LENGTHS)]


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_model(path, key: str, dtype: torch.dtype):
    kwargs = {"experts_implementation": "eager"} if key in MOE else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def hf_generate(path, key, prompts, dtype) -> tuple[list[list[int]], list[torch.Tensor]]:
    return hf_greedy(hf_model(path, key, dtype), prompts, MAX_TOKENS)


@pytest.mark.parametrize("key", list(FAMILY_VARIANTS))
def test_greedy_equals_hf_float64(family_root, tokenizer, key):
    path = family_checkpoint(family_root, key, tokenizer)
    for max_model_len, lengths in runs(key):
        llm = LLM(
            str(path),
            dtype="float64",
            block_size=7,
            kv_cache_memory_bytes=16 * 2**20,
            max_model_len=max_model_len,
        )
        assert llm.llm_engine.model_config.architecture == FAMILY_VARIANTS[key][0]
        prompts = random_prompts(lengths, llm.llm_engine.model_config.vocab_size, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        theirs, _ = hf_generate(path, key, prompts, torch.float64)
        assert ours == theirs
        assert len({t for seq in ours for t in seq}) > 5  # not one token repeated


@pytest.mark.parametrize("key", list(FAMILY_VARIANTS))
def test_greedy_close_to_hf_float32(family_root, tokenizer, key):
    path = family_checkpoint(family_root, key, tokenizer)
    max_model_len, lengths = runs(key)[-1]
    llm = LLM(
        str(path),
        dtype="float32",
        block_size=7,
        kv_cache_memory_bytes=16 * 2**20,
        max_model_len=max_model_len,
    )
    prompts = random_prompts(lengths, llm.llm_engine.model_config.vocab_size, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    theirs, hf_logprobs = hf_generate(path, key, prompts, torch.float32)
    for out, hf_tokens, hf_lp in zip(outputs, theirs, hf_logprobs, strict=True):
        ours = out.outputs[0].token_ids
        diverge = next(
            (i for i, (a, b) in enumerate(zip(ours, hf_tokens, strict=False)) if a != b), None
        )
        if diverge is None:
            assert len(ours) == len(hf_tokens)
            continue
        assert ours[diverge] in hf_lp[diverge].topk(5).indices.tolist()
        assert hf_tokens[diverge] in out.outputs[0].logprobs[diverge]
        gap = abs(hf_lp[diverge, ours[diverge]] - hf_lp[diverge, hf_tokens[diverge]])
        assert gap < 1e-3, f"divergence at {diverge} with logprob gap {gap}"


@pytest.mark.parametrize("key", list(FAMILY_VARIANTS))
def test_diff_agrees_on_every_family(family_root, tokenizer, key, tmp_path, capsys):
    """Reference engine (reference attention, reference MoE loop), fast engine and HF agree."""
    path = family_checkpoint(family_root, key, tokenizer)
    lengths = [9, 20]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt_token_ids": list(range(5, 5 + n))}) for n in lengths)
    )
    argv = ["--model", str(path), "--prompts", str(prompts), "--dtype", "float64"]
    if key.startswith("phi3"):
        argv += ["--max-model-len", "32"]  # the short factors, as HF for these lengths
    if key.startswith("gemma"):
        # Gemma's norms compute in float32 even in a float64 model (as in HF): a last-bit
        # difference in the float64 residual can round differently there, ~1e-8 in logprobs.
        argv += ["--tolerance", "1e-6"]
    code = diff.main([*argv, "--max-tokens", "6", "--hf", "--block-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2/2 requests agree" in out


def test_unknown_architecture_lists_every_supported_one():
    from types import SimpleNamespace

    with pytest.raises(ValueError) as err:
        registry.resolve_architecture(SimpleNamespace(architectures=["FalconForCausalLM"]))
    for arch in [a for a, _ in FAMILY_VARIANTS.values()] + ["LlamaForCausalLM"]:
        assert arch in str(err.value)
    for arch in registry.SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)
        assert registry.get_model_class(arch).__name__.endswith("ForCausalLM")


def test_softcapping_model_refuses_a_backend_that_cannot_cap(family_root, tokenizer):
    """Gemma 2 on xformers (no soft-cap): a clear error when the model is built, not mid-step."""
    from transformers import AutoConfig

    from engine.models.gemma2 import Gemma2ForCausalLM

    class NoSoftcap:
        name = "xformers"
        supports_softcap = False

    cfg = AutoConfig.from_pretrained(family_checkpoint(family_root, "gemma2", tokenizer))
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"'xformers' cannot soft-cap.*'torch' or 'flash-attn'"):
        Gemma2ForCausalLM(cfg, "Gemma2ForCausalLM", NoSoftcap(), 64, torch.float32, cpu)


def test_longrope_picks_factors_by_max_model_len(family_root, tokenizer):
    from transformers import AutoConfig

    from engine.models.rotary import longrope_embedding

    cfg = AutoConfig.from_pretrained(family_checkpoint(family_root, "phi3-longrope", tokenizer))
    cpu = torch.device("cpu")
    short = longrope_embedding(cfg, 16, 32, torch.float64, cpu)
    long = longrope_embedding(cfg, 16, 256, torch.float64, cpu)
    assert short.rotary_dim == long.rotary_dim == 8  # partial_rotary_factor 0.5
    assert not torch.allclose(short.cos[1:32], long.cos[1:32])
    # Same attention scaling (from max / original max) on both: equal at position 0.
    torch.testing.assert_close(short.cos[0], long.cos[0])


def test_reference_engine_runs_the_reference_moe(family_root, tokenizer):
    from engine.models.moe import SparseMoeBlock

    path = family_checkpoint(family_root, "qwen2-moe", tokenizer)
    for backend, implementation in (("reference", "reference"), ("torch", "loop")):
        llm = LLM(str(path), attention_backend=backend, kv_cache_memory_bytes=2**22)
        model = llm.llm_engine.model
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        assert len(blocks) == 2 and {b.implementation for b in blocks} == {implementation}


def test_layer_sliding_windows_match_the_built_models(family_root, tokenizer, checkpoints):
    """registry.layer_sliding_windows (for KV-cache accounting) says what each model builds."""
    from transformers import AutoConfig

    from engine.fast.torch_native import TorchNativeAttention
    from engine.models.layers import Attention

    paths = {key: family_checkpoint(family_root, key, tokenizer) for key in FAMILY_VARIANTS}
    paths |= {key: checkpoints.variant(key) for key in ("llama", "mistral-sliding", "qwen2")}
    expected = {"gemma2": [8, None], "mixtral": [12, 12], "llama": [None, None]}
    expected["mistral-sliding"] = [12, 12]
    for key, path in paths.items():
        cfg = AutoConfig.from_pretrained(path)
        arch = cfg.architectures[0]
        windows = registry.layer_sliding_windows(cfg, arch)
        model = registry.get_model_class(arch)(
            cfg, arch, TorchNativeAttention(), 64, torch.float32, torch.device("cpu")
        )
        built = [m.sliding_window for m in model.modules() if isinstance(m, Attention)]
        assert windows == built, key
        if key in expected:
            assert windows == expected[key], key


def test_quantized_moe_keeps_its_routers_unquantized(family_root, tokenizer):
    """quantization="int8" converts the experts' neighbours (attention, shared expert), never a
    router or the shared-expert gate: their outputs choose the experts."""
    from engine.models.layers import Linear
    from engine.models.moe import GateLinear, SparseMoeBlock

    path = family_checkpoint(family_root, "qwen2-moe", tokenizer)
    llm = LLM(str(path), quantization="int8", kv_cache_memory_bytes=2**22)
    model = llm.llm_engine.model
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(isinstance(b.gate, GateLinear) for b in blocks)
    assert all(isinstance(b.shared_expert_gate, GateLinear) for b in blocks)
    assert {m.method.name for m in model.modules() if isinstance(m, Linear)} == {"int8"}
    params = SamplingParams(temperature=0.0, max_tokens=4)
    assert len(llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
