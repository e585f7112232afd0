"""The OpenAI-compatible server, driven on loopback by the official `openai` SDK.

Every generation test compares the server's output with the offline `LLM` on the same checkpoint
with the same seeds (float64, so batch composition cannot flip a token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
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
from engine.tokenizer import apply_chat_template

ENGINE_KW = {
    "dtype": "float64",
    "block_size": 4,
    "kv_cache_memory_bytes": 16 * 2**20,
    "max_model_len": 256,
    "seed": 0,
}
MODEL = "tiny"
JSON_HEADERS = {"Content-Type": "application/json"}
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def needs_sampling_fields(*names: str):
    """Marks a test that needs SamplingParams fields the sampling work adds (stop, ...)."""
    missing = [n for n in names if n not in SAMPLING_FIELDS]
    return pytest.mark.skipif(bool(missing), reason=f"SamplingParams lacks {missing}")


@pytest.fixture(scope="module")
def server(llama_path):
    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW))
    config = ServerConfig(served_model_names=(MODEL,), log_stats_interval=0.2, access_log=False)
    with ServerThread(OpenAIServer(engine, config)) as thread:
        yield thread


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), **ENGINE_KW)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def offline(llm, prompts, **params):
    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def call(
    method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request; `body` is JSON-encoded unless bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = call("GET", url + "/metrics")[2].decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            values[(sample.name, labels)] = sample.value
    return values


def wait_idle(url: str, timeout: float = 20.0) -> dict[tuple[str, tuple], float]:
    """Polls /metrics until no request runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (
            m[("vllm:num_requests_running", ())] == 0
            and m[("vllm:num_requests_waiting", ())] == 0
            and m[("vllm:kv_cache_usage_perc", ())] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


# ---- completions ----------------------------------------------------------------------------


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completion_greedy_matches_offline(client, llm, tokenizer):
    prompt = "The lighthouse keeper"
    expected = offline(llm, prompt, temperature=0, max_tokens=10)[0]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_prompt_forms_and_n(client, llm):
    """Strings, token ids and lists of token ids; n seeded samples each; index = prompt*n + j."""
    params = {"temperature": 0.8, "seed": 7, "n": 2, "max_tokens": 6}
    strings = ["Bread needs", "The river"]
    ids = [[5, 6, 7, 8], [300, 301]]
    for prompt, prompts in ((strings, strings), (ids, ids), (ids[0], [ids[0]])):
        expected = offline(llm, prompts, **params)
        resp = client.completions.create(model=MODEL, prompt=prompt, **params)
        assert [c.index for c in resp.choices] == list(range(2 * len(prompts)))
        texts = [c.text for c in resp.choices]
        assert texts == [c.text for out in expected for c in out.outputs]
        assert resp.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
        assert resp.usage.completion_tokens == sum(
            len(c.token_ids) for o in expected for c in o.outputs
        )


def test_completion_stream_matches_offline(client, llm):
    prompts = ["Once upon", "A good loaf"]
    params = {"temperature": 0.9, "seed": 11, "n": 2, "max_tokens": 8}
    expected = offline(llm, prompts, **params)
    stream = client.completions.create(
        model=MODEL, prompt=prompts, stream=True, stream_options={"include_usage": True}, **params
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and len(chunk.choices) == 1
        choice = chunk.choices[0]
        assert choice.index not in finish  # nothing after a choice's finish_reason
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    flat = [c for out in expected for c in out.outputs]
    assert [texts[i] for i in range(4)] == [c.text for c in flat]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in flat]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == sum(len(c.token_ids) for c in flat)
    assert len({c.id for c in chunks}) == 1


def test_completion_logprobs(client, llm):
    prompt = [20, 21, 22, 23]
    expected = offline(llm, [prompt], temperature=0, max_tokens=5, logprobs=3)[0].outputs[0]
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(expected.token_ids) == 5
    for pos, token_id in enumerate(expected.token_ids):
        entries = expected.logprobs[pos]
        assert lp.token_logprobs[pos] == entries[token_id].logprob
        top = sorted(entries.values(), key=lambda e: e.rank)[:3]
        assert sorted(lp.top_logprobs[pos].values(), reverse=True)[:3] == [e.logprob for e in top]
    # text_offset: where each token's text starts in the returned text
    assert lp.text_offset[0] == 0
    for k in range(4):
        assert lp.text_offset[k + 1] == lp.text_offset[k] + len(lp.tokens[k])


@needs_sampling_fields("stop")
def test_completion_stop_string(client, llm):
    probe = offline(llm, "The river runs", temperature=0, max_tokens=20, ignore_eos=True)[0]
    text = probe.outputs[0].text
    stop = text[4:6]  # a string the greedy continuation is known to contain
    expected = offline(llm, "The river runs", temperature=0, max_tokens=20, stop=[stop])[0]
    resp = client.completions.create(
        model=MODEL, prompt="The river runs", max_tokens=20, temperature=0, stop=[stop]
    )
    assert resp.choices[0].text == expected.outputs[0].text
    assert stop not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The river runs", max_tokens=20, temperature=0, stop=stop,
            stream=True,
        )
    )  # fmt: skip
    assert streamed == expected.outputs[0].text


