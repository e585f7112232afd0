"""OpenAI / vLLM request fields -> StructuredOutputsParams, and tool_choice grammars: each form
converts, bad input is a ValueError naming the request field, and outputs generated under the
converted params parse (a Pydantic model through the openai SDK's own response_format; tool
calls under tool_choice required / named)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, Field

from engine import LLM, SamplingParams
from engine.structured.openai import (
    from_request,
    from_response_format,
    parse_forced_tool_calls,
    structured_outputs_for_chat,
    tool_choice_schema,
    tool_choice_structured_outputs,
)
from engine.structured.params import StructuredOutputsParams

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
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


class Step(BaseModel):
    explanation: str = Field(max_length=12)
    output: int


class Reasoning(BaseModel):
    steps: list[Step] = Field(max_length=2)
    final: bool


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float64", block_size=4)


def test_each_request_field_converts():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == StructuredOutputsParams(
        json_object=True
    )
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert from_request({"response_format": rf}) == StructuredOutputsParams(json=schema)
    assert from_request({"structured_outputs": {"regex": "a+"}}) == StructuredOutputsParams(
        regex="a+"
    )
    assert from_request({"guided_json": schema}) == StructuredOutputsParams(json=schema)
    assert from_request({"guided_regex": "[0-9]"}).regex == "[0-9]"
    assert from_request({"guided_choice": ["a", "b"]}).choice == ("a", "b")
    assert from_request({"guided_grammar": 'root ::= "x"'}).grammar == 'root ::= "x"'
    assert from_request({"messages": []}) is None


@pytest.mark.parametrize(
    "body, match",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            r"^response_format\.json_schema\.schema: invalid JSON schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"dependentRequired": {"a": ["b"]}}},
                }
            },
            r"^response_format\.json_schema\.schema: the grammar engine \(llguidance\) cannot "
            r"compile it: Unimplemented keys: \[\"dependentRequired\"\]",
        ),
        ({"response_format": {"type": "yaml"}}, r"^response_format\.type must be"),
        ({"response_format": {"type": "json_schema"}}, r"^response_format\.json_schema must"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"strict": "y"}}},
            r"^response_format\.json_schema\.strict must be a boolean",
        ),
        ({"guided_regex": "a("}, r"^guided_regex: invalid regex"),
        ({"guided_choice": []}, r"^guided_choice must be a non-empty list"),
        ({"guided_json": {"type": "strin"}}, r"^guided_json: invalid JSON schema"),
        ({"structured_outputs": {"regex": "(?<=a)b"}}, r"^structured_outputs\.regex: .*compile"),
        ({"structured_outputs": {"jsn": {}}}, r"^structured_outputs: unsupported keys"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, r"^guided_choice: only one structured"),
        ({"guided_whitespace_pattern": " "}, r"^guided_whitespace_pattern is not supported"),
    ],
)
def test_bad_fields_are_named(body, match):
    with pytest.raises(ValueError, match=match):
        from_request(body)


def test_tool_choice_schemas():
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, "none") is None
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert tool_choice_schema(TOOLS, named) == TOOLS[0]["function"]["parameters"]
    required = tool_choice_schema(TOOLS, "required")
    good = [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}]
    jsonschema.validate(good, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "nope", "parameters": {}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)


@pytest.mark.parametrize(
    "tools, choice, match",
    [
        (TOOLS, {"type": "function", "function": {"name": "x"}}, r"^tool_choice: function 'x'"),
        (None, "required", r"^tool_choice: required or a named function needs tools"),
        (TOOLS, "sometimes", r"^tool_choice must be none, auto, required"),
        ([{"type": "function"}], "required", r"^tools\[0\]\.function must be an object"),
        ([{"type": "retrieval"}], "required", r"^tools\[0\] must be an object with type function"),
    ],
)
def test_bad_tool_choice_is_named(tools, choice, match):
    with pytest.raises(ValueError, match=match):
        tool_choice_structured_outputs(tools, choice)


def test_tool_choice_with_response_format_is_an_error():
    body = {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}
    with pytest.raises(ValueError, match=r"^tool_choice: required or a named function cannot"):
        structured_outputs_for_chat(body)
    assert structured_outputs_for_chat({"tools": TOOLS, "tool_choice": "auto"}) is None


def test_pydantic_response_format_output_parses(llm):
    """What `client.chat.completions.parse(response_format=Reasoning)` sends, converted and
    generated, parses back into the model."""
    response_format = type_to_response_format_param(Reasoning)
    assert response_format["json_schema"]["strict"] is True
    structured = from_request({"response_format": response_format})
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=400, structured_outputs=structured)
    outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        Reasoning.model_validate_json(out.outputs[0].text)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_always_parse(llm, choice):
    """Every output that ends by the grammar (not cut by max_tokens) parses into valid calls."""
    structured = structured_outputs_for_chat({"tools": TOOLS, "tool_choice": choice})
    params = [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=300, structured_outputs=structured)
        for seed in range(6)
    ]
    outs = llm.generate([[5, 6, 7], [40, 41], [3, 3, 3]] * 2, params, use_tqdm=False)
    finished = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert finished
    for text in finished:
        calls = parse_forced_tool_calls(text, choice, lambda i: f"c{i}")
        assert calls
        for call in calls:
            function = next(t["function"] for t in TOOLS if t["function"]["name"] == call.name)
            schema = function.get("parameters", {"type": "object", "additionalProperties": False})
            jsonschema.validate(json.loads(call.arguments), schema)
