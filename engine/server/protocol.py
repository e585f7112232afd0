"""The OpenAI wire format: request parsing and validation, response and chunk builders, errors.

Owns the boundary between JSON bodies and engine types. Parsing is strict about types (a wrong
type is a 400 naming the field, never a silent coercion) and lenient about unknown fields (they
are ignored, as vLLM does, so newer clients keep working). Sampling fields map by name onto
`SamplingParams`; range checks live there, and its `ValueError` (which names the field) becomes
a 400 here.

Structured outputs (`response_format`, `structured_outputs`, `guided_*`) and `tool_choice`
required / named become `SamplingParams.structured_outputs` through `engine.structured.openai`
(`read_structured_outputs`, which the server runs off its event loop); `tools` and `tool_choice`
are checked here with vLLM's defaults; `vllm_xargs` becomes `SamplingParams.extra_args`.

Fields a request does not set (absent or null) take the server's `GenerationDefaults` (the
model's generation config, engine/generation_defaults.py): temperature, top_p, top_k, min_p,
repetition_penalty, and for chat max_tokens (a completion without max_tokens keeps OpenAI's 16,
as vLLM's does); a field the request sets keeps its value. max_tokens is also lowered to the
defaults' bound, when there is one.

Shapes follow OpenAI's spec (/v1/completions, /v1/chat/completions, their stream chunks) and vLLM's
extensions (`stop_reason`, the extra sampling fields, `max_tokens: 0` with `echo`). Errors are
`{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status, as vLLM sends them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.generation_defaults import NO_DEFAULTS, GenerationDefaults
from engine.request import Logprob
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.server.body_parser import BodyError, parse_json_object
from engine.server.body_parser import json_type as _json_type
from engine.structured.openai import (
    GUIDED_FIELDS,
    _functions,
    from_request,
    named_tool_choice,
    structured_outputs_for_chat,
)

# OpenAI's logprob floor: a -inf logprob would not survive JSON.
_MIN_LOGPROB = -9999.0
# OpenAI caps chat top_logprobs at 20.
MAX_TOP_LOGPROBS = 20
# OpenAI's spec: a string naming the backend configuration (a string, never null).
SYSTEM_FINGERPRINT = "fp_engine"

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with this HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "APIError")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (also for nesting too deep to parse and for
    strings holding a lone UTF-16 surrogate, which no tokenizer can encode)."""
    try:
        return parse_json_object(raw)
    except BodyError as e:
        raise APIError(e.message, param=e.param) from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """An integer, or a whole-number float (1.0, as pydantic's lax mode accepts); else None."""
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _wrong_type(name: str, expected: str, value: Any) -> APIError:
    got = _json_type(value)
    if isinstance(value, float) and expected == "an integer" and math.isfinite(value):
        got = f"{value!r}"  # 1.5: a number, but not a whole one
    return APIError(f"{name} must be {expected}, got {got}", param=name)


