"""The Ray Serve ingress and replica classes in-process (no cluster; Ray must be installed).

The ingress against a stand-in for the engine deployment's handle: body limit, retries when a
replica dies before answering, the SSE error event (and a warning) when it dies mid-stream,
cancelling the replica call on disconnect, a disconnect that Serve delivers as a cancelled
`receive()` (mid-stream or mid-upload) leaving no exception behind, route prefixes, and /metrics
(merge, a replica's 401 passed through, dead replicas skipped). The replica with a real engine:
JSON answers whole in the head, SSE in chunks, its thread count, health, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e .[ray])")

from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request

from engine.serve.ingress import REPLICA_HEADER, IngressConfig, OpenAIIngress
from engine.serve.routing import routing_key

JSON = [("Content-Type", "application/json")]
SSE_HEAD = {"status": 200, "headers": [("Content-Type", "text/event-stream")], "replica": "r2"}


PENDING = object()  # a FakeStream item: the replica has not produced the next chunk yet


class FakeStream:
    """A DeploymentResponseGenerator stand-in: yields `items`; an exception item is raised;
    `PENDING` waits until the caller is cancelled (the engine is still generating)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item is PENDING:
            await asyncio.Event().wait()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """The engine deployment's handle: each call takes the next scripted stream."""

    def __init__(self, streams: list[FakeStream], metrics: list[Any] | None = None) -> None:
        self.streams = streams
        self.calls: list[tuple] = []
        self.metrics = metrics or []
        self.handle_http = self

    def options(self, stream: bool) -> FakeHandle:
        assert stream
        return self

    def remote(self, method, target, headers, body, routing_key=None) -> FakeStream:
        self.calls.append((method, target, body, routing_key))
        return self.streams.pop(0)

    def broadcast(self, name: str, authorization: str | None) -> FakeHandle:
        assert name == "metrics"
        self.authorization = authorization
        return self

    async def results_async(self, timeout_s: float, return_exceptions: bool) -> list[Any]:
        assert return_exceptions
        return self.metrics


def _request(method: str, path: str, body: bytes = b"", headers=(), root_path: str = "") -> Request:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http", "method": method, "path": root_path + path, "root_path": root_path,
        "query_string": b"", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }  # fmt: skip
    return Request(scope, receive)


async def _body(response) -> bytes:
    if hasattr(response, "body_iterator"):
        return b"".join([chunk async for chunk in response.body_iterator])
    return response.body


def _call(ingress: OpenAIIngress, request: Request) -> tuple[Any, bytes]:
    async def go():
        response = await ingress(request)
        return response, await _body(response)

    return asyncio.run(go())


def test_relays_the_replica_answer_with_its_routing_key_and_replica_header():
    body = json.dumps({"prompt": "Hello there", "max_tokens": 2}).encode()
    head = {"status": 200, "headers": JSON, "replica": "r1", "body": b'{"ok": true}'}
    handle = FakeHandle([FakeStream([head])])
    response, data = _call(OpenAIIngress(handle), _request("POST", "/v1/completions", body))
    assert (response.status_code, data) == (200, b'{"ok": true}')
    assert response.headers[REPLICA_HEADER] == "r1"
    key = routing_key("/v1/completions", {"prompt": "Hello there"})
    assert handle.calls == [("POST", "/v1/completions", body, key)]


def test_a_body_too_large_to_parse_on_the_loop_is_routed_without_a_key():
    from engine.serve.ingress import _MAX_ROUTED_BODY_BYTES

    head = {"status": 200, "headers": JSON, "replica": "r1", "body": b"{}"}
    handle = FakeHandle([FakeStream([head])])
    body = json.dumps({"prompt": "x" * _MAX_ROUTED_BODY_BYTES}).encode()
    _call(OpenAIIngress(handle), _request("POST", "/v1/completions", body))
    assert handle.calls[0][3] is None


def test_route_prefix_is_stripped_and_get_routes_have_no_key():
    head = {"status": 200, "headers": JSON, "replica": "r1", "body": b"{}"}
    handle = FakeHandle([FakeStream([head])])
    _call(OpenAIIngress(handle), _request("GET", "/v1/models", root_path="/llama"))
    assert handle.calls == [("GET", "/v1/models", b"", None)]


