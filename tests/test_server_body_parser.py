"""engine/server/body_parser.py: big request bodies parse in a worker process, by the same rules
as small ones, and a body holding more JSON values than a valid request never reaches the
server's memory as objects."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.server.body_parser import BodyError, BodyParser, count_values, parse_json_object


@pytest.fixture
def parser():
    p = BodyParser(max_values=1000, inline_bytes=100)
    yield p
    p.close()


def big(body: dict) -> bytes:
    """`body` as JSON padded past the inline size with a field no rule looks at."""
    return json.dumps({**body, "padding": " " * 200}).encode()


def test_big_bodies_parse_in_the_worker_like_small_ones(parser):
    body = {"prompt": "x" * 500, "n": 2, "logit_bias": {"5": -1.5}, "stop": ["a", "b"]}
    raw = big(body)
    assert not parser.is_inline(raw)
    assert parser.parse(raw) == json.loads(raw)
    assert parser.parse(raw) == json.loads(raw)
    assert parser.num_spawned == 1  # one worker, reused
    small = json.dumps({"prompt": "hi"}).encode()
    assert parser.is_inline(small) and parser.parse(small) == {"prompt": "hi"}
    assert parser.num_spawned == 1


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b"[" + b"1, " * 100 + b"1]", "must be a JSON object, got an array", None),
        (b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply", None),
        (b'{"prompt": "a\\ud800' + b"x" * 200 + b'"}', "lone UTF-16 surrogate", "prompt"),
        (b'{"temperature": NaN, "x": "' + b"y" * 200 + b'"}', "not valid JSON", None),
        (b'{"prompt": "' + b"y" * 200, "not valid JSON", None),
    ],
    ids=["array", "deep", "surrogate", "nan", "truncated"],
)
def test_worker_applies_the_same_rules(parser, raw, message, param):
    assert not parser.is_inline(raw)
    with pytest.raises(BodyError, match=message) as big_error:
        parser.parse(raw)
    assert big_error.value.param == param
    with pytest.raises(BodyError, match=message):  # the inline path says the same
        parse_json_object(raw)


def test_too_many_values_are_refused_in_the_worker_naming_the_field(parser):
    raw = json.dumps({"model": "m", "prompt": list(range(2000))}).encode()
    with pytest.raises(BodyError, match="more than 1000 JSON values") as error:
        parser.parse(raw)
    assert error.value.param == "prompt"
    assert count_values({"a": [1, [2, 3]], "b": {"c": None}}) == 11  # values and keys
    assert count_values(list(range(10**6)), limit=10) == 11  # stops past the limit


def test_a_dead_worker_is_replaced_and_close_refuses(parser):
    raw = big({"prompt": "hi"})
    assert parser.parse(raw)["prompt"] == "hi"
    os.kill(parser._worker.proc.pid, signal.SIGKILL)
    parser._worker.proc.wait(10)
    with pytest.raises(BodyError, match="parser process failed"):
        parser.parse(raw)
    assert parser.parse(raw)["prompt"] == "hi"  # a new worker
    assert parser.num_spawned == 2
    parser.close()
    with pytest.raises(BodyError, match="shutting down"):
        parser.parse(raw)