def _check_kind(name: str, value: Any, kind: str) -> Any:
    """Checks a JSON value against a kind; returns it (lists as lists)."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise _wrong_type(name, "a boolean", value)
    elif kind == "int":
        number = _as_int(value)
        if number is None:
            raise _wrong_type(name, "an integer", value)
        value = number
    elif kind == "number":
        if not _is_number(value):
            raise _wrong_type(name, "a finite number", value)
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise _wrong_type(name, "a string", value)
    elif kind == "str_or_str_list":
        if isinstance(value, str):
            value = [value]
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _wrong_type(name, "a string or an array of strings", value)
    elif kind == "str_list":
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _wrong_type(name, "an array of strings", value)
    elif kind == "int_list":
        numbers = [_as_int(v) for v in value] if isinstance(value, list) else None
        if numbers is None or any(v is None for v in numbers):
            raise _wrong_type(name, "an array of integers", value)
        value = numbers
    elif kind == "object":
        if not isinstance(value, dict):
            raise _wrong_type(name, "an object", value)
    elif kind == "list":
        if not isinstance(value, list):
            raise _wrong_type(name, "an array", value)
    else:  # pragma: no cover - a programming error
        raise AssertionError(kind)
    return value


def get_field(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked against kind; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    return _check_kind(name, value, kind)


# Sampling fields shared by both endpoints: JSON kind, and the value that means "not used" (a
# field SamplingParams lacks is accepted only with that value, so an older engine never silently
# ignores a setting that would change the output).
SAMPLING_FIELDS: dict[str, tuple[str, Any]] = {
    "n": ("int", 1),
    "temperature": ("number", None),
    "top_p": ("number", 1.0),
    "top_k": ("int", -1),
    "min_p": ("number", 0.0),
    "seed": ("int", None),
    "presence_penalty": ("number", 0.0),
    "frequency_penalty": ("number", 0.0),
    "repetition_penalty": ("number", 1.0),
    "logit_bias": ("object", {}),
    "min_tokens": ("int", 0),
    "stop": ("str_or_str_list", []),
    "stop_token_ids": ("int_list", []),
    "include_stop_str_in_output": ("bool", False),
    "ignore_eos": ("bool", False),
    "skip_special_tokens": ("bool", True),
    "allowed_token_ids": ("int_list", None),
    "bad_words": ("str_list", []),
    "prompt_logprobs": ("int", None),
    "spaces_between_special_tokens": ("bool", True),
}
_SAMPLING_PARAMS_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds checked while parsing, before any tokenizing or engine work (the server's flags).

    `max_prompt_chars`: characters in one text prompt, or in all of a chat's messages; beyond
    it the prompt could not fit `max_model_len` tokens anyway (the server sets it to a multiple
    of `max_model_len`). `max_n`: samples per prompt. `max_prompts`: prompts per completions
    request. `max_stop_strings` / `max_stop_chars`: count and length of `stop` (and
    `bad_words`) strings, whose matching runs on the engine thread.
    """

    max_n: int = 256
    max_prompts: int = 256
    max_prompt_chars: int = 2**20
    max_stop_strings: int = 64
    max_stop_chars: int = 1024
    trust_request_chat_template: bool = False


def _check_strings(name: str, values: list[str], limits: RequestLimits) -> None:
    if len(values) > limits.max_stop_strings:
        raise APIError(
            f"{name} has {len(values)} strings; this server accepts at most "
            f"{limits.max_stop_strings}",
            param=name,
        )
    longest = max((len(v) for v in values), default=0)
    if longest > limits.max_stop_chars:
        raise APIError(
            f"{name} has a string of {longest} characters; this server accepts at most "
            f"{limits.max_stop_chars}",
            param=name,
        )


def _read_sampling_fields(body: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (kind, _) in SAMPLING_FIELDS.items():
        value = get_field(body, name, kind)
        if value is not None:
            values[name] = value
    n = values.get("n", 1)
    if not 1 <= n <= limits.max_n:
        raise APIError(f"n must be between 1 and {limits.max_n}, got {n}", param="n")
    for name in ("stop", "bad_words"):
        if name in values:
            _check_strings(name, values[name], limits)
    if "logit_bias" in values:
        values["logit_bias"] = _parse_logit_bias(values["logit_bias"])
    if values.get("top_k") == 0:  # vLLM's API treats 0 as "disabled", like -1
        values["top_k"] = -1
    if body.get("use_beam_search"):
        raise APIError("use_beam_search is not supported by this server", param="use_beam_search")
    return values


def _parse_logit_bias(raw: dict[str, Any]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                param="logit_bias",
            ) from None
        if not _is_number(value) or not -100 <= value <= 100:
            raise APIError(
                f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key}",
                param="logit_bias",
            )
        bias[token_id] = float(value)
    return bias