def test_a_body_over_the_limit_is_a_413_before_any_replica_is_called():
    handle = FakeHandle([])
    ingress = OpenAIIngress(handle, IngressConfig(max_request_body_bytes=10))
    big = b'{"prompt": "' + b"x" * 20 + b'"}'
    for headers in ([("Content-Length", str(len(big)))], []):  # declared, or counted
        response, data = _call(ingress, _request("POST", "/v1/completions", big, headers))
        assert response.status_code == 413
        assert json.loads(data)["error"]["code"] == 413
    assert handle.calls == []


def test_a_body_that_does_not_arrive_in_time_is_a_408():
    async def never() -> dict:
        await asyncio.sleep(3600)
        return {}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "query_string": b"", "headers": []}  # fmt: skip
    ingress = OpenAIIngress(FakeHandle([]), IngressConfig(request_body_timeout=0.1))
    response, data = _call(ingress, Request(scope, never))
    assert response.status_code == 408 and json.loads(data)["error"]["code"] == 408


@pytest.mark.parametrize("hang_up", ["cancelled", "disconnect"])
def test_a_client_that_goes_away_during_the_body_costs_no_replica_call(hang_up: str):
    """Mid-upload, Serve's cancelled receive call (TaskCancelledError) or an `http.disconnect`
    (Starlette's ClientDisconnect) ends the request with a 400 no one reads, not an exception
    left in Serve's unawaited handler task; no replica is called."""
    from ray.exceptions import TaskCancelledError

    messages = [{"type": "http.request", "body": b'{"prompt": ', "more_body": True}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if hang_up == "cancelled":
            raise TaskCancelledError()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "query_string": b"", "headers": []}  # fmt: skip
    handle = FakeHandle([])
    response, data = _call(OpenAIIngress(handle), Request(scope, receive))
    assert response.status_code == 400 and "disconnected" in json.loads(data)["error"]["message"]
    assert handle.calls == []


def test_a_replica_that_dies_before_answering_costs_a_retry():
    head = {"status": 200, "headers": JSON, "replica": "r1", "body": b"{}"}
    # Killed, or its loopback server gone (the replica's call raised: a RayTaskError).
    broken = RayTaskError("handle_http", "Traceback...", ConnectionRefusedError("loopback"))
    streams = [FakeStream([ActorDiedError()]), FakeStream([broken]), FakeStream([head])]
    handle = FakeHandle(streams)
    response, data = _call(OpenAIIngress(handle), _request("POST", "/v1/completions", b"{}"))
    assert (response.status_code, data, len(handle.calls)) == (200, b"{}", 3)
    dead = [FakeStream([ActorDiedError()]) for _ in range(3)]
    response, data = _call(OpenAIIngress(FakeHandle(dead)), _request("GET", "/health"))
    assert response.status_code == 503
    assert json.loads(data)["error"]["type"] == "ServiceUnavailableError"


def test_too_many_requests_waiting_for_a_replica_is_a_503_with_retry_after():
    full = FakeHandle(
        [FakeStream([BackPressureError(num_queued_requests=5, max_queued_requests=5)])]
    )
    response, data = _call(OpenAIIngress(full), _request("POST", "/v1/completions", b"{}"))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert json.loads(data)["error"]["type"] == "ServiceUnavailableError"


def test_a_replica_that_dies_mid_stream_ends_it_with_an_error_event(caplog):
    stream = FakeStream([SSE_HEAD, b"data: {}\n\n", ActorDiedError()])
    with caplog.at_level(logging.WARNING, logger="engine.serve.ingress"):
        response, data = _call(OpenAIIngress(FakeHandle([stream])), _request("POST", "/tokenize"))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "a replica failed mid-stream" in caplog.records[0].getMessage()
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[0] == "data: {}" and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 500
    assert response.headers[REPLICA_HEADER] == "r2"


def test_a_client_that_goes_away_cancels_the_replica_call():
    stream = FakeStream([SSE_HEAD, b"data: 1\n\n", b"data: 2\n\n"])
    ingress = OpenAIIngress(FakeHandle([stream]))

    async def go() -> None:
        response = await ingress(_request("POST", "/v1/completions", b"{}"))
        chunks = response.body_iterator
        assert await chunks.__anext__() == b"data: 1\n\n"
        await chunks.aclose()  # Starlette closes the iterator when the client disconnects

    asyncio.run(go())
    assert stream.cancelled