@needs_sampling_fields("prompt_logprobs")
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_completion_echo_logprobs(client, llm, max_tokens):
    """lm-eval's loglikelihood call: echo + logprobs, max_tokens 0 or 1."""
    prompt = "The small café"
    offline_out = offline(llm, prompt, temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1)[
        0
    ]
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True, logprobs=1
    )
    choice = resp.choices[0]
    n_prompt = len(offline_out.prompt_token_ids)
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, n_prompt):
        token_id = offline_out.prompt_token_ids[pos]
        assert lp.token_logprobs[pos] == offline_out.prompt_logprobs[pos][token_id].logprob
    if max_tokens == 0:
        assert choice.text == prompt and resp.usage.completion_tokens == 0
    else:
        assert choice.text == prompt + offline_out.outputs[0].text
    # Streamed, the same text, tokens, logprobs and offsets arrive in pieces.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True,
            logprobs=1, stream=True,
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


# ---- chat -------------------------------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about bread."},
]


def test_chat_matches_offline_async_n(server, llm):
    params = {"temperature": 0.7, "seed": 5, "n": 3, "max_tokens": 7}
    expected = llm.chat(MESSAGES, SamplingParams(**params), use_tqdm=False)[0]

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", max_retries=0
        ) as client:
            return await client.chat.completions.create(model=MODEL, messages=MESSAGES, **params)

    resp = asyncio.run(main())
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [c.text for c in expected.outputs]
    assert all(c.message.role == "assistant" for c in resp.choices)
    assert [c.finish_reason for c in resp.choices] == [c.finish_reason for c in expected.outputs]
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_chat_stream_async_matches_offline(server, llm):
    params = {"temperature": 0.7, "seed": 9, "n": 2}
    expected = llm.chat(MESSAGES, SamplingParams(max_tokens=9, **params), use_tqdm=False)[0]

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_completion_tokens=9,
                stream=True,
                stream_options={"include_usage": True},
                **params,
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    content = {0: "", 1: ""}
    first_delta: dict[int, object] = {}
    finish = {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.usage is None
        choice = chunk.choices[0]
        first_delta.setdefault(choice.index, choice.delta)
        content[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    for i in (0, 1):
        assert first_delta[i].role == "assistant" and first_delta[i].content == ""
        assert content[i] == expected.outputs[i].text
        assert finish[i] == expected.outputs[i].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_chat_logprobs_sync_stream_and_not(client, llm):
    expected = llm.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=6, logprobs=2), use_tqdm=False
    )[0].outputs[0]
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
            top_logprobs=2, stream=True,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]  # fmt: skip
    for entries in (content, streamed):
        assert len(entries) == len(expected.token_ids)
        for entry, token_id, pos in zip(
            entries, expected.token_ids, expected.logprobs, strict=True
        ):
            assert entry.logprob == pos[token_id].logprob
            assert bytes(entry.bytes).decode("utf-8") == entry.token
            top = sorted(pos.values(), key=lambda e: e.rank)[:2]
            assert [t.logprob for t in entry.top_logprobs] == [e.logprob for e in top]


@needs_sampling_fields("stop")
def test_chat_stop_string(client, llm):
    probe = llm.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    stop = probe[0].outputs[0].text[3:5]
    expected = llm.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False
    )
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop]
    )
    assert resp.choices[0].message.content == expected[0].outputs[0].text
    assert resp.choices[0].finish_reason == "stop"


# ---- load, disconnects, other routes ------------------------------------------------------------


