"""The model's generation config as default sampling parameters (vLLM's --generation-config).

Checkpoints are the session's tiny Llama copied with a generation_config.json of our own. The
"gen" one sets top_k 1 (so sampling is greedy), repetition_penalty 1.5 and max_new_tokens 12;
on the prompts used here the penalty changes the greedy text (asserted), so the output shows
which defaults a request got. Server outputs are compared with the offline LLM given explicit
SamplingParams (float64: batch composition cannot flip a token).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import GenerationConfig

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.generation_defaults import GenerationDefaults, load_generation_defaults
from engine.server import OpenAIServer, ServerConfig, ServerThread
from engine.server import protocol as P

ENGINE_KW = {
    "dtype": "float64",
    "block_size": 4,
    "kv_cache_memory_bytes": 16 * 2**20,
    "max_model_len": 256,
    "seed": 0,
}
GEN_FILE = {"top_k": 1, "repetition_penalty": 1.5, "max_new_tokens": 12, "do_sample": True}
GEN_FIELDS = {"top_k": 1, "repetition_penalty": 1.5, "max_tokens": 12}
PROMPT = "Hello world"
CHAT = [{"role": "user", "content": "Hi"}]


def with_generation_config(src: Path, dst: Path, keys: dict[str, Any] | None) -> Path:
    """A copy of checkpoint `src` whose generation_config.json has `keys` added (None: no
    generation_config.json at all)."""
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    if keys is None:
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))
    return dst


def write_config(folder: Path, **keys: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(keys))
    return folder


@pytest.fixture(scope="module")
def gen_path(llama_path, tmp_path_factory) -> Path:
    return with_generation_config(llama_path, tmp_path_factory.mktemp("g") / "gen", GEN_FILE)


@pytest.fixture(scope="module")
def plain(llama_path) -> LLM:
    """The same weights with no sampling defaults: the oracle for explicit SamplingParams."""
    return LLM(str(llama_path), **ENGINE_KW)


def tokens(llm: LLM, prompt: Any, **params: Any) -> list[int]:
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids


def text(llm: LLM, prompt: Any, **params: Any) -> str:
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0].text


def chat_text(llm: LLM, **params: Any) -> str:
    return llm.chat(CHAT, SamplingParams(**params), use_tqdm=False)[0].outputs[0].text


# ---- which fields the file sets --------------------------------------------------------------


def test_auto_takes_only_the_files_explicit_sampling_fields(tmp_path):
    """A file written by transformers with top_k 5 and repetition_penalty 1.3: exactly those
    (no class default such as top_k 50, no do_sample / eos); a hand-written one: its keys."""
    GenerationConfig(
        do_sample=True, top_k=5, repetition_penalty=1.3, eos_token_id=2
    ).save_pretrained(tmp_path)
    defaults = load_generation_defaults(tmp_path)
    assert dict(defaults.fields) == {"top_k": 5, "repetition_penalty": 1.3}
    assert defaults.max_tokens is None and defaults.max_tokens_cap is None

    write_config(tmp_path, temperature=0.6, top_p=0.95, min_p=None, do_sample=True, bos_token_id=1)
    assert dict(load_generation_defaults(tmp_path).fields) == {"temperature": 0.6, "top_p": 0.95}
    # max_new_tokens becomes the max_tokens default; the model's own file does not bound it.
    write_config(tmp_path, max_new_tokens=7, top_k=0, max_length=50)
    defaults = load_generation_defaults(tmp_path)
    assert dict(defaults.fields) == {"top_k": -1, "max_tokens": 7}  # HF's top_k 0: no cut
    assert defaults.max_tokens == 7 and defaults.max_tokens_cap is None


def test_modes_and_override_merge(tmp_path):
    model = write_config(tmp_path / "model", temperature=0.7, top_p=0.8, max_new_tokens=20)
    other = write_config(tmp_path / "other", top_k=3, max_new_tokens=9)
    assert dict(load_generation_defaults(model, "vllm").fields) == {}
    # PATH: the other folder's file instead of the model's; its max_new_tokens is also a bound.
    by_path = load_generation_defaults(model, str(other))
    assert dict(by_path.fields) == {"top_k": 3, "max_tokens": 9}
    assert by_path.max_tokens_cap == 9
    assert dict(load_generation_defaults(model, str(other / "generation_config.json")).fields) == {
        "top_k": 3,
        "max_tokens": 9,
    }
    # The override is merged over the file; a null drops the file's value; its max_new_tokens
    # bounds every request, in every mode.
    merged = load_generation_defaults(model, "auto", {"temperature": 0.2, "top_p": None})
    assert dict(merged.fields) == {"temperature": 0.2, "max_tokens": 20}
    assert merged.max_tokens_cap is None
    capped = load_generation_defaults(model, "vllm", {"max_new_tokens": 5, "min_p": 0.1})
    assert dict(capped.fields) == {"min_p": 0.1, "max_tokens": 5} and capped.max_tokens_cap == 5
    assert capped.bound_max_tokens(100) == 5 and capped.bound_max_tokens(None) == 5
    assert capped.bound_max_tokens(3) == 3


# ---- offline LLM ------------------------------------------------------------------------------


def test_offline_auto_applies_the_files_defaults(gen_path, plain, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.generation_defaults"):
        llm = LLM(str(gen_path), **ENGINE_KW)
    assert "Default sampling parameters set by the model's generation_config.json" in caplog.text
    assert "'repetition_penalty': 1.5" in caplog.text
    assert llm.get_default_sampling_params() == SamplingParams(**GEN_FIELDS)
    got = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0].token_ids
    want = tokens(plain, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=12)
    assert got == want and len(got) == 12
    assert got != tokens(plain, PROMPT, temperature=0, max_tokens=12)  # the penalty acted
    # Explicit SamplingParams are used as given: plain sampling with this seed.
    explicit = tokens(llm, PROMPT, seed=3, max_tokens=12)
    assert explicit == tokens(plain, PROMPT, seed=3, max_tokens=12) and explicit != got
    # chat without params: the defaults too.
    out = llm.chat(CHAT, use_tqdm=False)[0].outputs[0].text
    assert out == chat_text(plain, temperature=0, repetition_penalty=1.5, max_tokens=12)


def test_offline_vllm_mode_and_no_file_behave_as_before(gen_path, llama_path, tmp_path, caplog):
    """Without defaults, generate() without params is generate(SamplingParams()): a fresh
    engine's first unseeded request draws the same seed, so the tokens are equal."""

    def first_request(
        path: Path, params: SamplingParams | None = None, plain: bool = True, **kw: Any
    ) -> list[int]:
        llm = LLM(str(path), **ENGINE_KW, **kw)
        if params is None and plain:
            assert llm.get_default_sampling_params() == SamplingParams()
            assert not llm.llm_engine.generation_defaults.fields
        return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids

    want = first_request(llama_path, SamplingParams())
    with caplog.at_level(logging.WARNING, logger="engine.generation_defaults"):
        assert first_request(gen_path, generation_config="vllm") == want
    assert "Default sampling parameters" not in caplog.text
    assert first_request(gen_path, plain=False) != want  # the file's defaults, for contrast
    # A model without generation_config.json, and one whose file sets no sampling key.
    assert first_request(with_generation_config(llama_path, tmp_path / "bare", None)) == want
    assert first_request(llama_path) == want