# When Serve's cancellation of the handler's task lands, in event-loop iterations after the
# hang-up (None: never): at once, or while the response unwinds (it crosses threads in Serve).
@pytest.mark.parametrize("cancel_after", [None, 0, 2], ids=["uncancelled", "at-once", "later"])
def test_a_disconnect_seen_as_a_cancelled_receive_ends_the_stream_without_an_error(
    cancel_after: int | None,
):
    """When the client hangs up, Serve's proxy cancels the request and, with it, the ingress's
    pending `receive_asgi_messages` call to the proxy: Ray's ASGI receive proxy (the real class
    here) then raises that call's TaskCancelledError from `receive()`, where Starlette's
    StreamingResponse awaits `http.disconnect`. The stream must end as on a disconnect (the
    replica call cancelled) with nothing escaping the response, whether or not (or when) Serve
    also cancels the handler's task: Serve does not await that task once the request is cancelled,
    so an exception left in it was logged as "Task exception was never retrieved"."""
    import gc

    from ray.exceptions import TaskCancelledError
    from ray.serve._private.http_util import ASGIReceiveProxy

    stream = FakeStream([SSE_HEAD, b"data: 1\n\n", PENDING])
    ingress = OpenAIIngress(FakeHandle([stream]))
    reported: list[dict] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        response = await ingress(_request("POST", "/v1/completions", b"{}"))
        client_gone = asyncio.Event()

        async def receive_asgi_messages(_metadata: Any) -> bytes:  # the call to the proxy
            await client_gone.wait()
            raise TaskCancelledError()  # ray.cancel'd with the request

        async def send(message: dict) -> None:
            if message.get("body"):  # the first event reached the client, which hangs up
                client_gone.set()

        scope = {"type": "http"}
        receive = ASGIReceiveProxy(scope, None, receive_asgi_messages)
        fetching = asyncio.create_task(receive.fetch_until_disconnect())  # as Serve does
        call = asyncio.create_task(response(scope, receive, send))  # Serve's handler task
        await client_gone.wait()
        if cancel_after is not None:
            for _ in range(cancel_after):
                await asyncio.sleep(0)
            call.cancel()
        await asyncio.wait([call, fetching], timeout=10)
        assert call.done()
        del call  # unawaited, as Serve leaves it: asyncio reports an exception left in it
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(go())
    assert stream.cancelled
    assert [c["message"] for c in reported] == []


def test_only_a_cancelled_receive_counts_as_a_disconnect():
    """Any other error from `receive()` (here the proxy's actor died) still propagates out of
    the response, after the replica call is cancelled."""
    stream = FakeStream([SSE_HEAD, PENDING])
    ingress = OpenAIIngress(FakeHandle([stream]))

    async def go() -> None:
        response = await ingress(_request("POST", "/v1/completions", b"{}"))

        async def receive() -> dict:
            raise ActorDiedError()

        async def send(message: dict) -> None:
            pass

        await response({"type": "http"}, receive, send)

    with pytest.raises(ActorDiedError):
        asyncio.run(go())
    assert stream.cancelled


def test_metrics_merge_replicas_skip_dead_ones_and_pass_a_401_through():
    text = "# HELP g A gauge.\n# TYPE g gauge\ng 1.0\n"
    handle = FakeHandle([], metrics=[("b", 200, text.encode()), ActorDiedError(),
                                     ("a", 200, text.encode())])  # fmt: skip
    request = _request("GET", "/metrics", headers=[("Authorization", "Bearer k")])
    response, data = _call(OpenAIIngress(handle), request)
    assert response.status_code == 200 and handle.authorization == "Bearer k"
    families = {f.name: f.samples for f in text_string_to_metric_families(data.decode())}
    assert [s.labels["replica"] for s in families["g"]] == ["a", "b"]
    assert families["engine_serve_replicas"][0].value == 2
    denied = b'{"error": {"code": 401}}'
    handle = FakeHandle([], metrics=[("a", 401, denied)])
    response, data = _call(OpenAIIngress(handle), _request("GET", "/metrics"))
    assert (response.status_code, data) == (401, denied)
    response, data = _call(OpenAIIngress(FakeHandle([], metrics=[])), _request("GET", "/metrics"))
    assert response.status_code == 503


