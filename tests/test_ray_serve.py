"""Engine replicas behind Ray Serve, on a local Ray cluster this module starts (CPU, a tiny
random-weight Llama, two replicas of one thread each).

What it proves: the openai SDK gets, through Ray Serve's proxy, the same streamed and
non-streamed answers as from `engine.server` directly; requests sharing a prompt prefix land on
the replica the routing policy names for it (and different prefixes spread over both); /metrics
holds both replicas' series; a client that disconnects mid-stream has its request aborted on the
replica, and no hang-up leaves an unretrieved exception in the ingress replica's log; and when a
replica's actor is killed, its in-flight non-streamed request is answered by the other replica,
its stream ends with an error event, and every later request is answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e .[ray])")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

import aiohttp  # noqa: E402
from openai import OpenAI  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine import EngineArgs, LLMEngine  # noqa: E402
from engine.serve.ingress import REPLICA_HEADER  # noqa: E402
from engine.serve.ray import REPLICA_NAME, app_builder, build_app, build_parser  # noqa: E402
from engine.serve.routing import rendezvous_order, routing_key  # noqa: E402
from engine.server import OpenAIServer, ServerConfig, ServerThread  # noqa: E402
from engine.server.thread import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = "engine-test"
MODEL = "tiny"
# float64: served and direct answers must agree token for token (no near-tie flips).
ENGINE_FLAGS = ["--dtype", "float64", "--max-model-len", "4096", "--kv-cache-memory-bytes", "32MiB"]
SHARED = "The quick brown fox jumps over the lazy dog near the river bank. " * 6  # ~390 chars


@pytest.fixture(scope="module")
def model_path(checkpoints) -> Path:
    """The tiny Llama with room for long generations (a killed replica must die mid-request)."""
    return checkpoints("llama-4k", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def direct(model_path):
    """The reference: the same checkpoint and flags served by `engine.server` in-process."""
    args = EngineArgs(
        model=str(model_path), dtype="float64", max_model_len=4096, kv_cache_memory_bytes=32 * 2**20
    )
    config = ServerConfig(served_model_names=(MODEL,), log_stats_interval=None, access_log=False)
    with ServerThread(OpenAIServer(LLMEngine(args), config)) as thread:
        yield thread.url


@pytest.fixture(scope="module")
def served(model_path):
    """The Ray Serve application's base URL (2 replicas, 1 thread each)."""
    ray.init(
        address="local",
        num_cpus=8,  # logical: the bench test below adds up to 3 one-CPU replicas
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        argv = [
            "--model", str(model_path), "--served-model-name", MODEL, "--replicas", "2",
            "--num-threads-per-replica", "1", "--disable-log-stats", "--disable-access-log",
            *ENGINE_FLAGS,
        ]  # fmt: skip
        serve.run(build_app(build_parser().parse_args(argv)), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: dict) -> tuple[int, dict[str, str], dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def _metrics(base: str) -> dict[str, list]:
    status, _, body = _get(base + "/metrics")
    assert status == 200, body
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def _replicas(base: str) -> list[str]:
    samples = _metrics(base)["vllm:num_requests_running"]
    return sorted({s.labels["replica"] for s in samples})


def _answers(base: str) -> dict[str, str]:
    """Greedy completions and chats through the openai SDK, streamed and not."""
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    prompt = SHARED + "Tell me a story."
    messages = [{"role": "user", "content": "Hello there, who are you?"}]
    out = {}
    out["completion"] = (
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    out["completion-stream"] = "".join(c.choices[0].text for c in stream if c.choices)
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    out["chat"] = chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    out["chat-stream"] = "".join(pieces)
    out["chat-stream-usage"] = str(usage)
    return out


def _owned_prompt(owner: str, replicas: list[str], tag: str) -> str:
    """A prompt whose routing key the policy assigns to `owner`."""
    for i in range(1000):
        prompt = f"{tag} {i}: " + SHARED
        if rendezvous_order(routing_key("/v1/completions", {"prompt": prompt}), replicas)[0] == (
            owner
        ):
            return prompt
    raise AssertionError("no prompt found")


def test_openai_sdk_answers_equal_the_direct_server(served, direct):
    through_ray = _answers(served)
    assert through_ray == _answers(direct)
    assert through_ray["completion"] == through_ray["completion-stream"] != ""
    assert through_ray["chat"] == through_ray["chat-stream"] != ""
    assert through_ray["chat-stream-usage"] == "12"
    # The other routes answer as the server does, errors included (OpenAI's JSON).
    models = [json.loads(_get(base + "/v1/models")[2])["data"] for base in (served, direct)]
    for cards in models:
        for card in cards:
            card.pop("created")
    assert models[0] == models[1] != []
    tokenized = {"model": MODEL, "prompt": "Hello world"}
    assert _post(served + "/tokenize", tokenized)[2] == _post(direct + "/tokenize", tokenized)[2]
    assert _get(served + "/health")[0] == 200
    bad = {"model": MODEL, "prompt": "x", "temperature": -1}
    status, headers, body = _post(served + "/v1/completions", bad)
    assert (status, body) == _post(direct + "/v1/completions", bad)[::2]
    assert status == 400 and body["error"]["param"] == "temperature"
    assert headers[REPLICA_HEADER]


def test_shared_prefixes_land_on_the_replica_that_owns_them(served):
    replicas = _replicas(served)
    assert len(replicas) == 2
    for owner in replicas:  # three prefixes owned by each replica, three requests each
        for n in range(3):
            prefix = _owned_prompt(owner, replicas, f"Document {n} for {owner}")
            for question in ("Summarise it.", "What is the second word?", "Translate it."):
                body = {"model": MODEL, "prompt": prefix + question, "max_tokens": 2}
                status, headers, _ = _post(served + "/v1/completions", body)
                assert status == 200
                assert headers[REPLICA_HEADER] == owner, (owner, n, question)
    # Each replica reused its prefixes' KV blocks.
    hits = {s.labels["replica"]: s.value for s in _metrics(served)["vllm:prefix_cache_hits"]}
    assert set(hits) == set(replicas) and min(hits.values()) > 0


def test_an_overloaded_owner_spills_to_the_least_loaded_replica(served):
    """12 long requests of one prefix at once: the owner takes them until it has more than the
    imbalance threshold (8) in flight beyond the other replica, which then takes the excess."""
    replicas = _replicas(served)
    owner, other = replicas
    prompt = _owned_prompt(owner, replicas, "Busy")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 600, "ignore_eos": True}

    async def burst() -> list[str]:
        async with aiohttp.ClientSession() as session:

            async def one() -> str:
                async with session.post(served + "/v1/completions", json=body) as response:
                    assert response.status == 200
                    return response.headers[REPLICA_HEADER]

            return await asyncio.gather(*(one() for _ in range(12)))

    placed = Counter(asyncio.run(burst()))
    assert placed[owner] >= 9 and placed[other] >= 1, placed
    assert placed[owner] + placed[other] == 12


def test_each_replica_runs_the_threads_it_was_given(served):
    handle = serve.get_deployment_handle(REPLICA_NAME, app_name=APP)
    assert handle.broadcast("num_threads").results(timeout_s=60) == [(1, "1"), (1, "1")]


def test_metrics_hold_every_replica(served):
    families = _metrics(served)
    assert families["engine_serve_replicas"][0].value == 2
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens"):
        assert {s.labels["replica"] for s in families[name]} == set(_replicas(served)), name
        assert all(s.labels["model_name"] == MODEL for s in families[name])


def _ingress_stderr() -> str:
    """What this module's ingress replica wrote to stderr (its worker's .err file, where
    asyncio reports an exception that no one retrieved)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    header = f":actor_name:ServeReplica:{APP}:OpenAIIngress"
    texts = [p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.err"))]
    return "".join(t for t in texts if header in t)


def test_a_client_that_disconnects_mid_stream_aborts_on_the_replica(served):
    """Clients that hang up after the first event have their requests aborted on the replica;
    neither they nor clients that hang up at `data: [DONE]` (before the response's end) leave
    an exception in the ingress replica's log ("Task exception was never retrieved": Serve's
    cancelled receive call once escaped the streaming response)."""
    hang_ups = 6

    def aborted() -> float:
        samples = _metrics(served)["vllm:request_success"]
        return sum(s.value for s in samples if s.labels["finished_reason"] == "abort")

    before = aborted()

    async def hang_up(at_done: bool) -> None:
        body = {"model": MODEL, "prompt": "Count: ", "max_tokens": 3 if at_done else 400,
                "ignore_eos": True, "stream": True}  # fmt: skip
        async with (
            aiohttp.ClientSession() as session,
            session.post(served + "/v1/completions", json=body) as response,
        ):
            assert response.status == 200
            line = await response.content.readline()  # the first event
            while at_done and line != b"data: [DONE]\n":
                line = await response.content.readline()

    async def clients() -> None:
        for _ in range(hang_ups):
            await hang_up(at_done=False)
            await hang_up(at_done=True)

    asyncio.run(clients())
    deadline = time.monotonic() + 30
    while aborted() < before + hang_ups:
        assert time.monotonic() < deadline, "the requests were not aborted on the replica"
        time.sleep(0.2)
    running = _metrics(served)["vllm:num_requests_running"]
    assert all(s.value == 0 for s in running)
    time.sleep(1)  # asyncio reports an unretrieved exception when its task is collected
    assert "never retrieved" not in _ingress_stderr()


def test_replicas_bench_quick(served, model_path, capsys, monkeypatch):
    """bench/replicas.py --quick: direct, 1 and 2 Ray replicas (under route prefixes of this
    module's Serve instance), every request answered, ratios against 1 replica printed."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # for its `from common import ...`
    spec = importlib.util.spec_from_file_location("bench_replicas", ROOT / "bench" / "replicas.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_replicas"] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    argv = ["--quick", "--serve-url", served, "--model", str(model_path), *ENGINE_FLAGS]
    rows = bench.main(argv)
    assert [(r.server, r.replicas) for r in rows] == [("direct", 1), ("ray", 1), ("ray", 2)]
    for row in rows:
        assert (row.level.num_ok, row.level.num_failed) == (8, 0)
        assert row.level.output_tokens == 8 * 8
    table = capsys.readouterr().out.splitlines()
    summary = table[table.index(next(t for t in table if t.startswith("| server |"))) :]
    assert summary[2].startswith("| direct | 1 | 4 | 8 / 0 |")
    assert summary[3].startswith("| ray | 1 | 4 | 8 / 0 |") and summary[3].endswith("| 1.00x |")
    assert summary[4].startswith("| ray | 2 | 4 | 8 / 0 |")
    # The bench's applications are gone; this module's stays.
    assert _get(served + "/bench-replicas-2/health")[0] != 200
    assert _get(served + "/health")[0] == 200


def test_killing_a_replica_leaves_the_other_serving(served, direct):
    """Kill the replica that is running two long requests: the non-streamed one is retried on
    the other replica (same answer), the stream ends with an error event and [DONE], and every
    later request is answered by the survivor (or Serve's replacement)."""
    replicas = _replicas(served)
    victim, survivor = replicas
    long = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    retried = {**long, "prompt": _owned_prompt(victim, replicas, "Retried")}
    streamed = {**long, "prompt": _owned_prompt(victim, replicas, "Streamed"), "stream": True}

    def running_on_victim() -> float:
        samples = _metrics(served)["vllm:num_requests_running"]
        return sum(s.value for s in samples if s.labels["replica"] == victim)

    async def scenario() -> tuple[int, dict, dict, list[bytes]]:
        async with aiohttp.ClientSession() as session:
            non_streamed = asyncio.create_task(
                session.post(served + "/v1/completions", json=retried)
            )
            async with session.post(served + "/v1/completions", json=streamed) as stream:
                assert stream.headers[REPLICA_HEADER] == victim
                await stream.content.readline()
                deadline = time.monotonic() + 20
                while await asyncio.to_thread(running_on_victim) < 2:
                    assert time.monotonic() < deadline, "the two requests never ran together"
                    await asyncio.sleep(0.05)
                actor = ray.get_actor(
                    f"SERVE_REPLICA::{APP}#{REPLICA_NAME}#{victim}", namespace="serve"
                )
                ray.kill(actor, no_restart=True)
                rest = [line async for line in stream.content if line.strip()]
            response = await non_streamed
            async with response:
                return response.status, dict(response.headers), await response.json(), rest

    status, headers, answer, rest = asyncio.run(scenario())
    assert status == 200, answer
    assert headers[REPLICA_HEADER] == survivor
    expected = _post(direct + "/v1/completions", retried)[2]
    assert answer["choices"][0]["text"] == expected["choices"][0]["text"]
    assert answer["usage"] == expected["usage"]
    assert rest[-1] == b"data: [DONE]\n"
    assert json.loads(rest[-2].removeprefix(b"data: "))["error"]["code"] == 500
    # Prompts of both owners: the victim's go to the survivor (or to Serve's replacement).
    expected = _answers(direct)
    for i in range(8):
        body = {"model": MODEL, "prompt": f"Document {i}: " + SHARED, "max_tokens": 4}
        status, headers, answer = _post(served + "/v1/completions", body)
        assert status == 200, answer
        assert headers[REPLICA_HEADER] != victim
    assert _answers(served) == expected  # streamed and not, after the kill


def test_app_builder_takes_the_flags_by_name(llama_path):
    app = app_builder({"model": str(llama_path), "replicas": 3, "enable_prefix_caching": False,
                       "served_model_name": [MODEL], "routing_prefix_chars": 128})  # fmt: skip
    assert app is not None
    with pytest.raises(ValueError, match="no_such_flag"):
        app_builder({"model": str(llama_path), "no_such_flag": 1})
    with pytest.raises(ValueError, match="--replicas"):
        app_builder({"model": str(llama_path), "replicas": 0})


def test_the_config_example_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    paths = sorted((ROOT / "examples").glob("ray_serve*.yaml"))
    assert paths
    for path in paths:
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for application in config.applications:
            assert application.import_path == "engine.serve.ray:app_builder", path
            module, _, name = application.import_path.partition(":")
            builder = getattr(__import__(module, fromlist=[name]), name)
            args = dict(application.args)
            args["model"] = "demo"  # the example's path need not exist here
            assert builder(args) is not None


def test_the_command_checks_its_flags_before_starting_ray():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "engine.serve.ray", "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0
    for flag in ("--replicas", "--num-threads-per-replica", "--routing-prefix-chars",
                 "--max-num-seqs", "--enable-prefix-caching", "--api-key"):  # fmt: skip
        assert flag in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "engine.serve.ray", "--model", "demo", "--replicas", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2 and "--replicas must be at least 1" in out.stderr
