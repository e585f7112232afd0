"""The server under uvloop (Ray Serve installs it and makes it the default loop in its
replicas): uvloop's transports do not subclass asyncio.Transport, and the connection guard once
asserted that they did, failing every connection."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from engine import EngineArgs, LLMEngine
from engine.server import OpenAIServer, ServerConfig, ServerThread

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (it comes with ray[serve])")


def test_server_answers_under_uvloop(llama_path):
    engine = LLMEngine(EngineArgs(model=str(llama_path), max_model_len=128))
    config = ServerConfig(served_model_names=("demo",), log_stats_interval=None, access_log=False)
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        with ServerThread(OpenAIServer(engine, config)) as thread:
            body = json.dumps({"prompt": "hi", "max_tokens": 3, "temperature": 0}).encode()
            request = urllib.request.Request(
                thread.url + "/v1/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            with urllib.request.urlopen(thread.url + "/health", timeout=60) as response:
                assert response.status == 200
    finally:
        asyncio.set_event_loop_policy(policy)
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["choices"][0]["finish_reason"] == "length"