def test_offline_path_mode_and_override(gen_path, llama_path, tmp_path):
    other = write_config(tmp_path / "other", temperature=0.0, max_new_tokens=4)
    llm = LLM(str(llama_path), generation_config=str(other), **ENGINE_KW)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=4)
    assert llm.llm_engine.generation_defaults.max_tokens_cap == 4
    llm = LLM(
        str(gen_path),
        override_generation_config={"repetition_penalty": None, "temperature": 0.5},
        **ENGINE_KW,
    )
    assert llm.get_default_sampling_params() == SamplingParams(
        top_k=1, temperature=0.5, max_tokens=12
    )


# ---- bad values --------------------------------------------------------------------------------


OVERRIDE = "override_generation_config"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"generation_config": "nope"}, r"generation_config: 'nope' is neither"),
        ({"generation_config": ""}, r"generation_config must be"),
        ({"generation_config": 5}, r"generation_config must be"),
        ({OVERRIDE: [1]}, rf"{OVERRIDE} must be a JSON object"),
        ({OVERRIDE: "{bad"}, rf"{OVERRIDE} is not valid JSON"),
        ({OVERRIDE: {"max_length": 5}}, rf"{OVERRIDE}: unknown key\(s\) max_length"),
        ({OVERRIDE: {"temperature": -1}}, rf"{OVERRIDE}: temperature must be >= 0"),
        ({OVERRIDE: {"top_k": "5"}}, rf"{OVERRIDE}: top_k must be an integer"),
        ({OVERRIDE: {"max_new_tokens": 0}}, rf"{OVERRIDE}: max_new_tokens must be >= 1"),
    ],
)
def test_bad_values_name_the_field(llama_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=str(llama_path), **kwargs)


