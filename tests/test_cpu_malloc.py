"""The glibc malloc tuning the engine applies on CPU (engine/cpu_malloc.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROBE = (
    "from engine.cpu_malloc import tune_cpu_allocator as t; "
    "print(t(), t())"  # the second call answers from the first, without calling mallopt again
)


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop("ENGINE_CPU_MALLOC_TUNING", None)
    if env_value is not None:
        env["ENGINE_CPU_MALLOC_TUNING"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuning_applies_once_on_glibc():
    assert _run(None) == "True True"


def test_tuning_can_be_turned_off():
    assert _run("0") == "False False"


def test_engine_applies_the_tuning_on_cpu(monkeypatch, llama_path):
    import engine.engine as engine_module
    from engine import EngineArgs, LLMEngine

    calls = []
    monkeypatch.setattr(engine_module, "tune_cpu_allocator", lambda: calls.append(1) or True)
    LLMEngine(EngineArgs(model=str(llama_path), max_model_len=64, kv_cache_memory_bytes=1 << 20))
    assert calls == [1]
