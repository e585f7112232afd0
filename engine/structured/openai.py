"""OpenAI / vLLM request fields -> structured outputs, and tool_choice -> the grammar that
enforces it. Pure functions over the request's JSON; the server calls them (see the README).

Request fields read (at most one of them may constrain the output):

- OpenAI `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}`;
- vLLM `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (and
  `guided_whitespace_pattern`, refused: not supported);
- `tools` + `tool_choice`: `"required"` or `{"type": "function", "function": {"name": N}}` are
  enforced by a JSON schema (vLLM's approach): required -> a non-empty JSON array of
  `{"name": one of the tools, "parameters": that tool's parameters}`; a named function -> that
  function's parameters object. `parse_forced_tool_calls` turns such output into tool calls.
  `"none"` and `"auto"` constrain nothing (`auto` output goes through a tool parser).

Every error is a ValueError whose message starts with the request field it is about (e.g.
`response_format.json_schema.schema: invalid JSON schema at ...`), so the server's 400 can name
the field (`param`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from engine.structured.params import StructuredOutputsParams
from engine.tool_parsers.base import ToolCall, random_tool_call_id
from engine.tool_parsers.forced import ForcedToolCallParser

GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _renamed(exc: ValueError, field: str) -> ValueError:
    """The params' message with its `structured_outputs.X` prefix replaced by field."""
    message = str(exc)
    for prefix in (
        "structured_outputs.json_object",
        "structured_outputs.json",
        "structured_outputs.regex",
        "structured_outputs.choice",
        "structured_outputs.grammar",
        "structured_outputs",
    ):
        if message.startswith(prefix):
            return ValueError(field + message[len(prefix) :])
    return ValueError(f"{field}: {message}")


def from_response_format(response_format: Any) -> StructuredOutputsParams | None:
    """OpenAI's response_format -> StructuredOutputsParams (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be an object, got {response_format!r}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError("response_format.json_schema must be an object with a schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict must be a boolean, got {strict!r}")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"response_format.json_schema.name must be a string, got {name!r}")
    # OpenAI's field is `schema`; some clients send `json_schema` (vLLM accepts both).
    schema = spec.get("schema", spec.get("json_schema"))
    if schema is None:
        schema = {}  # OpenAI: no schema means any JSON value
    try:
        return StructuredOutputsParams(json=schema)
    except ValueError as exc:
        raise _renamed(exc, "response_format.json_schema.schema") from None


def from_request(body: Mapping[str, Any]) -> StructuredOutputsParams | None:
    """The structured output a chat or completion request asks for, from any of the fields in
    the module docstring; None when it asks for none. Two fields at once is a ValueError."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    response_format = from_response_format(body.get("response_format"))
    if response_format is not None:
        found.append(("response_format", response_format))
    if body.get("structured_outputs") is not None:
        try:
            params = StructuredOutputsParams.from_dict(body["structured_outputs"])
        except TypeError as exc:  # already named structured_outputs.X when a ValueError
            raise ValueError(f"structured_outputs: {exc}") from None
        found.append(("structured_outputs", params))
    for field, form in GUIDED_FIELDS.items():
        value = body.get(field)
        if value is None:
            continue
        try:
            found.append((field, StructuredOutputsParams(**{form: value})))
        except ValueError as exc:
            raise _renamed(exc, field) from None
    if body.get("guided_whitespace_pattern") is not None:
        raise ValueError("guided_whitespace_pattern is not supported (llguidance)")
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ValueError(f"{found[1][0]}: only one structured output may be given, got {names}")
    return found[0][1] if found else None


# ---- tools -------------------------------------------------------------------------------------


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each OpenAI tool (type function)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be an object with type function")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}].function must be an object with a name")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions[function["name"]] = dict(parameters)
    return functions


def named_tool_choice(tool_choice: Any) -> str | None:
    """The function name of a named tool_choice; None for the string forms."""
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return function["name"]
    raise ValueError(
        "tool_choice must be none, auto, required or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}'
    )


def tool_choice_schema(tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema enforcing tool_choice (None for none / auto / absent)."""
    name = named_tool_choice(tool_choice)
    if tool_choice in (None, "none", "auto"):
        return None
    if tools is None:
        raise ValueError("tool_choice: required or a named function needs tools")
    functions = _functions(tools)
    if name is not None:
        if name not in functions:
            raise ValueError(f"tool_choice: function {name!r} is not among the tools")
        return functions[name]
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": fname}, "parameters": params},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for fname, params in functions.items()
            ]
        },
    }


def tool_choice_structured_outputs(tools: Any, tool_choice: Any) -> StructuredOutputsParams | None:
    """StructuredOutputsParams for tool_choice required / named (None otherwise)."""
    schema = tool_choice_schema(tools, tool_choice)
    if schema is None:
        return None
    try:
        return StructuredOutputsParams(json=schema)
    except ValueError as exc:
        raise _renamed(exc, "tools") from None


def forced_tool_call_parser(
    tool_choice: Any, make_id: Callable[[int], str] = random_tool_call_id
) -> ForcedToolCallParser | None:
    """The parser (extract / streaming) of output generated under tool_choice required or a
    named function; None for none / auto / absent (use the --tool-call-parser for auto)."""
    if tool_choice in (None, "none", "auto"):
        return None
    return ForcedToolCallParser(named_tool_choice(tool_choice), make_id)


def parse_forced_tool_calls(
    text: str,
    tool_choice: Any,
    make_id: Callable[[int], str] = random_tool_call_id,
) -> list[ToolCall]:
    """The tool calls of complete output generated under tool_choice_structured_outputs.
    ValueError if the text is not what the grammar allows (e.g. cut short by max_tokens)."""
    parser = forced_tool_call_parser(tool_choice, make_id)
    if parser is None:
        raise ValueError(f"tool_choice {tool_choice!r} does not force tool calls")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool calls: the output is not complete JSON: {exc}") from None
    calls = parser.extract(text).tool_calls
    if parser.function_name is None and (not isinstance(value, list) or len(value) != len(calls)):
        raise ValueError("tool calls: expected a JSON array of {name, parameters} objects")
    return calls


def structured_outputs_for_chat(body: Mapping[str, Any]) -> StructuredOutputsParams | None:
    """What a chat request's output must match: tool_choice required / named wins (with a
    response format too it is an error), else the request's structured-output fields."""
    forced = tool_choice_structured_outputs(body.get("tools"), body.get("tool_choice"))
    requested = from_request(body)
    if forced is not None and requested is not None:
        raise ValueError(
            "tool_choice: required or a named function cannot be combined with "
            "response_format or structured_outputs"
        )
    return forced or requested