def test_64_concurrent_streams(server, llm, tokenizer):
    prompts = [f"Request number {i} says" for i in range(64)]
    expected = offline(llm, prompts, temperature=0, max_tokens=8)

    async def one(client, prompt):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert [r[0] for r in results] == [o.outputs[0].text for o in expected]
    assert [r[1] for r in results] == [o.outputs[0].finish_reason for o in expected]
    m = wait_idle(server.url)
    assert m[("vllm:kv_cache_usage_perc", ())] == 0


@pytest.fixture
def slow_steps(server):
    """Makes each engine step take >= 20 ms, so a long request is surely still running."""
    engine = server.server.async_engine.engine
    real_step = engine.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    engine.step = slow_step
    yield
    del engine.step  # back to the class's method


def test_client_disconnect_mid_stream_aborts(server, slow_steps):
    before = metrics(server.url)
    aborted_before = before.get(("vllm:request_success_total", (("finished_reason", "abort"),)), 0)
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 200, "stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), JSON_HEADERS)
        response = conn.getresponse()
        assert response.status == 200
        data_lines = 0
        while data_lines < 3:
            data_lines += response.readline().startswith(b"data: ")
        during = metrics(server.url)
        assert during[("vllm:num_requests_running", ())] == 1
        assert during[("vllm:kv_cache_usage_perc", ())] > 0
    finally:
        conn.close()  # the client goes away mid-stream
    m = wait_idle(server.url)
    assert m[("vllm:num_requests_running", ())] == 0
    assert m[("vllm:kv_cache_usage_perc", ())] == 0
    assert m[("vllm:request_success_total", (("finished_reason", "abort"),))] == aborted_before + 1


def test_client_timeout_non_streaming_aborts(server, slow_steps):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 200, "ignore_eos": True}
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=0.3)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), JSON_HEADERS)
        with pytest.raises(TimeoutError):
            conn.getresponse()
        during = metrics(server.url)
        assert during[("vllm:num_requests_running", ())] == 1
    finally:
        conn.close()
    m = wait_idle(server.url)
    assert m[("vllm:num_requests_running", ())] == 0
    assert m[("vllm:kv_cache_usage_perc", ())] == 0


def test_stats_log_line(server, slow_steps, caplog):
    with caplog.at_level(logging.INFO, logger="engine.server.app"):
        status, _, _ = call(
            "POST",
            server.url + "/v1/completions",
            {"prompt": "abc", "max_tokens": 30, "ignore_eos": True},
        )
        assert status == 200
        time.sleep(0.3)  # one more interval: the line covering the end of the request
    lines = [r.getMessage() for r in caplog.records if "Avg prompt throughput" in r.getMessage()]
    assert lines, "no stats line while busy"
    pattern = (
        r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
        r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, "
        r"Prefix cache hit rate: [\d.]+%"
    )
    assert all(re.fullmatch(pattern, line) for line in lines)
    assert any(float(re.search(r"generation throughput: ([\d.]+)", x)[1]) > 0 for x in lines)


def test_metrics_names_and_counters(server, client):
    before = metrics(server.url)
    client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    after = wait_idle(server.url)
    names = {name for name, _ in after}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ):
        assert name in names, name
    assert after[("vllm:prompt_tokens_total", ())] - before[("vllm:prompt_tokens_total", ())] == 3
    gen = ("vllm:generation_tokens_total", ())
    assert 1 <= after[gen] - before[gen] <= 4
    e2e = ("vllm:e2e_request_latency_seconds_count", ())
    assert after[e2e] == before.get(e2e, 0) + 1


def test_health_version_tokenize_detokenize(server, tokenizer):
    assert call("GET", server.url + "/health")[0] == 200
    version = json.loads(call("GET", server.url + "/version")[2])["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)
    text = "Hello, café 日本"
    tok = json.loads(call("POST", server.url + "/tokenize", {"model": MODEL, "prompt": text})[2])
    assert tok["tokens"] == tokenizer.encode(text)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    chat = json.loads(call("POST", server.url + "/tokenize", {"messages": MESSAGES})[2])
    assert chat["tokens"] == apply_chat_template(tokenizer, MESSAGES)
    detok = json.loads(call("POST", server.url + "/detokenize", {"tokens": tok["tokens"]})[2])
    assert detok["prompt"] == text


def test_raw_sse_format(server):
    """Byte-level SSE framing: `data: {json}` events separated by blank lines, then [DONE]."""
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "temperature": 0}
    status, headers, raw = call("POST", server.url + "/v1/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: ") :])
        assert set(chunk) >= {"id", "object", "created", "model", "choices"}


