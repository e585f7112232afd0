"""Issue 12: one client must not kill, freeze or exhaust the server.

Connections that never finish their headers are closed; connections beyond the cap get a 503;
chat templates render off the event loop with a time and size bound; tokenizing runs off the
event loop; shutdown keeps its deadline when clients stop reading. While the slow work runs,
`/health` answers at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from engine import EngineArgs, LLMEngine
from engine.server import OpenAIServer, ServerConfig, ServerThread

ENGINE_KW = {
    "dtype": "float64",
    "block_size": 4,
    "kv_cache_memory_bytes": 16 * 2**20,
    "max_model_len": 256,
    "seed": 0,
}
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Hi"}]
HEAVY_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def make_server(llama_path, engine_kw: dict | None = None, **config: Any) -> ServerThread:
    engine = LLMEngine(EngineArgs(model=str(llama_path), **{**ENGINE_KW, **(engine_kw or {})}))
    defaults = {"served_model_names": (MODEL,), "log_stats_interval": None, "access_log": False}
    return ServerThread(OpenAIServer(engine, ServerConfig(**{**defaults, **config})))


@pytest.fixture(scope="module")
def server(llama_path):
    config = {
        "request_header_timeout": 1.0,
        "max_connections": 6,
        "trust_request_chat_template": True,
        "chat_template_timeout": 1.0,
        "max_request_body_bytes": 2**20,
        "request_body_timeout": 1.0,
    }
    with make_server(llama_path, **config) as thread:
        yield thread


def call(
    method: str, url: str, body: Any = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    """Times /health until `stop` is set (at least once)."""
    latencies = []
    while True:
        start = time.monotonic()
        status, _, _ = call("GET", url + "/health", timeout=30)
        assert status == 200
        latencies.append(time.monotonic() - start)
        if stop.wait(0.05):
            return latencies


def run_while_timing_health(url: str, work) -> tuple[Any, list[float]]:
    result: list[Any] = []
    done = threading.Event()

    def target():
        try:
            result.append(work())
        finally:
            done.set()

    thread = threading.Thread(target=target)
    thread.start()
    latencies = health_latencies(url, done)
    thread.join(60)
    return result[0], latencies


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def assert_serves(url: str) -> None:
    body = {"model": MODEL, "prompt": "The river", "max_tokens": 3, "temperature": 0}
    status, _, raw = call("POST", url + "/v1/completions", body)
    assert status == 200, raw


def test_connections_without_headers_are_closed(server):
    host, port = address(server.url)
    socks = []
    try:
        for _ in range(4):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(sock)
        start = time.monotonic()
        for sock in socks:
            assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 5
    finally:
        for sock in socks:
            sock.close()
    assert server.server.connections.num_timed_out >= 4
    assert_serves(server.url)


def test_connections_beyond_the_cap_get_503(server):
    host, port = address(server.url)
    guard = server.server.connections
    wait_until(lambda: guard.num_open == 0)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(6)]
    try:
        wait_until(lambda: guard.num_open == 6)  # all six accepted
        extra = socket.create_connection((host, port), timeout=10)
        try:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
        finally:
            extra.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert json.loads(body)["error"]["code"] == 503
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: guard.num_open == 0)
    assert_serves(server.url)


def test_body_too_large_is_413_json(server):
    body = {"model": MODEL, "prompt": "a" * (2**20 + 10)}
    status, headers, raw = call("POST", server.url + "/v1/completions", body)
    assert status == 413 and headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert error["code"] == 413 and "--max-request-body-bytes" in error["message"]
    assert_serves(server.url)


def test_declared_oversized_body_is_refused_unread(server):
    """A Content-Length over the limit gets its 413 at once (no waiting for, reading or parsing
    the upload), with `Connection: close`; the server stops reading the connection and closes it
    shortly after."""
    with socket.create_connection(address(server.url), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000000000\r\n\r\n{"prompt": "'  # the rest never comes
        )
        start = time.monotonic()
        reply = b""
        while chunk := sock.recv(4096):  # until the server closes
            reply += chunk
        elapsed = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply  # not the 408 of a body waited for
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == 413
    assert elapsed < 0.9  # request_body_timeout is 1 s: nobody waited for the body
    assert_serves(server.url)


def test_body_limit_follows_the_prompt_limits(llama_path):
    """The body limit is the smaller of --max-request-body-bytes and what a valid request can
    need (its most prompts of the most characters, plus 1 MiB)."""
    with make_server(llama_path, max_prompts_per_request=4) as thread:
        server = thread.server
        needed = 4 * server.limits.max_prompt_chars + 2**20
        assert server.limits.max_prompt_chars == 32 * 256  # chars per token x max_model_len
        assert server.max_request_body_bytes == needed < server.config.max_request_body_bytes
        body = {"model": MODEL, "prompt": "a" * (needed + 1)}
        status, _, raw = call("POST", thread.url + "/v1/completions", body)
        assert status == 413 and str(needed) in json.loads(raw)["error"]["message"]
        body = {"model": MODEL, "prompt": ["The river"] * 4, "max_tokens": 2}
        assert call("POST", thread.url + "/v1/completions", body)[0] == 200


def test_big_bodies_parse_in_a_worker_process(server):
    """A body over 256 KiB is parsed in the body parser's process (json.loads holds the GIL); it
    comes back and is validated like any other, unless it holds more JSON values than a valid
    request can, which the worker refuses naming the field."""
    parser = server.server.body_parser
    body = {"model": MODEL, "prompt": "a" * 300_000}
    status, _, raw = call("POST", server.url + "/v1/completions", body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "prompt" and "300000 characters" in error["message"]
    assert parser.num_spawned == 1
    count = parser.max_values + 1
    assert 3 * count < server.server.max_request_body_bytes  # "1, " per value fits the limit
    status, _, raw = call("POST", server.url + "/v1/completions", {"prompt": [1] * count})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "prompt" and "JSON values" in error["message"]
    assert parser.num_spawned == 1
    assert_serves(server.url)


def test_body_that_does_not_arrive_is_408(server):
    with socket.create_connection(address(server.url), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"prompt": "'  # and then nothing more
        )
        start = time.monotonic()
        reply = sock.recv(4096)
        elapsed = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == 408
    assert 0.5 < elapsed < 5
    assert_serves(server.url)


def test_socket_error_logs_are_rate_limited():
    import logging

    from engine.server.connections import RateLimitFilter

    limiter = RateLimitFilter(interval=60.0)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = [limiter.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 1  # one line, not a thousand tracebacks
    assert limiter.filter(record("another message"))  # other messages are not held back
    limiter._seen[("asyncio", "socket.accept() out of system resource")] = (-1e9, 999)
    later = record("socket.accept() out of system resource")
    assert limiter.filter(later) and "999 similar messages dropped" in later.getMessage()


def test_request_chat_template_is_bounded_and_off_the_event_loop(server):
    def heavy() -> tuple[int, bytes, float]:
        start = time.monotonic()
        body = {"model": MODEL, "messages": MESSAGES, "chat_template": HEAVY_LOOP}
        status, _, raw = call("POST", server.url + "/v1/chat/completions", body)
        return status, raw, time.monotonic() - start

    (status, raw, elapsed), latencies = run_while_timing_health(server.url, heavy)
    assert status == 400 and json.loads(raw)["error"]["param"] == "messages"
    assert "longer than 1 s" in json.loads(raw)["error"]["message"]
    assert elapsed < 10
    assert max(latencies) < 1.0, latencies
    # Output size: a template that builds 21 MB of text is refused before it is tokenized.
    body = {"model": MODEL, "messages": MESSAGES, "chat_template": "{{ 'ab ' * 7000000 }}"}
    status, _, raw = call("POST", server.url + "/tokenize", body)
    assert status == 400 and "characters" in json.loads(raw)["error"]["message"]
    # A trusted request template that is fine renders (the server's stays the default).
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    status, _, raw = call("POST", server.url + "/tokenize", body)
    assert status == 200 and json.loads(raw)["count"] >= 1
    assert_serves(server.url)


def test_template_timeout_keeps_its_worker_and_workers_run_niced(server):
    """A render that runs over its timeout is interrupted inside its worker, which stays: a stream
    of hostile templates does not cost a process start (about a second of CPU) each. Workers
    run at a lower CPU priority than the server."""
    renderer = server.server.inputs.renderer
    fine = {"model": MODEL, "messages": MESSAGES}
    assert call("POST", server.url + "/tokenize", fine)[0] == 200  # a worker is running
    spawned = renderer.num_spawned
    heavy = {"model": MODEL, "messages": MESSAGES, "chat_template": HEAVY_LOOP}
    for _ in range(2):
        start = time.monotonic()
        status, _, raw = call("POST", server.url + "/tokenize", heavy)
        assert status == 400 and "longer than 1 s" in json.loads(raw)["error"]["message"]
        assert time.monotonic() - start < 1.0 + 0.9  # before the parent's kill deadline
    assert call("POST", server.url + "/tokenize", fine)[0] == 200
    assert renderer.num_spawned == spawned  # no worker was killed and replaced
    import os

    for worker in list(renderer._all):
        assert os.getpriority(os.PRIO_PROCESS, worker.proc.pid) == min(19, os.nice(0) + 10)


def test_prestarted_worker_renders_at_once(llama_path):
    with make_server(llama_path, prestart_chat_template_worker=True) as thread:
        renderer = thread.server.inputs.renderer
        wait_until(lambda: any(w._ready for w in list(renderer._all)), timeout=60)
        start = time.monotonic()
        status, _, raw = call("POST", thread.url + "/tokenize", {"messages": MESSAGES})
        assert status == 200 and json.loads(raw)["count"] > 0
        assert time.monotonic() - start < 0.5  # no worker start on the request's path
        assert len(renderer._all) == 1  # the started worker was reused


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    tokenizer = server.server.inputs.tokenizer
    real_encode = tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(1.5)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    (status, _, raw), latencies = run_while_timing_health(
        server.url, lambda: call("POST", server.url + "/tokenize", {"prompt": "Hello"})
    )
    monkeypatch.undo()
    assert status == 200 and json.loads(raw)["tokens"] == real_encode("Hello")
    assert max(latencies) < 1.0, latencies


def test_shutdown_keeps_its_deadline_when_clients_stop_reading(llama_path):
    """A streaming client that stops reading blocks its handler's writes; shutdown must still
    end within --shutdown-timeout plus about a second."""
    thread = make_server(llama_path, {"max_model_len": 512}, shutdown_timeout=1.0)
    thread.start()
    body = {
        "model": MODEL,
        "prompt": "Once",
        "max_tokens": 500,
        "n": 16,
        "ignore_eos": True,
        "logprobs": 20,  # fat chunks: more than the socket buffers hold
        "stream": True,
    }
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny window
    try:
        sock.connect(address(thread.url))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 200")  # flowing; from now on nobody reads
        deadline = time.monotonic() + 60
        while thread.server.async_engine.stats.generation_tokens_total < 16 * 300:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The handler is stuck writing to the client that does not read.
        start = time.monotonic()
        thread.stop(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert not thread._thread.is_alive()
    assert elapsed < 1.0 + 2.5, elapsed


def test_limit_flags_map_onto_server_config(llama_path):
    from engine.server import __main__ as cli

    ns = cli.build_parser().parse_args(
        [
            "--model", str(llama_path), "--trust-request-chat-template", "--max-n", "4",
            "--max-connections", "0", "--request-header-timeout", "2.5",
            "--max-request-body-bytes", "1MiB", "--max-stop-strings", "8",
            "--chat-template-timeout", "0.5", "--quantization", "int8",
        ]
    )  # fmt: skip
    config = cli.server_config_from(ns)
    assert config.trust_request_chat_template and config.max_n == 4
    assert config.max_connections is None and config.request_header_timeout == 2.5
    assert config.max_request_body_bytes == 2**20 and config.max_stop_strings == 8
    assert config.chat_template_timeout == 0.5
    assert ns.quantization == "int8" and "quantization" in cli.ENGINE_FLAGS
    defaults = cli.server_config_from(cli.build_parser().parse_args([]))
    assert defaults == ServerConfig(
        served_model_names=(cli.default_model()[1],),
        api_key=defaults.api_key,
        prestart_chat_template_worker=True,
        warm_structured_outputs=True,
    )


def test_reserved_cpus_leave_cores_to_the_server(llama_path, monkeypatch):
    """ENGINE_CPU_NUM_OF_RESERVED_CPU (or vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU) = N gives the engine
    thread N fewer torch threads always; 0 leaves torch's setting; the default, "auto", reserves
    one while other work competes (tests/test_cpu_contention.py)."""
    import torch

    from engine.server import __main__ as cli
    from engine.server.app import engine_threads

    argv = ["--model", str(llama_path)]
    monkeypatch.delenv("ENGINE_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert cli.server_config_from(cli.build_parser().parse_args(argv)).reserved_cpus == 1
    monkeypatch.setenv("ENGINE_CPU_NUM_OF_RESERVED_CPU", "2")
    assert cli.server_config_from(cli.build_parser().parse_args(argv)).reserved_cpus == 2
    monkeypatch.delenv("ENGINE_CPU_NUM_OF_RESERVED_CPU")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    assert cli.server_config_from(cli.build_parser().parse_args(argv)).reserved_cpus == "auto"
    assert ServerConfig().reserved_cpus == "auto"
    assert engine_threads(0) is None
    assert engine_threads(1) == max(1, torch.get_num_threads() - 1)
    assert engine_threads(10**6) == 1
    with pytest.raises(ValueError, match="reserved_cpus"):
        ServerConfig(reserved_cpus=-1)
    with make_server(llama_path, reserved_cpus=1) as thread:
        assert thread.server.async_engine.num_threads == engine_threads(1)
        assert_serves(thread.url)


def test_default_max_n_leaves_running_slots_to_other_requests(llama_path):
    """By default one request's samples take at most half of --max-num-seqs: with n equal to
    max_num_seqs it would hold every running slot and other requests would wait for it to end."""
    with make_server(llama_path, engine_kw={"max_num_seqs": 8}) as thread:
        assert thread.server.limits.max_n == 4
        body = {"model": MODEL, "prompt": "hi", "n": 4, "max_tokens": 2, "ignore_eos": True}
        status, _, raw = call("POST", thread.url + "/v1/completions", body)
        assert status == 200 and len(json.loads(raw)["choices"]) == 4
        status, _, raw = call("POST", thread.url + "/v1/completions", {**body, "n": 5})
        assert status == 400 and json.loads(raw)["error"]["param"] == "n"
    with make_server(llama_path, engine_kw={"max_num_seqs": 8}, max_n=8) as thread:
        assert thread.server.limits.max_n == 8  # --max-n still sets it


def test_server_shutdown_shuts_the_engine_down(llama_path, monkeypatch):
    """With tensor parallelism the engine owns worker processes: the server's shutdown calls
    LLMEngine.shutdown() once the engine thread has stopped."""
    calls = []
    thread = make_server(llama_path)
    monkeypatch.setattr(thread.server._engine, "shutdown", lambda: calls.append("shutdown"))
    with thread:
        assert_serves(thread.url)
        assert not calls
    assert calls == ["shutdown"] and thread.server.async_engine.stopped


def test_max_connections_fit_the_open_files_limit(monkeypatch):
    import resource

    from engine.server import __main__ as cli

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (512, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: None)
    fitted = cli.fit_open_files(ServerConfig(max_connections=1000))
    assert fitted.max_connections == 512 - cli._RESERVED_FILES
    assert cli.fit_open_files(ServerConfig(max_connections=100)).max_connections == 100
    assert cli.fit_open_files(ServerConfig(max_connections=None)).max_connections is None
