"""Plug-in points: attention backends and speculative proposers registered by name or loaded
by `module:attr` reference, validated with errors naming the field, and a plug-in written
outside the package (tests/kit_plugins.py) loaded by name from the command line and used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, EngineArgs, SamplingParams
from engine.fast import registry
from engine.reference.attention import ReferenceAttention
from engine.spec_decode import registry as proposers

ROOT = Path(__file__).resolve().parents[1]


def test_register_and_build_attention_backend():
    registry.register_attention_backend("kit-test-ref", ReferenceAttention)
    try:
        assert isinstance(registry.get_attention_backend("kit-test-ref", "cpu"), ReferenceAttention)
        assert "kit-test-ref" in registry.available_attention_backends()
        registry.register_attention_backend("kit-test-ref", ReferenceAttention)  # same: no-op
        with pytest.raises(ValueError, match="already registered"):
            registry.register_attention_backend("kit-test-ref", lambda: ReferenceAttention())
    finally:
        registry.unregister_attention_backend("kit-test-ref")
    with pytest.raises(ValueError, match=r"must be one of .*got 'kit-test-ref'"):
        registry.get_attention_backend("kit-test-ref", "cpu")


@pytest.mark.parametrize(
    ("name", "factory", "match"),
    [
        ("torch", ReferenceAttention, "built in"),
        ("a:b", ReferenceAttention, "without ':'"),
        ("", ReferenceAttention, "non-empty"),
        ("x", 3, "must be callable"),
    ],
)
def test_bad_attention_registrations(name, factory, match):
    with pytest.raises(ValueError, match=match):
        registry.register_attention_backend(name, factory)


@pytest.mark.parametrize(
    ("reference", "match"),
    [
        ("no_such_module_xyz:Backend", "cannot import module 'no_such_module_xyz'"),
        ("tests.kit_plugins:Missing", "has no attribute 'Missing'"),
        ("tests.kit_plugins:BUILT", "is not callable"),
        ("tests.kit_plugins:batch_mean_processor", "calling the factory failed"),
        ("tests.kit_plugins:RepeatLastProposer", "calling the factory failed"),
        ("tests.test_plugins:NotABackend", "has no write_kv"),
    ],
)
def test_bad_attention_references_name_the_field(reference, match):
    with pytest.raises(ValueError, match=f"attention_backend.*{match}|{match}"):
        registry.get_attention_backend(reference, "cpu")


def test_attention_backend_by_reference_is_used(llama_path):
    from tests import kit_plugins

    before = len(kit_plugins.BUILT)
    llm = LLM(str(llama_path), attention_backend="tests.kit_plugins:CountingBackend")
    out = llm.generate(["hello"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert len(kit_plugins.BUILT) == before + 1 and kit_plugins.BUILT[-1].calls > 0


def test_proposer_registry_and_config():
    from tests import kit_plugins

    spec = EngineArgs(
        model="x",
        speculative_config={"method": "repeat-last", "num_speculative_tokens": 2, "alpha": 1},
    ).speculative_config
    assert spec.method == "repeat-last" and spec.extra == (("alpha", 1),)
    assert "repeat-last" in proposers.available_proposers()
    with pytest.raises(ValueError, match=r"speculative_config.method must be one of .*repeat-last"):
        EngineArgs(model="x", speculative_config={"method": "nope", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="built in"):
        proposers.register_proposer("suffix", kit_plugins.RepeatLastProposer)
    with pytest.raises(ValueError, match="cannot import module"):
        EngineArgs(
            model="x", speculative_config={"method": "nope_xyz:P", "num_speculative_tokens": 1}
        )


def test_proposer_tokens_outside_the_vocabulary_are_named(llama_path):
    spec = {"method": "tests.test_plugins:OutOfVocab", "num_speculative_tokens": 2}
    llm = LLM(str(llama_path), speculative_config=spec)
    with pytest.raises(ValueError, match="proposed token ids outside the vocabulary"):
        llm.generate(["hello"], SamplingParams(max_tokens=4), use_tqdm=False)


class NotABackend:
    pass


class OutOfVocab:
    def __init__(self, spec, model_config):
        pass

    def propose(self, request, max_tokens):
        return [10**9]


def run_generate(*args: str, env_plugins: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ENGINE_PLUGINS", None)
    if env_plugins:
        env["ENGINE_PLUGINS"] = env_plugins
    return subprocess.run(
        [sys.executable, "-m", "engine.generate", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_loads_plugins_by_name(llama_path):
    """ENGINE_PLUGINS imports tests/kit_plugins.py, which registers `counting` and
    `repeat-last`; the CLI selects both by name and uses them."""
    spec = json.dumps({"method": "repeat-last", "num_speculative_tokens": 3})
    result = run_generate(
        "--model", str(llama_path), "--prompt", "hello hello hello", "--max-tokens", "8",
        "--attention-backend", "counting", "--speculative-config", spec, "--json",
        env_plugins="tests.kit_plugins",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "attention backend: counting" in result.stderr
    drafts = int(result.stderr.split("speculative decoding: ")[1].split(" drafts")[0])
    assert drafts > 0
    assert len(json.loads(result.stdout)["token_ids"]) == 8


def test_cli_loads_plugins_by_reference_and_names_bad_ones(llama_path):
    result = run_generate(
        "--model", str(llama_path), "--max-tokens", "2",
        "--attention-backend", "tests.kit_plugins:CountingBackend",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "attention backend: counting" in result.stderr
    result = run_generate("--model", str(llama_path), "--attention-backend", "nope")
    assert result.returncode == 2 and "attention_backend must be one of" in result.stderr
    result = run_generate("--model", str(llama_path), env_plugins="no_such_plugin_xyz")
    assert result.returncode == 2 and "ENGINE_PLUGINS" in result.stderr


def test_server_cli_selects_plugins_by_name(llama_path):
    """The server's own flags (`--attention-backend`, `--speculative-config`) select the
    plug-ins of tests/kit_plugins.py by name; a completion through the running server uses
    both."""
    import openai

    from engine import LLMEngine
    from engine.server.__main__ import build_parser, engine_args_from, server_config_from
    from engine.server.app import OpenAIServer
    from engine.server.thread import ServerThread
    from tests import kit_plugins

    spec = json.dumps({"method": "repeat-last", "num_speculative_tokens": 2})
    ns = build_parser().parse_args(
        ["--model", str(llama_path), "--attention-backend", "counting",
         "--speculative-config", spec, "--port", "0", "--kv-cache-memory-bytes", "16MiB"]
    )  # fmt: skip
    engine = LLMEngine(engine_args_from(ns))
    backend = engine.attention_backend
    assert isinstance(backend, kit_plugins.CountingBackend)
    with (
        ServerThread(OpenAIServer(engine, server_config_from(ns))) as thread,
        openai.OpenAI(base_url=thread.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="hello", max_tokens=6)
    assert out.usage.completion_tokens == 6 and backend.calls > 0
    assert engine.get_stats().spec_decode.num_drafts > 0