def make_sampling_params(values: dict[str, Any], delta: bool = False) -> SamplingParams:
    """SamplingParams from validated fields; a 400 naming the field on a bad value. `delta`:
    outputs carry only what is new (RequestOutputKind.DELTA), as the server streams them."""
    kwargs: dict[str, Any] = {}
    if delta:
        kwargs["output_kind"] = RequestOutputKind.DELTA
    for name, value in values.items():
        if name in _SAMPLING_PARAMS_FIELDS:
            kwargs[name] = value
        elif value != SAMPLING_FIELDS.get(name, (None, None))[1]:
            raise APIError(f"{name} is not supported by this engine version", param=name)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        param = field_named_in(message, kwargs)
        raise APIError(message, param=_REQUEST_FIELD.get(param, param)) from e


# SamplingParams fields read from a request field of another name.
_REQUEST_FIELD = {"extra_args": "vllm_xargs"}


# Request fields that structured-output errors may name (their messages start with the field).
STRUCTURED_FIELDS = frozenset(
    {
        "response_format",
        "structured_outputs",
        "guided_whitespace_pattern",
        "tools",
        "tool_choice",
        *GUIDED_FIELDS,
    }
)


def structured_error(error: ValueError) -> APIError:
    """A 400 for an `engine.structured.openai` ValueError; `param` is the field its message
    starts with (`response_format.json_schema.schema`, `tools[0].function`, `guided_regex`)."""
    message = str(error)
    head = message.split(" ", 1)[0].split(":", 1)[0].rstrip(",")
    top = re.split(r"[.\[]", head, maxsplit=1)[0]
    return APIError(message, param=head if top in STRUCTURED_FIELDS else None)


def asks_for_structured_outputs(body: dict[str, Any], chat: bool) -> bool:
    """Whether the request has a field `read_structured_outputs` reads (a cheap check)."""
    names = STRUCTURED_FIELDS if chat else STRUCTURED_FIELDS - {"tools", "tool_choice"}
    return any(body.get(name) is not None for name in names)


def read_structured_outputs(body: dict[str, Any], chat: bool) -> Any:
    """The request's StructuredOutputsParams (None when it asks for none); a 400 naming the
    field for a bad schema / regex / grammar, or one the grammar engine cannot compile.
    Checking and compiling a schema costs time in proportion to its size (0.3 s for 33 kB), so
    the server calls this off its event loop (`parse_*_request` do not)."""
    try:
        return structured_outputs_for_chat(body) if chat else from_request(body)
    except ValueError as e:
        raise structured_error(e) from None


def _read_xargs(body: dict[str, Any], sampling: dict[str, Any]) -> None:
    """vLLM's `vllm_xargs` (per-request arguments of custom logits processors) -> extra_args."""
    xargs = get_field(body, "vllm_xargs", "object")
    if xargs:
        sampling["extra_args"] = xargs


def field_named_in(message: str, names: Any) -> str | None:
    """The field a validation message is about: SamplingParams messages start with its name."""
    head = message.split(" ", 1)[0].rstrip(":,")
    return head if head in names else None


@dataclass(frozen=True, slots=True)
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False


def _read_stream(body: dict[str, Any]) -> tuple[bool, StreamOptions]:
    stream = get_field(body, "stream", "bool", False)
    raw = get_field(body, "stream_options", "object")
    if raw is None:
        return stream, StreamOptions()
    if not stream:
        raise APIError("stream_options can only be set when stream is true", param="stream_options")
    return stream, StreamOptions(
        include_usage=get_field(raw, "include_usage", "bool", False),
        continuous_usage_stats=get_field(raw, "continuous_usage_stats", "bool", False),
    )


def _read_common(body: dict[str, Any]) -> dict[str, Any]:
    model = get_field(body, "model", "str")
    if body.get("best_of") is not None:
        best_of = _check_kind("best_of", body["best_of"], "int")
        if best_of < 1:
            raise APIError(f"best_of must be at least 1, got {best_of}", param="best_of")
        if best_of != get_field(body, "n", "int", 1):
            raise APIError("best_of different from n is not supported", param="best_of")
    return {
        "model": model,
        "return_tokens_as_token_ids": get_field(body, "return_tokens_as_token_ids", "bool", False),
    }


# ---- requests --------------------------------------------------------------------------------