def test_bad_files_name_the_field(llama_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"generation_config: .*empty.* is neither"):
        EngineArgs(model=str(llama_path), generation_config=str(empty))
    bad = write_config(tmp_path / "bad", top_p=2.0)
    with pytest.raises(ValueError, match=r"generation_config \(.*bad.*\): top_p must be in"):
        EngineArgs(model=str(llama_path), generation_config=str(bad))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config: cannot read"):
        EngineArgs(model=str(llama_path), generation_config=str(tmp_path / "broken"))
    # The model's own file (auto) is checked when the engine starts; "vllm" ignores it.
    model = with_generation_config(llama_path, tmp_path / "m", {"temperature": -0.5})
    with pytest.raises(ValueError, match=r"generation_config.json .*: temperature must be >= 0"):
        LLMEngine(EngineArgs(model=str(model), **ENGINE_KW))
    engine = LLMEngine(EngineArgs(model=str(model), generation_config="vllm", **ENGINE_KW))
    assert not engine.generation_defaults.fields


# ---- protocol ----------------------------------------------------------------------------------


def test_protocol_fills_absent_fields_and_keeps_explicit_ones():
    defaults = GenerationDefaults(
        fields={"temperature": 0.0, "top_k": 5, "max_tokens": 7}, max_tokens_cap=None
    )
    base = {"prompt": "x"}
    req = P.parse_completion_request(base, 5, defaults=defaults)
    # A completion without max_tokens keeps OpenAI's 16 (vLLM's too): max_new_tokens is chat's.
    assert req.sampling == {"temperature": 0.0, "top_k": 5} and req.max_tokens == 16
    # Set explicitly, even to the plain default value: the request's value. null: the default.
    body = {**base, "temperature": 1.0, "top_k": None, "max_tokens": 30}
    req = P.parse_completion_request(body, 5, defaults=defaults)
    assert req.sampling == {"temperature": 1.0, "top_k": 5} and req.max_tokens == 30
    chat = P.parse_chat_request({"messages": CHAT, "top_k": -1}, 5, defaults=defaults)
    assert chat.sampling == {"temperature": 0.0, "top_k": -1} and chat.max_tokens == 7
    # A bound lowers explicit values too; chat without max_tokens gets the bound.
    capped = GenerationDefaults(fields={}, max_tokens_cap=4)
    assert P.parse_completion_request({**base, "max_tokens": 9}, 5, defaults=capped).max_tokens == 4
    req = P.parse_chat_request({"messages": CHAT}, 5, defaults=capped)
    assert req.max_tokens == 4 and req.max_tokens_from_config
    # The existing max_tokens errors are unchanged.
    with pytest.raises(P.APIError, match="max_tokens must be at least 1") as e:
        P.parse_completion_request({**base, "max_tokens": 0}, 5, defaults=defaults)
    assert e.value.param == "max_tokens"
    with pytest.raises(P.APIError, match="max_completion_tokens must be at least 1"):
        P.parse_chat_request({"messages": CHAT, "max_completion_tokens": 0}, 5, defaults=defaults)
    # A default larger than the room the prompt leaves is lowered; an explicit one is refused.
    assert P.check_length(250, 12, 256, fit=True) == 6
    with pytest.raises(P.APIError, match="maximum context length"):
        P.check_length(250, 12, 256)


