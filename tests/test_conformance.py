"""Conformance with OpenAI's OpenAPI description (issue 11): schemathesis drives the live server.

`tests/openapi/openai_subset.json` is OpenAI's spec cut down to the operations this server
implements (`tests/openapi/extract.py` makes it from `../shared/openai/openapi.yaml`):
`listModels`, `retrieveModel`, `createCompletion`, `createChatCompletion`. For each operation,
schemathesis generates requests in two modes:

* positive (schema-valid bodies, with `model` set to the served name and `max_tokens` capped at
  16 so generation stays short): no response is a 5xx, and every response body conforms to the
  spec's schema for its status, with the content type the spec names;
* negative (schema-violating requests, sent as generated): none is a 5xx and none is accepted
  with a 2xx, except for the deviations in `ALLOWED`, each justified there.

The server runs with an API key, so the spec's required `Authorization` header is enforced.
Under `CI=true` the examples are derandomized (as tests/conftest.py does for hypothesis), so a
red run is reproducible; `CONFORMANCE_EXAMPLES` sets the examples per operation and mode.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from engine import EngineArgs, LLMEngine  # noqa: E402
from engine.server import OpenAIServer, ServerConfig, ServerThread  # noqa: E402

SPEC = Path(__file__).parent / "openapi" / "openai_subset.json"
MODEL = "demo"
API_KEY = "conformance-key"
OPERATIONS = ["listModels", "retrieveModel", "createCompletion", "createChatCompletion"]
MAX_EXAMPLES = int(os.environ.get("CONFORMANCE_EXAMPLES", "25"))

# Deviations from the spec that the server makes on purpose, each with its reason:
# (operation, failure title, a text its message contains). Anything else fails the test.
ALLOWED: dict[tuple[str, str, str], str] = {
    # The spec documents only application/json for createCompletion, but `stream: true` (which
    # it defines) streams Server-Sent Events there, as OpenAI's API and vLLM do; the chunks are
    # checked against CreateCompletionResponse below (the spec's own description of them).
    (
        "createCompletion",
        "Undocumented Content-Type",
        "text/event-stream",
    ): "completions stream as SSE, as OpenAI's API does",
    # schemathesis validates each SSE event's envelope ({"data": "<json text>", "event":
    # "message"}) against CreateChatCompletionStreamResponse, which describes the JSON inside
    # `data` (OpenAPI 3.1 has no way to say so); every such report is about the envelope. The
    # chunks themselves are validated by _check_stream.
    (
        "createChatCompletion",
        "SSE event violates schema",
        '"event": "message"',
    ): "the tool checks the SSE envelope, not the chunk; chunks are checked below",
}
# Streamed chunks: the schema each `data:` event must match, and the deviations allowed there:
# (operation, the field (its JSON path without the choice index), the value) -> why.
CHUNK_ALLOWED: dict[tuple[str, str, Any], str] = {
    # The spec reuses the final CreateCompletionResponse for completion chunks, where
    # finish_reason is not nullable; a chunk before a choice's last has no finish reason yet
    # and says `null`, as OpenAI's API streams it (the chat chunk schema allows null).
    ("createCompletion", "$.choices[].finish_reason", None): "null until the choice ends",
}
CHUNK_SCHEMAS = {
    "createCompletion": "CreateCompletionResponse",
    "createChatCompletion": "CreateChatCompletionStreamResponse",
}


def _allowed(operation_id: str, failure: Failure, body: Any = None) -> bool:
    if _model_omitted(operation_id, failure, body):
        return True
    return any(
        operation_id == op and failure.title == title and text in failure.message
        for op, title, text in ALLOWED
    )


def _model_omitted(operation_id: str, failure: Failure, body: Any) -> bool:
    """A completion body without `model` (the spec requires it) but with a prompt is served by
    the server's model, as vLLM does (`model` is optional there): the one `required` violation
    accepted on purpose. A body without a prompt still gets a 400 naming `prompt`."""
    return (
        operation_id == "createCompletion"
        and failure.title == "Schema-violating request accepted"
        and "violates `required`" in failure.message
        and isinstance(body, dict)
        and "model" not in body
        and "prompt" in body
    )


def _nullable_as_null_type(node: Any) -> Any:
    """The spec is OpenAPI 3.1 but marks nullable fields the 3.0 way (`nullable: true`), which
    JSON Schema ignores: rewrite each as `anyOf: [schema, null]` for the chunk validator."""
    if isinstance(node, list):
        return [_nullable_as_null_type(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _nullable_as_null_type(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def _check_stream(spec: dict[str, Any], operation_id: str, response: Any) -> list[str]:
    """Each SSE `data:` chunk validated against the spec's chunk schema. (That a stream ends
    with `data: [DONE]` is tested in test_server.py: schemathesis may keep only the start of a
    long body, so the last event here may be cut.)"""
    import jsonschema

    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return []
    schema = {"$ref": f"#/components/schemas/{CHUNK_SCHEMAS[operation_id]}"}
    validator = jsonschema.Draft202012Validator({**schema, **_nullable_as_null_type(spec)})
    problems = []
    for event in response.content.decode("utf-8", "replace").split("\n\n")[:-1]:
        if event == "data: [DONE]":
            continue
        try:
            chunk = json.loads(event.removeprefix("data: "))
        except ValueError:
            continue  # the cut end of a long body
        for error in list(validator.iter_errors(chunk))[:3]:
            field = re.sub(r"\[\d+\]", "[]", error.json_path)
            if (operation_id, field, error.instance) in CHUNK_ALLOWED:
                continue
            where = "/".join(str(p) for p in error.relative_schema_path)
            problems.append(f"chunk {error.json_path}: {error.validator} ({where})")
    return problems


@pytest.fixture(scope="module")
def server():
    from engine.demo import demo_model_path

    engine = LLMEngine(
        EngineArgs(
            model=str(demo_model_path()), max_model_len=512, kv_cache_memory_bytes=32 * 2**20
        )
    )
    config = ServerConfig(
        served_model_names=(MODEL,), api_key=API_KEY, log_stats_interval=None, access_log=False
    )
    with ServerThread(OpenAIServer(engine, config)) as thread:
        yield thread


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return json.loads(SPEC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schema(spec):
    return schemathesis.openapi.from_dict(spec)


def _positive(case: Any) -> None:
    """A schema-valid case made servable: our model's name, a short generation."""
    if isinstance(case.body, dict):
        case.body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, int) and value > 16:
                case.body[key] = 16
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = 16
        if "stream" not in case.body and len(json.dumps(case.body, default=str)) % 2:
            case.body["stream"] = True  # half the cases stream (their chunks are checked)
    # Half the cases name the served model (a 200 whose body is checked), half a random one
    # (a 404 whose error body is checked).
    if "model" in (case.path_parameters or {}) and len(str(case.path_parameters["model"])) % 2:
        case.path_parameters["model"] = MODEL


