"""The Ray Serve replicas' routing policy and metrics merge (pure Python: these run without Ray),
and the promise that Ray stays optional."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.serve.metrics import merge_replica_metrics
from engine.serve.routing import prompt_text, rank_replicas, rendezvous_order, routing_key

SHARED = "You are a careful assistant. " * 12  # 348 characters, more than one routing prefix


def test_importing_the_engine_and_its_server_does_not_import_ray():
    code = (
        "import sys, engine, engine.server, engine.server.__main__, engine.serve, "
        "engine.serve.routing, engine.serve.metrics; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_prompt_text_of_each_request_shape():
    assert prompt_text("/v1/completions", {"prompt": "abc"}) == "abc"
    assert prompt_text("/v1/completions", {"prompt": ["first", "second"]}) == "first"
    assert prompt_text("/v1/completions", {"prompt": [5, 6, 7]}) == "5,6,7"
    assert prompt_text("/v1/completions", {"prompt": [[5, 6], [7]]}) == "5,6"
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert prompt_text("/v1/chat/completions", chat) == "system\nbe brief\nuser\nhi\n"
    assert prompt_text("/tokenize", chat) == "system\nbe brief\nuser\nhi\n"
    assert prompt_text("/tokenize", {"prompt": "x"}) == "x"
    # No prompt, not a routed route, not an object: no key (the replica answers any 400).
    for path, body in [
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": 5}),
        ("/v1/completions", ["not", "an", "object"]),
        ("/v1/models", {"prompt": "abc"}),
        ("/v1/chat/completions", {"messages": "hi"}),
    ]:
        assert prompt_text(path, body) is None
        assert routing_key(path, body) is None


def test_routing_key_hashes_only_the_first_prefix_chars():
    a = routing_key("/v1/completions", {"prompt": SHARED + "What is 2+2?"})
    b = routing_key("/v1/completions", {"prompt": SHARED + "Name a colour."})
    c = routing_key("/v1/completions", {"prompt": "Another system prompt. " + SHARED})
    assert a == b != c
    # A longer window tells them apart; a short prompt is hashed whole.
    assert routing_key("/v1/completions", {"prompt": SHARED + "x"}, prefix_chars=400) != (
        routing_key("/v1/completions", {"prompt": SHARED + "y"}, prefix_chars=400)
    )
    assert routing_key("/v1/completions", {"prompt": "ab"}) != routing_key(
        "/v1/completions", {"prompt": "abc"}
    )
    # Stable across processes: a hash of the bytes, not Python's salted hash().
    code = (
        "from engine.serve.routing import routing_key; "
        f"print(routing_key('/v1/completions', {{'prompt': {SHARED!r}}}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()
    assert other == routing_key("/v1/completions", {"prompt": SHARED})
    with pytest.raises(ValueError, match="prefix_chars"):
        routing_key("/v1/completions", {"prompt": "a"}, prefix_chars=0)


def test_rendezvous_spreads_keys_and_moves_only_the_lost_replicas_keys():
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [routing_key("/v1/completions", {"prompt": f"prompt {i}"}) for i in range(400)]
    owners = {k: rendezvous_order(k, replicas)[0] for k in keys}
    counts = Counter(owners.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 60  # ~100 each
    survivors = ["r1", "r2", "r4"]
    for k, owner in owners.items():
        new_owner = rendezvous_order(k, survivors)[0]
        if owner != "r3":
            assert new_owner == owner  # keys of live replicas never move
        else:
            assert new_owner in survivors


def test_rank_prefers_the_prefix_owner_unless_it_is_overloaded():
    key = routing_key("/v1/completions", {"prompt": SHARED})
    owner, other = rendezvous_order(key, ["a", "b"])
    assert rank_replicas(key, {"a": 0, "b": 0}, 8) == [[owner], [other]]
    # Unknown queue lengths count as empty.
    assert rank_replicas(key, {"a": None, "b": None}, 8) == [[owner], [other]]
    # Up to the threshold beyond the least loaded replica: still the owner first.
    assert rank_replicas(key, {owner: 8, other: 0}, 8) == [[owner], [other]]
    # Beyond it: the least loaded first.
    assert rank_replicas(key, {owner: 9, other: 0}, 8) == [[other], [owner]]
    assert rank_replicas(key, {owner: 3, other: 0}, 0) == [[other], [owner]]
    # No key (GET routes, bodies that are not JSON): least loaded first, ties by name.
    assert rank_replicas(None, {"a": 3, "b": 1}, 8) == [["b"], ["a"]]
    assert rank_replicas(None, {"b": 0, "a": 0}, 8) == [["a"], ["b"]]
    assert rank_replicas(key, {"solo": 5}, 0) == [["solo"]]
    assert rank_replicas(key, {}, 8) == []
    # Three replicas: after the owner, the others by load.
    three = {"a": 4, "b": 2, "c": 3}
    first = rendezvous_order(key, list(three))[0]
    rest = sorted((n for n in three if n != first), key=three.get)
    assert rank_replicas(key, three, 8) == [[first], *([n] for n in rest)]


def test_merged_metrics_keep_every_replica_and_parse():
    one = (
        "# HELP vllm:num_requests_running Requests in the running batch.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 2.0\n'
        "# HELP plain_total A series without labels.\n"
        "# TYPE plain_total counter\n"
        "plain_total 3.0\n"
    )
    two = one.replace(" 2.0", " 5.0").replace(" 3.0", " 4.0")
    extra = (
        "# HELP engine_serve_replicas n\n# TYPE engine_serve_replicas gauge\n"
        "engine_serve_replicas 2\n"
    )
    text = merge_replica_metrics([("r1", one), ("r2", two)], extra_families=[extra])
    assert text.count("# TYPE vllm:num_requests_running") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    running = {s.labels["replica"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert running == {"r1": 2.0, "r2": 5.0}
    assert all(s.labels["model_name"] == "m" for s in families["vllm:num_requests_running"].samples)
    plain = {s.labels["replica"]: s.value for s in families["plain"].samples}
    assert plain == {"r1": 3.0, "r2": 4.0}
    assert families["engine_serve_replicas"].samples[0].value == 2