# ---- server ------------------------------------------------------------------------------------


def serve(args: EngineArgs) -> ServerThread:
    config = ServerConfig(served_model_names=("tiny",), log_stats_interval=None, access_log=False)
    return ServerThread(OpenAIServer(LLMEngine(args), config))


def post(url: str, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url + route,
        data=json.dumps({"model": "tiny", **body}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def completion(url: str, **body: Any) -> dict[str, Any]:
    status, data = post(url, "/v1/completions", {"prompt": PROMPT, **body})
    assert status == 200, data
    return data


def chat(url: str, **body: Any) -> dict[str, Any]:
    status, data = post(url, "/v1/chat/completions", {"messages": CHAT, **body})
    assert status == 200, data
    return data


@pytest.fixture(scope="module")
def gen_server(gen_path):
    with serve(EngineArgs(model=str(gen_path), **ENGINE_KW)) as thread:
        yield thread


def test_server_completions_take_the_files_defaults(gen_server, plain):
    url = gen_server.url
    got = completion(url, max_tokens=12)
    want = text(plain, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=12)
    assert got["choices"][0]["text"] == want
    null_top_k = completion(url, top_k=None, max_tokens=12)  # null: the default
    assert null_top_k["choices"][0]["text"] == want
    # A field set in the body wins, even at the plain default value.
    no_penalty = completion(url, repetition_penalty=1.0, max_tokens=12)["choices"][0]["text"]
    assert no_penalty == text(plain, PROMPT, temperature=0, max_tokens=12) != want
    sampled = completion(url, top_k=-1, seed=3, max_tokens=12)["choices"][0]["text"]
    assert sampled == text(plain, PROMPT, seed=3, repetition_penalty=1.5, max_tokens=12) != want
    # max_new_tokens (12) is chat's default: a completion without max_tokens keeps OpenAI's 16
    # (as vLLM's does), and the model's own file sets no bound.
    assert completion(url, ignore_eos=True)["usage"]["completion_tokens"] == 16
    longer = completion(url, max_tokens=20, ignore_eos=True)
    assert longer["usage"]["completion_tokens"] == 20


def test_server_chat_takes_the_files_defaults(gen_server, plain):
    url = gen_server.url
    got = chat(url)
    assert got["usage"]["completion_tokens"] == 12
    want = chat_text(plain, temperature=0, repetition_penalty=1.5, max_tokens=12)
    assert got["choices"][0]["message"]["content"] == want
    explicit = chat(url, repetition_penalty=1.0, max_completion_tokens=12)
    greedy = chat_text(plain, temperature=0, max_tokens=12)
    assert explicit["choices"][0]["message"]["content"] == greedy != want
    assert chat(url, max_tokens=5)["usage"]["completion_tokens"] == 5


def test_server_max_tokens_errors_still_work(gen_server):
    url = gen_server.url
    status, data = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert status == 400 and data["error"]["param"] == "max_tokens"
    status, data = post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 0})
    assert status == 400 and data["error"]["param"] == "max_tokens"
    status, data = post(url, "/v1/completions", {"prompt": [5] * 250, "max_tokens": 10})
    assert status == 400 and "maximum context length" in data["error"]["message"]
    # OpenAI's 16 for a completion is the request's own default: refused as before when the
    # prompt leaves less room (the generation config's defaults are lowered instead: below).
    status, data = post(url, "/v1/completions", {"prompt": [5] * 250})
    assert status == 400 and "maximum context length" in data["error"]["message"]