Prompt = str | list[int]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str | None
    prompts: list[Prompt]
    sampling: dict[str, Any]  # SamplingParams fields, max_tokens and logprobs excluded
    max_tokens: int  # 0 only together with echo: return the prompt, generate nothing
    echo: bool
    logprobs: int | None
    stream: bool
    stream_options: StreamOptions
    return_tokens_as_token_ids: bool


def parse_completion_request(
    body: dict[str, Any],
    max_logprobs: int,
    limits: RequestLimits | None = None,
    defaults: GenerationDefaults = NO_DEFAULTS,
) -> CompletionRequest:
    """A /v1/completions body; fields it does not set take `defaults` (module docstring)."""
    limits = limits or RequestLimits()
    common = _read_common(body)
    sampling = _read_sampling_fields(body, limits)  # n is bounded before the prompts are read
    defaults.fill(sampling)
    prompts = _read_prompts(body, limits)
    if body.get("suffix") is not None:
        raise APIError("suffix is not supported", param="suffix")
    echo = get_field(body, "echo", "bool", False)
    # OpenAI's default, 16, as vLLM's completions keep it: the generation config's
    # max_new_tokens is the default of chat requests only (its bound applies to both).
    max_tokens = get_field(body, "max_tokens", "int", 16)
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise APIError(
            f"max_tokens must be at least 1 (0 is allowed only with echo), got {max_tokens}",
            param="max_tokens",
        )
    max_tokens = defaults.bound_max_tokens(max_tokens)
    logprobs = get_field(body, "logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        raise APIError(
            f"logprobs must be between 0 and {max_logprobs} (the server's max_logprobs), "
            f"got {logprobs}",
            param="logprobs",
        )
    if echo and logprobs is not None and "prompt_logprobs" not in sampling:
        sampling["prompt_logprobs"] = logprobs
    _read_xargs(body, sampling)
    stream, stream_options = _read_stream(body)
    return CompletionRequest(
        model=common["model"],
        prompts=prompts,
        sampling=sampling,
        max_tokens=max_tokens,
        echo=echo,
        logprobs=logprobs,
        stream=stream,
        stream_options=stream_options,
        return_tokens_as_token_ids=common["return_tokens_as_token_ids"],
    )


def check_prompt_chars(num_chars: int, limits: RequestLimits, param: str = "prompt") -> None:
    if num_chars > limits.max_prompt_chars:
        raise APIError(
            f"{param} has {num_chars} characters; this server accepts at most "
            f"{limits.max_prompt_chars} per prompt (more cannot fit the model's context)",
            param=param,
        )


def _read_prompts(body: dict[str, Any], limits: RequestLimits) -> list[Prompt]:
    """`prompt`: a string, strings, token ids, or lists of token ids (OpenAI's four forms)."""
    prompt = body.get("prompt")
    expected = "a string, an array of strings, an array of token ids or an array of arrays of them"
    if prompt is None:
        raise APIError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), limits)
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(f"prompt must be a non-empty {expected}", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise APIError(
                f"prompt has {len(prompt)} prompts; this server accepts at most "
                f"{limits.max_prompts} per request",
                param="prompt",
            )
        for p in prompt:
            check_prompt_chars(len(p), limits)
        return list(prompt)
    if all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        if len(prompt) > limits.max_prompts:
            raise APIError(
                f"prompt has {len(prompt)} prompts; this server accepts at most "
                f"{limits.max_prompts} per request",
                param="prompt",
            )
        return [list(p) for p in prompt]
    raise APIError(f"prompt must be {expected} (none of them empty)", param="prompt")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None  # None: up to max_model_len
    logprobs: bool
    top_logprobs: int
    stream: bool
    stream_options: StreamOptions
    return_tokens_as_token_ids: bool
    add_generation_prompt: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}; absent:
    # "auto" with tools, else "none" (OpenAI's and vLLM's defaults).
    tool_choice: str | dict[str, Any] = "none"
    # max_tokens is the generation config's default or bound, not the body's value: lowered to
    # the room the prompt leaves rather than refused (check_length's `fit`).
    max_tokens_from_config: bool = False

    @property
    def named_function(self) -> str | None:
        """The function a named tool_choice forces (None for the string forms)."""
        return named_tool_choice(self.tool_choice)


