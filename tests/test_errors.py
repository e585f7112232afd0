"""Bad input: each a clear ValueError naming what is wrong, and the engine keeps working."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine import LLM, EngineArgs, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), max_model_len=64, kv_cache_memory_bytes=4 * 2**20)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 64], use_tqdm=False)


def test_token_id_outside_vocab(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 10**6]], use_tqdm=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"n": 0}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logprobs_above_max_logprobs(llm):
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate("hello", SamplingParams(logprobs=21), use_tqdm=False)


def test_bad_request_in_a_batch_adds_nothing(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["hello", "", "world"], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv_cache_usage == 0.0
    # ... and the engine still serves.
    out = llm.generate("hello", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "no-such-model"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(str(tmp_path))


def test_unfetchable_hub_id():
    with pytest.raises(ValueError, match="could not be fetched"):
        LLM("no-such-org/no-such-model-xyz")


def test_unsupported_architecture(llama_path, tmp_path):
    path = tmp_path / "gpt2ish"
    shutil.copytree(llama_path, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        LLM(str(path))


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor(llama_path, tmp_path):
    path = _edit_weights(
        llama_path, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj"):
        LLM(str(path))


def test_tensor_of_wrong_shape(llama_path, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    path = _edit_weights(llama_path, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape"):
        LLM(str(path))


def test_no_safetensors(llama_path, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(llama_path, path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        LLM(str(path))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"scheduler": "magic"}, "scheduler"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ],
)
def test_bad_engine_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model="x", **kwargs)


def test_max_model_len_beyond_the_model(llama_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(str(llama_path), max_model_len=10**6)


@pytest.mark.parametrize("scheduler", ["default", "reference"])
def test_request_that_can_never_fit_the_pool_is_rejected(llama_path, scheduler):
    llm = LLM(
        str(llama_path),
        max_model_len=256,
        block_size=4,
        num_gpu_blocks_override=8,
        scheduler=scheduler,
    )
    with pytest.raises(ValueError, match="more than the whole KV cache holds"):
        llm.generate([[5] * 20], SamplingParams(max_tokens=20), use_tqdm=False)
    # one that fits (20 + 12 = 32 tokens = 8 blocks) is served
    out = llm.generate([[5] * 20], SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12
    assert llm.llm_engine.scheduler.kv_cache_usage == 0.0


def test_kv_budget_smaller_than_a_block(llama_path):
    with pytest.raises(ValueError, match="smaller than one block"):
        LLM(str(llama_path), kv_cache_memory_bytes=16)