def test_server_path_mode_bounds_max_tokens(llama_path, plain, tmp_path):
    other = write_config(tmp_path / "other", temperature=0.0, max_new_tokens=4)
    args = EngineArgs(model=str(llama_path), generation_config=str(other), **ENGINE_KW)
    with serve(args) as thread:
        got = completion(thread.url)
        capped = completion(thread.url, max_tokens=10, ignore_eos=True)
        chat_capped = chat(thread.url, max_completion_tokens=10, ignore_eos=True)
    want = text(plain, PROMPT, temperature=0, max_tokens=4)
    assert got["choices"][0]["text"] == want and got["usage"]["completion_tokens"] == 4
    assert capped["usage"]["completion_tokens"] == 4
    assert chat_capped["usage"]["completion_tokens"] == 4


def test_server_vllm_mode_with_override(gen_path, plain):
    """--generation-config vllm ignores the file (plain sampling); the override's
    max_new_tokens is the default and the bound."""
    args = EngineArgs(
        model=str(gen_path),
        generation_config="vllm",
        override_generation_config={"max_new_tokens": 60},
        **{**ENGINE_KW, "max_model_len": 64},
    )
    with serve(args) as thread:
        sampled = completion(thread.url, seed=3, max_tokens=12)
        bounded = completion(thread.url, prompt=[5, 6], max_tokens=61, ignore_eos=True)
        plain_default = completion(thread.url, prompt=[5] * 20, ignore_eos=True)
        chat_default = chat(thread.url, ignore_eos=True)
    assert sampled["choices"][0]["text"] == text(plain, PROMPT, seed=3, max_tokens=12)
    assert bounded["usage"]["completion_tokens"] == 60
    assert plain_default["usage"]["completion_tokens"] == 16  # a completion's own default
    # Chat's default (60) is larger than the room the prompt leaves: lowered to fit.
    room = 64 - chat_default["usage"]["prompt_tokens"]
    assert room < 60 and chat_default["usage"]["completion_tokens"] == room


# ---- command lines -----------------------------------------------------------------------------


def test_server_flags(gen_path, capsys):
    from engine.server import __main__ as cli

    ns = cli.build_parser().parse_args(
        [
            "--model",
            str(gen_path),
            "--generation-config",
            "vllm",
            "--override-generation-config",
            '{"temperature": 0.5}',
        ]
    )
    args = cli.engine_args_from(ns)
    assert args.generation_config == "vllm"
    assert args.override_generation_config == {"temperature": 0.5}
    assert cli.engine_args_from(cli.build_parser().parse_args([])).generation_config == "auto"
    code = cli.main(["--model", str(gen_path), "--override-generation-config", '{"top_n": 1}'])
    assert code == 2
    assert "override_generation_config: unknown key(s) top_n" in capsys.readouterr().err


def test_generate_cli_uses_the_defaults(gen_path, plain, capsys):
    from engine import generate

    def run(*flags: str) -> list[int]:
        argv = ["--model", str(gen_path), "--dtype", "float64", "--json", "--prompt", PROMPT]
        assert generate.main([*argv, *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]

    # The file's fields, then the tool's own defaults (greedy, 32 tokens) for the rest.
    assert run() == tokens(plain, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=12)
    assert run("--generation-config", "vllm") == tokens(plain, PROMPT, temperature=0, max_tokens=32)
    assert run("--override-generation-config", '{"max_new_tokens": 3}') == tokens(
        plain, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=3
    )
    # A flag wins over the file.
    assert run("--max-tokens", "5", "--top-k", "-1", "--temperature", "0") == tokens(
        plain, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=5
    )
