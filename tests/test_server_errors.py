"""Bad input and failures over HTTP: OpenAI's error JSON with the right status, and then the
server still serves a normal request correctly (no request left running, no KV block leaked)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.server import OpenAIServer, ServerConfig, ServerThread

ENGINE_KW = {
    "dtype": "float64",
    "block_size": 4,
    "kv_cache_memory_bytes": 8 * 2**20,
    "max_model_len": 64,
    "seed": 0,
}
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Hi"}]
IMAGE = {"type": "image_url", "image_url": {"url": "x"}}
NORMAL = {"model": MODEL, "prompt": "The river", "max_tokens": 5, "temperature": 0}


def make_server(llama_path, **config: Any) -> ServerThread:
    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW))
    defaults = {"served_model_names": (MODEL,), "log_stats_interval": None, "access_log": False}
    return ServerThread(OpenAIServer(engine, ServerConfig(**{**defaults, **config})))


@pytest.fixture(scope="module")
def server(llama_path):
    with make_server(llama_path, max_waiting_requests=1) as thread:
        yield thread


@pytest.fixture(scope="module")
def normal_text(llama_path):
    llm = LLM(str(llama_path), **ENGINE_KW)
    params = SamplingParams(temperature=0, max_tokens=5)
    return llm.generate("The river", params, use_tqdm=False)[0].outputs[0].text


def call(
    method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def assert_error(raw: bytes, status: int, type_: str, param: str | None) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    return error


def assert_serves_normally(url: str, expected_text: str) -> None:
    status, _, raw = call("POST", url + "/v1/completions", NORMAL)
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["text"] == expected_text
    deadline = time.monotonic() + 10
    while True:  # the engine applies aborts between steps: allow it a moment
        metrics = {
            sample.name: sample.value
            for family in text_string_to_metric_families(call("GET", url + "/metrics")[2].decode())
            for sample in family.samples
            if sample.name.startswith(("vllm:num_requests", "vllm:kv_cache"))
        }
        if metrics["vllm:kv_cache_usage_perc"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert metrics == {
        "vllm:num_requests_running": 0,
        "vllm:num_requests_waiting": 0,
        "vllm:kv_cache_usage_perc": 0,
    }


C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS = {
    # name: (method, path, body, status, param)
    "invalid json": ("POST", C, b'{"prompt": "a",', 400, None),
    "json not an object": ("POST", C, [1, 2], 400, None),
    "empty body": ("POST", C, b"", 400, None),
    "NaN literal": ("POST", C, b'{"prompt": "a", "temperature": NaN}', 400, None),
    "missing prompt": ("POST", C, {"model": MODEL}, 400, "prompt"),
    "prompt wrong type": ("POST", C, {"prompt": 5}, 400, "prompt"),
    "prompt empty list": ("POST", C, {"prompt": []}, 400, "prompt"),
    "prompt mixed list": ("POST", C, {"prompt": [1, "a"]}, 400, "prompt"),
    "prompt empty string": ("POST", C, {"prompt": ""}, 400, "prompt"),
    "token outside vocab": ("POST", C, {"prompt": [5, 10**6]}, 400, "prompt"),
    "temperature wrong type": (
        "POST",
        C,
        {"prompt": "a", "temperature": "hot"},
        400,
        "temperature",
    ),
    "temperature negative": ("POST", C, {"prompt": "a", "temperature": -1}, 400, "temperature"),
    "top_p out of range": ("POST", C, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    "top_k wrong type": ("POST", C, {"prompt": "a", "top_k": 2.5}, 400, "top_k"),
    "n zero": ("POST", C, {"prompt": "a", "n": 0}, 400, "n"),
    "presence_penalty range": (
        "POST",
        C,
        {"prompt": "a", "presence_penalty": 3},
        400,
        "presence_penalty",
    ),
    "max_tokens zero without echo": (
        "POST",
        C,
        {"prompt": "a", "max_tokens": 0},
        400,
        "max_tokens",
    ),
    "max_tokens negative": ("POST", C, {"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    "max_tokens not an integer": ("POST", C, {"prompt": "a", "max_tokens": 1.5}, 400, "max_tokens"),
    "prompt plus max_tokens too long": (
        "POST",
        C,
        {"prompt": [5] * 40, "max_tokens": 30},
        400,
        "max_tokens",
    ),
    "prompt alone too long": ("POST", C, {"prompt": [5] * 64}, 400, "prompt"),
    "logprobs above max_logprobs": ("POST", C, {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    "stop wrong type": ("POST", C, {"prompt": "a", "stop": 5}, 400, "stop"),
    "logit_bias bad key": ("POST", C, {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    "logit_bias out of range": (
        "POST",
        C,
        {"prompt": "a", "logit_bias": {"5": 500}},
        400,
        "logit_bias",
    ),
    "stream wrong type": ("POST", C, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    "stream_options without stream": (
        "POST",
        C,
        {"prompt": "a", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    "suffix": ("POST", C, {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    "beam search": ("POST", C, {"prompt": "a", "use_beam_search": True}, 400, "use_beam_search"),
    "unknown model": ("POST", C, {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    "chat without messages": ("POST", CHAT, {"model": MODEL}, 400, "messages"),
    "chat messages not a list": ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    "chat message without role": ("POST", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages"),
    "chat image part": (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [IMAGE]}]},
        400,
        "messages",
    ),
    "chat top_logprobs without logprobs": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    "chat top_logprobs too many": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 30},
        400,
        "top_logprobs",
    ),
    "chat max_completion_tokens too long": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "max_completion_tokens": 100},
        400,
        "max_completion_tokens",
    ),
    "chat max_tokens zero": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "max_tokens": 0},
        400,
        "max_tokens",
    ),
    "chat logprobs wrong type": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "logprobs": 3},
        400,
        "logprobs",
    ),
    "chat invalid json schema": (
        "POST",
        CHAT,
        {
            "messages": MESSAGES,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            },
        },
        400,
        "response_format.json_schema.schema",
    ),
    "completion invalid regex": ("POST", C, {**NORMAL, "guided_regex": "(a"}, 400, "guided_regex"),
    "completion schema the grammar engine cannot compile": (
        "POST",
        C,
        {**NORMAL, "structured_outputs": {"json": {"dependentRequired": {"a": ["b"]}}}},
        400,
        "structured_outputs.json",
    ),
    "chat two structured outputs": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "guided_regex": "a", "guided_choice": ["a"]},
        400,
        "guided_choice",
    ),
    "chat tool_choice without tools": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    "chat auto tool choice without a tool-call parser": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tool_choice",
    ),
    "chat named tool choice not among the tools": (
        "POST",
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
    ),
    "chat bad tool": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "tools": [{"type": "x"}]},
        400,
        "tools[0]",
    ),
    "completion vllm_xargs not an object": (
        "POST",
        C,
        {**NORMAL, "vllm_xargs": 3},
        400,
        "vllm_xargs",
    ),
    "chat request template not trusted": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "chat_template": "{% for %}"},
        400,
        "chat_template",
    ),
    "chat request template in kwargs not trusted": (
        "POST",
        CHAT,
        {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
        400,
        "chat_template",
    ),
    # Issue 12: each of these was a 500 (or worse).
    "json nested 5000 deep": (
        "POST",
        C,
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        None,
    ),
    "lone surrogate in prompt": ("POST", C, b'{"prompt": "a\\ud800"}', 400, "prompt"),
    "lone surrogate in prompt list": ("POST", C, b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt"),
    "lone surrogate in tokenize": ("POST", "/tokenize", b'{"prompt": "a\\ud800"}', 400, "prompt"),
    "lone surrogate in bad_words": (
        "POST",
        C,
        b'{"prompt": "a", "bad_words": ["x\\uDBFF"]}',
        400,
        "bad_words",
    ),
    "lone surrogate in chat": (
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "messages",
    ),
    "prompt_logprobs above max_logprobs": (
        "POST",
        C,
        {"prompt": "a", "prompt_logprobs": 50},
        400,
        "prompt_logprobs",
    ),
    "n beyond int64": ("POST", C, {"prompt": "hi", "n": 9223372036854775808}, 400, "n"),
    "n above what can run": ("POST", C, {"prompt": "hi", "n": 100000}, 400, "n"),
    "n not whole": ("POST", C, {"prompt": "hi", "n": 1.5}, 400, "n"),
    "chat n above what can run": ("POST", CHAT, {"messages": MESSAGES, "n": 500}, 400, "n"),
    "too many stop strings": ("POST", C, {"prompt": "a", "stop": ["x"] * 65}, 400, "stop"),
    "stop string too long": ("POST", C, {"prompt": "a", "stop": ["x" * 1025]}, 400, "stop"),
    "too many bad_words": ("POST", C, {"prompt": "a", "bad_words": ["x"] * 65}, 400, "bad_words"),
    "prompt longer than the context could hold": (
        "POST",
        C,
        {"prompt": "a" * (32 * 64 + 1)},
        400,
        "prompt",
    ),
    "too many prompts": ("POST", C, {"prompt": ["a"] * 257}, 400, "prompt"),
    "too many token-id prompts": ("POST", C, {"prompt": [[5]] * 257}, 400, "prompt"),
    "tokenize prompt too long": ("POST", "/tokenize", {"prompt": "a" * 3000}, 400, "prompt"),
    "chat messages too long": (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "a" * 3000}]},
        400,
        "messages",
    ),
    "unknown model in path": ("GET", "/v1/models/gpt-4", None, 404, "model"),
    "unknown http method": ("FOO", "/v1/models", None, 400, None),
    "chat unknown model": ("POST", CHAT, {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    "unknown route": ("GET", "/v1/nothing", None, 404, None),
    "wrong method": ("GET", C, None, 405, None),
    "tokenize without prompt": ("POST", "/tokenize", {}, 400, "prompt"),
    "detokenize token outside vocab": ("POST", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
}
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}
# Issue 11: whole-number floats for integer fields are accepted, as pydantic's lax mode does.
WHOLE_FLOATS = {"n": 1.0, "max_tokens": 5.0, "seed": 3.0, "top_k": 10.0, "stop_token_ids": [7.0]}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_then_normal_request(server, normal_text, name):
    method, path, body, status, param = BAD_REQUESTS[name]
    got, headers, raw = call(method, server.url + path, body)
    assert got == status, raw
    assert headers["Content-Type"].startswith("application/json")
    assert_error(raw, status, ERROR_TYPES[status], param)
    assert_serves_normally(server.url, normal_text)


def test_sdk_raises_typed_errors(server, normal_text):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1000)
    assert_serves_normally(server.url, normal_text)


def test_api_key(llama_path, normal_text):
    with make_server(llama_path, api_key="k3y") as thread:
        url = thread.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
            for method, path, body in (
                ("GET", "/v1/models", None),
                ("POST", C, NORMAL),
                ("GET", "/metrics", None),
            ):
                status, _, raw = call(method, url + path, body, headers)
                assert status == 401
                assert_error(raw, 401, "AuthenticationError", None)
        assert call("GET", url + "/health")[0] == 200  # health checks need no key
        good = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        resp = good.completions.create(**NORMAL)
        assert resp.choices[0].text == normal_text
        bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        # RFC 7235: the scheme is case-insensitive; a 401 says which scheme to use.
        for scheme in ("bearer", "BEARER", "Bearer"):
            status, _, _ = call("GET", url + "/v1/models", None, {"Authorization": f"{scheme} k3y"})
            assert status == 200, scheme
        status, headers, _ = call("GET", url + "/v1/models")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        # A non-UTF-8 byte in the header: a plain 401, not a 500 from decoding it.
        conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=30)
        try:
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", b"Bearer k3y\xff")
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 401
            assert_error(response.read(), 401, "AuthenticationError", None)
        finally:
            conn.close()
        status, _, raw = call("POST", url + C, NORMAL, {"Authorization": "Bearer k3y"})
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == normal_text


def test_whole_number_floats_are_integers(server, normal_text):
    """Issue 11: `"n": 1.0`, `"max_tokens": 5.0` are accepted (pydantic's lax mode); 1.5 is a
    400 naming the field (the BAD_REQUESTS cases)."""
    body = {**NORMAL, **WHOLE_FLOATS}
    status, _, raw = call("POST", server.url + C, body)
    assert status == 200, raw
    as_ints = {
        k: [int(x) for x in v] if isinstance(v, list) else int(v) for k, v in WHOLE_FLOATS.items()
    }
    assert (
        json.loads(raw)["choices"]
        == json.loads(call("POST", server.url + C, {**NORMAL, **as_ints})[2])["choices"]
    )
    chat = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 3.0, "n": 1.0}
    status, _, raw = call("POST", server.url + CHAT, chat)
    assert status == 200 and len(json.loads(raw)["choices"]) == 1


def test_models_do_not_show_the_filesystem_path(server, llama_path):
    status, _, raw = call("GET", server.url + "/v1/models")
    assert status == 200
    assert str(llama_path) not in raw.decode()
    assert json.loads(raw)["data"][0]["root"] == MODEL


@pytest.fixture
def engine_hooks(server):
    """Blocks (`release` unset) or fails (`fail` set) the server's next engine step."""
    engine = server.server.async_engine.engine
    real_step = engine.step
    hooks = type("Hooks", (), {})()
    hooks.entered, hooks.release, hooks.fail = (
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )
    hooks.release.set()

    def step():
        hooks.entered.set()
        hooks.release.wait(30)
        if hooks.fail.is_set():
            hooks.fail.clear()
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = step
    yield hooks
    hooks.release.set()
    del engine.step


def test_full_queue_gets_503_with_retry_after(server, normal_text, engine_hooks):
    engine_hooks.release.clear()
    engine_hooks.entered.clear()
    results: list[tuple[int, bytes]] = []

    def first_request():
        status, _, raw = call("POST", server.url + C, NORMAL)
        results.append((status, raw))

    thread = threading.Thread(target=first_request)
    thread.start()
    try:
        # The first request is inside the blocked step without a token: the one waiting slot is
        # taken, so the next request is refused at once.
        assert engine_hooks.entered.wait(30)
        status, headers, raw = call("POST", server.url + C, NORMAL)
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert_error(raw, 503, "ServiceUnavailableError", None)
    finally:
        engine_hooks.release.set()
        thread.join(30)
    assert results and results[0][0] == 200
    assert json.loads(results[0][1])["choices"][0]["text"] == normal_text
    assert_serves_normally(server.url, normal_text)


def test_failure_mid_stream_sends_error_event_then_done(server, normal_text, engine_hooks):
    body = {**NORMAL, "max_tokens": 40, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=30)
    try:
        conn.request("POST", C, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: {") and b'"text_completion"' in first
        engine_hooks.fail.set()
        events = [e for e in response.read().decode().split("\n\n") if e]
    finally:
        conn.close()
    assert events[-1] == "data: [DONE]"
    error = assert_error(events[-2][len("data: ") :].encode(), 500, "InternalServerError", None)
    assert "injected step failure" in error["message"]
    assert "RuntimeError(" not in error["message"]  # no internal reprs
    assert_serves_normally(server.url, normal_text)


def test_failure_mid_stream_raises_in_sdk(server, normal_text, engine_hooks):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    engine_hooks.fail.set()
    with pytest.raises(openai.APIError, match="injected step failure"):
        for _ in chunks:
            pass
    assert_serves_normally(server.url, normal_text)


def test_engine_failure_without_stream_is_500(server, normal_text, engine_hooks):
    engine_hooks.fail.set()
    status, _, raw = call("POST", server.url + C, NORMAL)
    assert status == 500
    assert_error(raw, 500, "InternalServerError", None)
    assert_serves_normally(server.url, normal_text)


def test_unexpected_error_is_500_without_internal_repr(server, normal_text, monkeypatch):
    class Secret:
        def __repr__(self) -> str:
            return "<Secret object at 0xdeadbeef>"

    def broken(*args, **kwargs):
        raise KeyError(Secret())

    monkeypatch.setattr(server.server, "_model_name", broken)
    status, _, raw = call("POST", server.url + C, NORMAL)
    assert status == 500
    error = assert_error(raw, 500, "InternalServerError", None)
    assert "Secret" not in error["message"] and "0x" not in error["message"]
    monkeypatch.undo()
    assert_serves_normally(server.url, normal_text)