def _failures(error: BaseException) -> list[Failure]:
    """The check failures inside what `call_and_validate` raised; anything else re-raises."""
    if isinstance(error, Failure):
        return [error]
    if isinstance(error, FailureGroup) or hasattr(error, "exceptions"):
        return [f for e in error.exceptions for f in _failures(e)]  # type: ignore[attr-defined]
    raise error


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_openapi_conformance(server, schema, spec, operation_id, mode):
    operation = schema.find_operation_by_id(operation_id)
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    unexpected: list[str] = []
    statuses: dict[int, int] = {}

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=bool(os.environ.get("CI")),
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=generation_mode))
    def run(case: Any) -> None:
        if mode == "positive":
            _positive(case)
        # The key is valid whenever the case sends one; a negative case without the header
        # (the spec requires it) must get a 401.
        headers = None
        if mode == "positive" or "Authorization" in (case.headers or {}):
            headers = {"Authorization": f"Bearer {API_KEY}"}
        response = case.call(base_url=server.url + "/v1", headers=headers, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except BaseException as error:  # sorted into allowed and unexpected below
            for failure in _failures(error):
                if not _allowed(operation_id, failure, case.body):
                    keys = list(case.body)[:20] if isinstance(case.body, dict) else "-"
                    unexpected.append(
                        f"{operation_id}: {failure.title}: {failure.message[:600]} "
                        f"(status {response.status_code}: {response.text[:200]!r}; "
                        f"body keys: {keys}; "
                        f"body: {str(case.body)[:300]})"
                    )
        if mode == "positive" and response.status_code == 200 and operation_id in CHUNK_SCHEMAS:
            unexpected.extend(
                f"{problem} (body: {str(case.body)[:400]}; {response.content_size} bytes)"
                for problem in _check_stream(spec, operation_id, response)
            )

    run()
    assert not unexpected, "\n".join(sorted(set(unexpected))[:10])
    assert not any(status >= 500 for status in statuses), statuses
