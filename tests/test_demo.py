"""Tests for engine.demo: the demo tokenizer, random-weight checkpoints and the cached demo model.

Checkpoints are checked through transformers itself (AutoTokenizer, AutoModelForCausalLM,
generate), since the point of the module is to give the engine real HF checkpoints to load.
"""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from engine import demo
from engine.demo import (
    DEMO_MODEL_VERSION,
    SUPPORTED_ARCHITECTURES,
    build_tokenizer,
    demo_model_path,
    make_checkpoint,
)

SAMPLE_TEXT = "Hélène's café sells 12 loaves a day.\n日本語 and 中文, Привет! 🚲👍🏽 e\u0301"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def arch_checkpoints(
    tok: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {
        arch: make_checkpoint(root / arch, architecture=arch, tokenizer=tok)
        for arch in SUPPORTED_ARCHITECTURES
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


# ---- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_is_deterministic(tok: PreTrainedTokenizerFast) -> None:
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert merges == json.loads(again.backend_tokenizer.to_str())["model"]["merges"]
    assert len(merges) > 500
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_specials_and_size(tok: PreTrainedTokenizerFast) -> None:
    assert 1000 <= len(tok) <= 1024
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.bos_token is None
    # No BOS/EOS is added on encode, and special tokens in text are recognised as such.
    assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]


def test_tokenizer_round_trips_and_splits_rare_characters(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(SAMPLE_TEXT)
    assert tok.decode(ids) == unicodedata.normalize("NFC", SAMPLE_TEXT)
    # Common words are single tokens; an unseen emoji falls back to several byte tokens.
    assert len(tok.tokenize(" the")) == 1
    assert len(tok.tokenize("🦩")) > 1


def test_chat_template_renders_chatml(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert plain == rendered.removesuffix("<|im_start|>assistant\n")


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHITECTURES))
def test_checkpoint_loads_and_generates(
    arch: str, arch_checkpoints: dict[str, Path], tok: PreTrainedTokenizerFast
) -> None:
    path = arch_checkpoints[arch]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == 2 and config["bos_token_id"] is None
    assert config["pad_token_id"] == 0
    assert config["dtype"] == "float32"
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]
    assert all(t.dtype == torch.float32 for t in _tensors(path).values())

    # Whatever tokenizer class AutoTokenizer picks for this model type, it tokenizes like ours.
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert loaded_tok.encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT)
    assert loaded_tok.chat_template == tok.chat_template

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == arch
    prompt = loaded_tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about the lighthouse."}],
        add_generation_prompt=True,
        return_dict=False,
    )
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
    )
    generated = out[0, len(prompt) :].tolist()
    assert len(generated) == 12
    # Random but not degenerate: greedy decoding does not lock onto one or two tokens.
    assert len(set(generated)) >= 4


def test_architectures_differ(arch_checkpoints: dict[str, Path]) -> None:
    # Qwen2's attention biases and Qwen3's q/k norms are random, not zero/one, so a model
    # implementation that dropped them could not reproduce HF's outputs.
    qwen2 = _tensors(arch_checkpoints["Qwen2ForCausalLM"])
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0
    qwen3 = _tensors(arch_checkpoints["Qwen3ForCausalLM"])
    assert not torch.equal(qwen3["model.layers.0.self_attn.q_norm.weight"], torch.ones(16))


def test_checkpoint_is_deterministic(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    before = torch.random.get_rng_state()
    first = make_checkpoint(tmp_path / "a", tokenizer=tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    second = make_checkpoint(tmp_path / "b", seed=3)  # builds its own tokenizer
    other = make_checkpoint(tmp_path / "c", tokenizer=tok, seed=4)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_config_overrides(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = make_checkpoint(
        tmp_path / "qwen3",
        architecture="Qwen3ForCausalLM",
        tokenizer=tok,
        tie_word_embeddings=True,
        head_dim=24,
        attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["head_dim"] == 24 and config["attention_bias"] is True
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0
    tensors = _tensors(path)
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 64)
    assert "model.layers.0.self_attn.k_proj.bias" in tensors
    # Tied embeddings must not make greedy decoding echo the input token.
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=12, do_sample=False)
    assert len(set(out[0, 3:].tolist())) >= 6

    mistral = make_checkpoint(
        tmp_path / "mistral", architecture="MistralForCausalLM", tokenizer=tok, sliding_window=8
    )
    assert json.loads((mistral / "config.json").read_text())["sliding_window"] == 8
    AutoModelForCausalLM.from_pretrained(mistral)


def test_sharded_checkpoint(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    whole = make_checkpoint(tmp_path / "whole", tokenizer=tok)
    sharded = make_checkpoint(tmp_path / "sharded", tokenizer=tok, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    assert not (sharded / "model.safetensors").exists()
    whole_tensors, sharded_tensors = _tensors(whole), _tensors(sharded)
    assert whole_tensors.keys() == sharded_tensors.keys() == index["weight_map"].keys()
    assert all(torch.equal(whole_tensors[k], sharded_tensors[k]) for k in whole_tensors)
    AutoModelForCausalLM.from_pretrained(sharded)


def test_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        make_checkpoint(tmp_path, architecture="GPT2LMHeadModel")


# ---- demo_model_path ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model_path(tmp_path_factory.mktemp("cache-a"))


def test_demo_model(demo_path: Path) -> None:
    assert demo_path.name == f"demo-llama-v{DEMO_MODEL_VERSION}"
    assert (demo_path / ".complete").is_file()
    config = json.loads((demo_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == 128 and config["intermediate_size"] == 256
    assert config["num_hidden_layers"] == 4
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["max_position_embeddings"] == 2048
    assert config["tie_word_embeddings"] is True
    # Nothing but the finished directory is left in the cache.
    assert [p.name for p in demo_path.parent.iterdir()] == [demo_path.name]

    model = AutoModelForCausalLM.from_pretrained(demo_path)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, do_sample=False)
    assert len(set(out[0, 3:].tolist())) >= 4


def test_demo_model_is_idempotent_and_byte_identical(
    demo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtime = (demo_path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path(demo_path.parent) == demo_path
    assert (demo_path / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "env-cache"))
    rebuilt = demo_model_path()
    assert rebuilt == tmp_path / "env-cache" / demo_path.name
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (rebuilt / name).read_bytes() == (demo_path / name).read_bytes(), name


def test_demo_model_concurrent_builders(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(demo_model_path(tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / ".complete").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp dirs left


def test_demo_model_builder_that_loses_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_make_checkpoint = demo.make_checkpoint
    target = tmp_path / f"demo-llama-v{DEMO_MODEL_VERSION}"

    calls: list[Path] = []

    def slow_builder(path: Path, **kwargs: object) -> Path:
        calls.append(path)
        if len(calls) == 1:
            # Another builder starts later but finishes first, while this one is mid-build.
            assert demo_model_path(tmp_path) == target
        return real_make_checkpoint(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "make_checkpoint", slow_builder)
    assert demo_model_path(tmp_path) == target
    assert len(calls) == 2 and (target / ".complete").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # loser's copy removed


def test_demo_model_replaces_incomplete_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / f"demo-llama-v{DEMO_MODEL_VERSION}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # e.g. left by an interrupted copy
    # The build itself is irrelevant here: stub it to keep the test fast.
    monkeypatch.setattr(demo, "make_checkpoint", lambda path, **_: Path(path))
    path = demo_model_path(tmp_path)
    assert path == stale and (path / ".complete").is_file()
    assert not (path / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]
