"""Shared fixtures: small random-weight checkpoints made with transformers' save_pretrained.

Checkpoints are built once per test session and loaded through the same code a user's
checkpoint takes. Each architecture gets the config switches that make it differ from Llama.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

# CI runs every property test on the same derandomized examples, so a red run is reproducible
# (locally, hypothesis explores new examples each run).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two threads on CI's two cores; OMP_NUM_THREADS (e.g. 1 when several jobs share the cores)
# wins, as oversubscribed threads make small torch ops hundreds of times slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

# The config variants the engine must match HF on (architecture, overrides).
ARCH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3-rope-tied": (
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral-sliding": ("MistralForCausalLM", {"sliding_window": 12}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 24}),
}


@pytest.fixture(scope="session")
def tokenizer():
    from engine.demo import build_tokenizer

    return build_tokenizer()


class CheckpointFactory:
    def __init__(self, root: Path, tokenizer: Any) -> None:
        self.root = root
        self.tokenizer = tokenizer
        self._made: dict[str, Path] = {}

    def __call__(self, name: str, architecture: str = "LlamaForCausalLM", **overrides: Any) -> Path:
        if name not in self._made:
            from engine.demo import make_checkpoint

            self._made[name] = make_checkpoint(
                self.root / name, architecture=architecture, tokenizer=self.tokenizer, **overrides
            )
        return self._made[name]

    def variant(self, key: str) -> Path:
        architecture, overrides = ARCH_VARIANTS[key]
        return self(key, architecture, **overrides)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"), tokenizer)


@pytest.fixture(scope="session")
def llama_path(checkpoints) -> Path:
    return checkpoints.variant("llama")


@pytest.fixture
def async_engine_factory(llama_path):
    """`make(engine_kw, **kwargs)` -> AsyncEngine(LLMEngine(EngineArgs(llama_path, **engine_kw)),
    **kwargs); every engine made is stopped at teardown, so a test that failed half-way does not
    leave a thread stepping."""
    from engine import EngineArgs, LLMEngine
    from engine.async_engine import AsyncEngine, _Stop

    engines: list[AsyncEngine] = []

    def make(engine_kw: dict[str, Any], **kwargs: Any) -> AsyncEngine:
        engine = AsyncEngine(LLMEngine(EngineArgs(model=str(llama_path), **engine_kw)), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine._commands.put(_Stop())