def parse_chat_request(
    body: dict[str, Any],
    max_logprobs: int,
    limits: RequestLimits | None = None,
    defaults: GenerationDefaults = NO_DEFAULTS,
) -> ChatRequest:
    """A /v1/chat/completions body; fields it does not set take `defaults` (module docstring)."""
    limits = limits or RequestLimits()
    common = _read_common(body)
    sampling = _read_sampling_fields(body, limits)
    defaults.fill(sampling)
    messages = _read_messages(body, limits)
    max_tokens = get_field(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = get_field(body, "max_tokens", "int")
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise APIError(f"{param} must be at least 1, got {max_tokens}", param=param)
    from_config = max_tokens is None and (
        defaults.max_tokens is not None or defaults.max_tokens_cap is not None
    )
    if max_tokens is None:
        max_tokens = defaults.max_tokens
    max_tokens = defaults.bound_max_tokens(max_tokens)
    logprobs = get_field(body, "logprobs", "bool", False)
    top_logprobs = get_field(body, "top_logprobs", "int")
    if top_logprobs is not None:
        if not logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        limit = min(MAX_TOP_LOGPROBS, max_logprobs)
        if not 0 <= top_logprobs <= limit:
            raise APIError(
                f"top_logprobs must be between 0 and {limit}, got {top_logprobs}",
                param="top_logprobs",
            )
    tools, tool_choice = _read_tools(body)
    _read_xargs(body, sampling)
    kwargs = dict(get_field(body, "chat_template_kwargs", "object", {}))
    chat_template = get_field(body, "chat_template", "str")
    if (chat_template is not None or "chat_template" in kwargs) and (
        not limits.trust_request_chat_template
    ):
        raise APIError(
            "A chat template was passed with the request, but this server does not run request "
            "templates (start it with --trust-request-chat-template to allow them)",
            param="chat_template",
        )
    if "chat_template" in kwargs:  # vLLM accepts it there too
        template = kwargs.pop("chat_template")
        if not isinstance(template, str):
            raise _wrong_type("chat_template", "a string", template)
        chat_template = chat_template or template
    if tools is not None and tool_choice != "none":
        kwargs.setdefault("tools", tools)
    stream, stream_options = _read_stream(body)
    return ChatRequest(
        model=common["model"],
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        stream=stream,
        stream_options=stream_options,
        return_tokens_as_token_ids=common["return_tokens_as_token_ids"],
        add_generation_prompt=get_field(body, "add_generation_prompt", "bool", True),
        chat_template=chat_template,
        chat_template_kwargs=kwargs,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens_from_config=from_config,
    )


def _read_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """(tools, tool_choice) with vLLM's defaults and checks: tool_choice defaults to "auto" when
    tools are given, else "none"; any other tool_choice needs tools."""
    tools = get_field(body, "tools", "list")
    if tools is not None and not tools:
        tools = None  # an empty list: no tools
    if tools is not None:
        try:
            _functions(tools)  # each an object of type function with a name and a schema
        except ValueError as e:
            raise structured_error(e) from None
    tool_choice = body.get("tool_choice")
    try:
        named_tool_choice(tool_choice)  # checks its shape
    except ValueError as e:
        raise APIError(str(e), param="tool_choice") from None
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice != "none" and tools is None:
        raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    return tools, tool_choice


def _read_messages(body: dict[str, Any], limits: RequestLimits) -> list[dict[str, Any]]:
    """Messages as given (every key kept: tool_calls, tool_call_id, name... reach the template);
    `content` is a string, an array of text parts or null. Their text is bounded in total."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty array of message objects", param="messages")
    checked = []
    num_chars = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{where} must be an object", param="messages")
        if not isinstance(message.get("role"), str):
            raise APIError(f"{where}.role must be a string", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(
                        f"{where}.content: only text parts are supported", param="messages"
                    )
                if not isinstance(part.get("text"), str):
                    raise APIError(f"{where}.content: a text part needs text", param="messages")
                num_chars += len(part["text"])
        elif isinstance(content, str):
            num_chars += len(content)
        elif content is not None:
            raise APIError(
                f"{where}.content must be a string, an array of parts or null", param="messages"
            )
        checked.append(dict(message))
    check_prompt_chars(num_chars, limits, "messages")
    return checked


def check_length(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    param: str = "max_tokens",
    fit: bool = False,
) -> int:
    """The max_tokens to generate; a 400 when the prompt (plus max_tokens) does not fit. `fit`:
    max_tokens is a server default (the generation config's), lowered to the room the prompt
    leaves instead (a prompt that leaves no room is still a 400)."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, which leaves no room for generated tokens. "
            "Please reduce the length of the prompt.",
            param="prompt" if param == "max_tokens" else "messages",
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if fit:
        return min(max_tokens, max_model_len - num_prompt_tokens)
    if num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the length of the prompt "
            f"or {param}.",
            param=param,
        )
    return max_tokens


# ---- responses -------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """Token id -> its text for logprob entries (decoded alone, specials kept), cached."""

    def __init__(self, tokenizer: Any, as_token_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._as_ids = as_token_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, logprob: Logprob | None = None) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB) if logprob == logprob else _MIN_LOGPROB