# ---- the command line ------------------------------------------------------------------------


def test_cli_serves_and_shuts_down_cleanly_on_sigterm(llama_path):
    """`python -m engine.server`: a request in flight at SIGTERM still completes; exit code 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_API_KEY": "sekrit"}
    cmd = [
        sys.executable, "-m", "engine.server", "--model", str(llama_path), "--port", "0",
        "--max-model-len", "512", "--kv-cache-memory-bytes", "16MiB", "--served-model-name",
        MODEL, "--disable-access-log", "--shutdown-timeout", "60",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    url_found = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "Serving" in line:
                url_found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert url_found.wait(120), "".join(lines)
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", "".join(lines))[1]
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert call("GET", url + "/v1/models")[0] == 401  # the key came from the env
        stream = client.completions.create(
            model=MODEL, prompt="abc", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        proc.send_signal(signal.SIGTERM)
        after_signal = 0
        finish = None
        for chunk in chunks:
            after_signal += 1
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length" and after_signal > 0
        assert proc.wait(60) == 0
        with pytest.raises(urllib.error.URLError):
            call("GET", url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    log = "".join(lines)
    assert "received SIGTERM" in log and "server stopped" in log


def test_cli_flags_map_onto_engine_args(llama_path, monkeypatch, caplog):
    from engine.server import __main__ as cli

    ns = cli.build_parser().parse_args(
        [
            "--model", str(llama_path), "--max-num-batched-tokens", "512",
            "--no-enable-prefix-caching", "--kv-cache-memory-bytes", "16MiB", "--block-size", "8",
            "--served-model-name", "a", "b", "--max-waiting-requests", "0",
        ]
    )  # fmt: skip
    args = cli.engine_args_from(ns)
    assert args.model == str(llama_path) and args.block_size == 8
    assert args.max_num_batched_tokens == 512 and args.enable_prefix_caching is False
    assert args.kv_cache_memory_bytes == 16 * 2**20
    assert args.max_model_len is None  # not given: EngineArgs' own default
    monkeypatch.setenv("ENGINE_API_KEY", "from-env")
    config = cli.server_config_from(ns)
    assert config.served_model_names == ("a", "b") and config.api_key == "from-env"
    assert config.max_waiting_requests is None  # 0: unbounded
    # A flag whose EngineArgs field this engine version lacks: accepted, warned about, not passed.
    monkeypatch.setattr(cli, "ENGINE_FLAGS", (*cli.ENGINE_FLAGS, "future_setting"))
    ns.future_setting = 3
    with caplog.at_level(logging.WARNING, logger="engine.server"):
        assert cli.engine_args_from(ns) == args
    assert "--future-setting is ignored" in caplog.text
    assert cli.parse_bytes("2GiB") == 2 * 2**30 and cli.parse_bytes("1.5k") == 1536
    assert cli.parse_bytes("512") == 512


def test_speculative_decoding_server_and_metrics(llama_path, llm):
    """--speculative-config on the server: the same greedy text as without it, and vLLM's
    spec_decode counters on /metrics."""
    spec = {"method": "draft_model", "model": str(llama_path), "num_speculative_tokens": 3}
    engine = LLMEngine(EngineArgs(model=str(llama_path), **ENGINE_KW, speculative_config=spec))
    config = ServerConfig(served_model_names=(MODEL,), log_stats_interval=None, access_log=False)
    with ServerThread(OpenAIServer(engine, config)) as thread:
        with openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0) as c:
            got = c.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
        want = offline(llm, ["Hello"], max_tokens=12, temperature=0)[0].outputs[0].text
        assert got.choices[0].text == want
        m = wait_idle(thread.url)
    drafts = m[("vllm:spec_decode_num_drafts_total", ())]
    drafted = m[("vllm:spec_decode_num_draft_tokens_total", ())]
    accepted = m[("vllm:spec_decode_num_accepted_tokens_total", ())]
    assert drafts > 0 and accepted == drafted  # the model drafting for itself is always right
    per_position = [
        m[("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),))]
        for i in range(3)
    ]
    assert sum(per_position) == accepted