def test_engine_replica_in_process_relays_json_and_sse_and_bounds_its_threads(llama_path):
    """`EngineReplica` outside Ray: its loopback server answers, a JSON answer comes whole in
    the head, a stream as SSE chunks; it sets the threads it was given; health; shutdown."""
    import torch

    from engine import EngineArgs
    from engine.serve.replica import EngineReplica
    from engine.server import ServerConfig

    before = torch.get_num_threads()
    want = before + 1
    args = EngineArgs(model=str(llama_path), max_model_len=256, kv_cache_memory_bytes=8 * 2**20)
    config = ServerConfig(served_model_names=("tiny",), log_stats_interval=None, access_log=False)
    replica = EngineReplica(args, config, num_threads=want)
    try:
        assert replica.num_threads() == (want, str(want))

        async def go() -> tuple[list, list]:
            await replica.check_health()
            body = json.dumps({"prompt": "Hello", "max_tokens": 3}).encode()
            headers = [("Content-Type", "application/json"), ("Content-Length", "999")]
            whole = [x async for x in replica.handle_http("POST", "/v1/completions", headers, body)]
            stream = json.dumps({"prompt": "Hello", "max_tokens": 3, "stream": True}).encode()
            sse = [x async for x in replica.handle_http("POST", "/v1/completions", headers, stream)]
            await replica._session.close()
            return whole, sse

        whole, sse = asyncio.run(go())
        assert len(whole) == 1 and whole[0]["status"] == 200
        assert json.loads(whole[0]["body"])["usage"]["completion_tokens"] == 3
        assert all(k.lower() not in ("content-length", "transfer-encoding") for k, _ in
                   whole[0]["headers"])  # fmt: skip
        assert "body" not in sse[0] and sse[0]["status"] == 200
        events = b"".join(sse[1:]).decode().strip().split("\n\n")
        assert events[-1] == "data: [DONE]" and len(events) >= 4
    finally:
        replica.__del__()
        torch.set_num_threads(before)
    assert not replica._loopback._thread.is_alive()


def test_router_counts_its_placements_so_a_burst_spills_past_the_threshold():
    """Ray's queue-length cache lags a burst (it is updated after each send); the router's own
    count must make the owner's excess go to the other replica, and return to zero."""
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve.request_router import PendingRequest, ReplicaID

    from engine.serve.router import PrefixAffinityRouter
    from engine.serve.routing import rendezvous_order

    deployment = DeploymentID(name="EngineReplica", app_name="app")
    router = PrefixAffinityRouter(
        deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(imbalance_threshold=2)
    replicas = {n: SimpleNamespace(replica_id=ReplicaID(n, deployment)) for n in ("a", "b")}
    key = routing_key("/v1/completions", {"prompt": "shared"})
    owner, other = rendezvous_order(key, list(replicas))

    async def scenario() -> None:
        def request(i: int) -> PendingRequest:
            metadata = SimpleNamespace(internal_request_id=f"r{i}")
            return PendingRequest(args=[], kwargs={"routing_key": key}, metadata=metadata)

        pending = [request(i) for i in range(6)]
        firsts = []
        for pr in pending[:5]:
            ranks = await router.choose_replicas(list(replicas.values()), pr)
            firsts.append(ranks[0][0].replica_id.unique_id)
        # Loads 0, 1, 2 on the owner; at 3 (> 0 + 2) the other; then 3 - 1 <= 2: the owner.
        assert firsts == [owner, owner, owner, other, owner]
        assert router.load(replicas[owner].replica_id) == 4
        # Ray picks another replica than the first rank for request 0: the count follows.
        pending[0].future.set_result(replicas[other])
        # Request 1 is cancelled before it is sent: released.
        pending[1].future.cancel()
        await asyncio.sleep(0)
        assert router.load(replicas[owner].replica_id) == 2
        assert router.load(replicas[other].replica_id) == 2
        # Routing the same request again (a new round) does not count it twice.
        await router.choose_replicas(list(replicas.values()), pending[2])
        assert sum(router._in_flight.values()) == 4  # r0, r2, r3, r4
        for pr in pending[2:5]:
            pr.future.set_result(replicas[owner])
        await asyncio.sleep(0)
        router.on_request_completed(replicas[other].replica_id, "r0")
        router.on_request_completed(replicas[owner].replica_id, "r2")
        router.on_replica_actor_died(replicas[owner].replica_id)  # r3 and r4 die with it
        assert router._placed == {} and router._in_flight == {}

    asyncio.run(scenario())