def _top_entries(entries: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The `num` most likely entries of a position's dict, by rank."""
    ranked = sorted(
        entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else -kv[1].logprob
    )
    return ranked[:num]


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Logprob] | None],
    num_top: int,
    token_text: TokenText,
    initial_text_offset: int = 0,
) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    A position without an entry (the prompt's first token, echoed) gets null logprobs.
    top_logprobs holds the `num_top` most likely tokens plus the chosen one.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = initial_text_offset
    for token_id, entries in zip(token_ids, positions, strict=True):
        chosen = entries.get(token_id) if entries else None
        text = token_text(token_id, chosen)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entries is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(chosen.logprob) if chosen is not None else None)
        top = {token_text(t, lp): _clamp(lp.logprob) for t, lp in _top_entries(entries, num_top)}
        if chosen is not None:
            top.setdefault(text, _clamp(chosen.logprob))
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs_content(
    token_ids: Sequence[int],
    positions: Sequence[dict[int, Logprob] | None],
    num_top: int,
    token_text: TokenText,
) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content`: one entry per generated token."""
    content = []
    for token_id, entries in zip(token_ids, positions, strict=True):
        entries = entries or {}
        chosen = entries.get(token_id)
        text = token_text(token_id, chosen)
        content.append(
            {
                "token": text,
                "logprob": _clamp(chosen.logprob) if chosen is not None else _MIN_LOGPROB,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t_text := token_text(t, lp)),
                        "logprob": _clamp(lp.logprob),
                        "bytes": list(t_text.encode("utf-8")),
                    }
                    for t, lp in _top_entries(entries, num_top)
                ],
            }
        )
    return content


def completion_choice(
    index: int,
    text: str,
    logprobs: dict[str, Any] | None,
    finish_reason: str | None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def completion_response(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None,
    chunk: bool = False,
) -> dict[str, Any]:
    """A completions response; a stream chunk has the same shape (OpenAI's spec)."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_choice(
    index: int,
    content: str,
    logprobs: list[dict[str, Any]] | None,
    finish_reason: str | None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": []},
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def chat_response(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
    include_usage_field: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage_ is not None or include_usage_field:
        body["usage"] = usage_
    return body


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def sse(data: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event line pair: `data: {json}\\n\\n`."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def model_card(name: str, max_model_len: int, created: int) -> dict[str, Any]:
    """A model's entry in /v1/models; `root` is its served name (never a filesystem path)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "engine",
        "root": name,
        "parent": None,
        "max_model_len": max_model_len,
    }


def models_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
