"""StructuredOutputsParams: what a request's output must match (vLLM's names).

Exactly one form per request:

- ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON value valid for it.
- ``regex``: the whole output matches the regular expression (Rust ``regex`` syntax, which is
  Python's ``re`` without look-around and back-references; ``\\d`` is ``[0-9]``).
- ``choice``: the output is exactly one of the given strings.
- ``grammar``: a context-free grammar, in GBNF / EBNF (``root ::= ...``, llama.cpp's and vLLM's
  form) or Lark (``start: ...``).
- ``json_object``: the output is some JSON object (OpenAI's ``response_format: json_object``).

``disable_any_whitespace`` (json forms only) forbids whitespace between JSON tokens other than
the single spaces of the compact ``{"a": 1, "b": 2}`` layout; by default any whitespace is allowed.

Validation happens at construction, without a tokenizer, and raises ``ValueError`` naming the
field: ``structured_outputs.json: invalid JSON schema: ...`` for a schema that breaks the JSON
Schema meta-schema, ``structured_outputs.regex: invalid regex: ...`` for a pattern that does not
parse, and ``... the grammar engine (llguidance) cannot compile it: ...`` (with the engine's reason,
e.g. ``Unimplemented keys: ["dependentRequired"]`` or ``look-around ... is not supported``) for
input that is valid but uses a feature the grammar engine lacks.

Invariants: instances are frozen and hashable (a schema is kept as compact JSON text with its
key order, which decides the order of generated properties; choices as a tuple), so
``SamplingParams`` stays hashable; ``grammar_source()`` is a pure function of the instance, the
key of the compiled-grammar cache.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

_FORMS = ("json", "regex", "choice", "grammar", "json_object")
ENGINE_NAME = "llguidance"


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    json: str | None = None  # input: a dict or JSON text; kept as canonical JSON text
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # input: a non-empty list of strings
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _FORMS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            detail = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(
                "structured_outputs: give exactly one of json, regex, choice, grammar, "
                f"json_object ({detail})"
            )
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a boolean")
        if self.json is not None:
            object.__setattr__(self, "json", _canonical_schema(self.json))
        if self.regex is not None:
            if not isinstance(self.regex, str):
                raise ValueError(f"structured_outputs.regex must be a string, got {self.regex!r}")
            check_regex_syntax(self.regex)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError("structured_outputs.grammar must be a non-empty string")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")
        if self.choice is not None:
            object.__setattr__(self, "choice", _normalize_choice(self.choice))
        _check_compiles(self.form, self.grammar_source())

    @property
    def form(self) -> str:
        """Which of json / regex / choice / grammar / json_object this is."""
        return next(name for name in _FORMS if getattr(self, name) not in (None, False))

    @property
    def json_schema(self) -> dict[str, Any] | bool | None:
        """The schema as a Python object (None unless the form is json)."""
        return json.loads(self.json) if self.json is not None else None

    def grammar_source(self) -> str:
        """The llguidance grammar (its serialised form) that the output must match."""
        return _grammar_source(self.form, self._spec(), self.disable_any_whitespace)

    def _spec(self) -> str:
        if self.form == "choice":
            return json.dumps(list(self.choice or ()))
        if self.form == "json_object":
            return '{"type": "object"}'
        return str(getattr(self, self.form))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], field_name: str = "structured_outputs") -> Any:
        """From vLLM's JSON request shape; unknown keys are a ValueError naming them."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{field_name} must be an object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{field_name}: unsupported keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in value.items() if v is not None})


def _canonical_schema(schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json: not valid JSON text: {exc}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise ValueError(
            f"structured_outputs.json: a JSON schema is an object (or a boolean), got {schema!r}"
        )
    try:
        # Key order is kept: the grammar generates properties in the schema's order.
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured_outputs.json: not JSON-serialisable: {exc}") from None
    _check_meta_schema(text)
    return text


@functools.lru_cache(maxsize=256)
def _check_meta_schema(text: str) -> None:
    """The schema must obey the JSON Schema meta-schema of its $schema (2020-12 by default)."""
    try:
        import jsonschema
    except ImportError:  # llguidance still rejects what it cannot read
        return
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(
            f"structured_outputs.json: invalid JSON schema at {where}: {exc.message}"
        ) from None


def _normalize_choice(choice: Any) -> tuple[str, ...]:
    if isinstance(choice, str) or not isinstance(choice, Sequence) or not choice:
        raise ValueError(
            f"structured_outputs.choice must be a non-empty list of strings, got {choice!r}"
        )
    for item in choice:
        if not isinstance(item, str) or not item:
            raise ValueError(f"structured_outputs.choice must hold non-empty strings, got {item!r}")
    return tuple(choice)


@functools.lru_cache(maxsize=256)
def _grammar_source(form: str, spec: str, disable_any_whitespace: bool) -> str:
    from llguidance import LLMatcher, grammar_from, regex_to_lark

    if form in ("json", "json_object"):
        options = {"whitespace_flexible": not disable_any_whitespace}
        return LLMatcher.grammar_from_json_schema(spec, defaults=options)
    if form == "regex":
        # \d means the ASCII digits [0-9] (as in xgrammar and JSON Schema), not every Unicode
        # digit as Rust's regex would read it.
        return LLMatcher.grammar_from_lark(f"start: /{regex_to_lark(spec, 'd')}/")
    if form == "choice":
        return grammar_from("choice", spec)
    try:
        return grammar_from("grammar", spec)  # GBNF / EBNF is turned into Lark; Lark passes
    except ValueError as exc:
        raise ValueError(f"structured_outputs.grammar: invalid grammar: {exc}") from None


@functools.lru_cache(maxsize=256)
def _check_compiles(form: str, source: str) -> None:
    """Compiles the grammar without a tokenizer; its error names the missing feature."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(source)
    if not error:
        return
    raise ValueError(_describe_error(form, error.strip()))


def _describe_error(form: str, error: str) -> str:
    field_name = "json" if form == "json_object" else form
    prefix = f"structured_outputs.{field_name}"
    reason = " ".join(error.split())  # one line: it becomes an HTTP error message
    return f"{prefix}: the grammar engine ({ENGINE_NAME}) cannot compile it: {reason}"


def check_regex_syntax(pattern: str) -> None:
    """A pattern Python cannot parse at all is invalid (not merely unsupported)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"structured_outputs.regex: invalid regex: {exc}") from None
