"""Tool calls in model output: what a parser returns, and the JSON scanning parsers share.

A parser reads the assistant's text two ways, with the same result:

- `ToolParser.extract(text) -> ExtractedToolCalls(content, tool_calls)` on the whole output;
- `ToolParser.streaming()` -> a `StreamingToolParser` whose `feed(delta_text)` returns OpenAI
  chat-completion chunk deltas (`{"content": ...}` or `{"tool_calls": [...]}`) and `finish()` the
  rest; `reassemble(deltas)` joins them back (content concatenated, each call's arguments
  concatenated in index order), and equals `extract` on the joined text for every output the
  format describes, however the text is cut into deltas (a property test checks it).

A tool call's `arguments` is the JSON text of the arguments exactly as the model wrote it (a
slice of the output, stripped of surrounding whitespace), so streamed fragments add up to it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WHITESPACE = " \t\n\r"


def random_tool_call_id(index: int = 0) -> str:
    """vLLM's tool-call id shape."""
    del index
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=random_tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` object of a chat completion."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ExtractedToolCalls:
    content: str | None  # the text that is not a tool call (None when there is none)
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


class StreamingToolParser:
    """Incremental parsing of one output; one instance per choice of a streamed response."""

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        """What was held back (e.g. text that might have begun a tag), at the end of output."""
        return []


class ToolParser:
    """A tool-call format. Subclasses register themselves with `engine.tool_parsers.register`."""

    name = ""

    def __init__(self, make_id: Callable[[int], str] = random_tool_call_id) -> None:
        self.make_id = make_id

    def extract(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError

    def streaming(self) -> StreamingToolParser:
        raise NotImplementedError


def reassemble(deltas: Iterable[dict[str, Any]]) -> ExtractedToolCalls:
    """Joins streamed deltas the way an OpenAI client does."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        if delta.get("content"):
            content.append(delta["content"])
        for part in delta.get("tool_calls") or ():
            call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = part.get("id") or call["id"]
            function = part.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    tool_calls = [ToolCall(c["name"], c["arguments"], c["id"]) for _, c in sorted(calls.items())]
    return ExtractedToolCalls("".join(content) or None, tool_calls)


# ---- JSON scanning ---------------------------------------------------------------------------


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def scan_string(text: str, i: int) -> int | None:
    """text[i] == '"': the index after the closing quote, or None if the text ends first."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def scan_value(text: str, i: int) -> int | None:
    """The index after the JSON value starting at text[i], or None if it is not complete yet
    (a number or literal is complete only once a character after it is seen)."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = scan_string(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in WHITESPACE + ",}]":
        j += 1
    return j if j < len(text) else None


@dataclass(slots=True)
class CallScan:
    """What a scan of a (possibly partial) call object `{"name": ..., ARGS: ...}` found."""

    name: str | None = None
    args_start: int | None = None  # where the arguments value starts
    args_end: int | None = None  # where it ends, once complete
    end: int | None = None  # the index after the object's closing brace, once complete
    valid: bool = True  # False: not an object of that shape


def scan_call(text: str, start: int, args_keys: tuple[str, ...]) -> CallScan:
    """Scans the call object at text[start:] (leading whitespace allowed)."""
    scan = CallScan()
    i = skip_whitespace(text, start)
    if i >= len(text):
        return scan
    if text[i] != "{":
        scan.valid = False
        return scan
    i += 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] == ",":
            i = skip_whitespace(text, i + 1)
            if i >= len(text):
                return scan
        if text[i] != '"':
            scan.valid = False
            return scan
        key_end = scan_string(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_whitespace(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            scan.valid = False
            return scan
        i = skip_whitespace(text, i + 1)
        if i >= len(text):
            return scan
        if key in args_keys and scan.args_start is None:
            scan.args_start = i
        value_end = scan_value(text, i)
        if value_end is None:
            return scan
        if key == "name" and text[i] == '"':
            scan.name = json.loads(text[i:value_end])
        if key in args_keys and scan.args_start == i:
            scan.args_end = value_end
        i = value_end


class JsonCallStream:
    """Streams one call object: the header delta (id, type, name) once its name is known, then
    the arguments' text as it arrives; a call without arguments gets "{}" when it completes."""

    def __init__(self, index: int, call_id: str, args_keys: tuple[str, ...]) -> None:
        self.index = index
        self.call_id = call_id
        self.args_keys = args_keys
        self.header_sent = False
        self.args_sent = 0  # characters of the arguments text sent

    def deltas(self, body: str, complete: bool) -> list[dict[str, Any]]:
        scan = scan_call(body, 0, self.args_keys)
        out: list[dict[str, Any]] = []
        if not self.header_sent and scan.name is not None:
            out.append(self._part({"name": scan.name, "arguments": ""}, header=True))
            self.header_sent = True
        if self.header_sent and scan.args_start is not None:
            stop = scan.args_end if scan.args_end is not None else len(body)
            args = body[scan.args_start : stop]
            if scan.args_end is None:
                args = args.rstrip(WHITESPACE) if _is_scalar(args) else args
            if len(args) > self.args_sent:
                out.append(self._part({"arguments": args[self.args_sent :]}))
                self.args_sent = len(args)
        complete = complete or scan.end is not None
        if complete and self.header_sent and scan.args_start is None and not self.args_sent:
            out.append(self._part({"arguments": "{}"}))  # no arguments: an empty object
            self.args_sent = 2
        return out

    def _part(self, function: dict[str, str], header: bool = False) -> dict[str, Any]:
        part: dict[str, Any] = {"index": self.index, "function": function}
        if header:
            part = {"index": self.index, "id": self.call_id, "type": "function", **part}
        return {"tool_calls": [part]}


def _is_scalar(text: str) -> bool:
    return not text or text[0] not in '{["'


def call_from_scan(body: str, scan: CallScan, call_id: str) -> ToolCall | None:
    """The tool call of a complete, well-formed call object; None otherwise."""
    if not scan.valid or scan.end is None or scan.name is None:
        return None
    try:
        json.loads(body[: scan.end])
    except json.JSONDecodeError:
        return None
    arguments = "{}" if scan.args_start is None else body[scan.args_start : scan.args_end]
    return ToolCall(scan.name, arguments, call_id)
