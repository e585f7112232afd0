"""The `llama3_json` tool-call format (Llama 3.1 / 3.2 JSON tool calling):

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}

The output is tool calls when, after leading whitespace, it starts with `<|python_tag|>` or `{`:
then it is one or more call objects separated by `;` (the arguments key is `parameters`, or
`arguments`), and there is no content. Otherwise all of it is content. Output that starts like a
call but is not well-formed is all content (non-streaming; streaming has sent what it had).
"""

from __future__ import annotations

from typing import Any

from engine.tool_parsers.base import (
    ExtractedToolCalls,
    JsonCallStream,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    call_from_scan,
    scan_call,
    skip_whitespace,
)

PYTHON_TAG = "<|python_tag|>"
ARGS_KEYS = ("parameters", "arguments")


def _calls_start(text: str) -> int | None:
    """Where the first call object may start, None if the text is content, -1 if unknown yet."""
    i = skip_whitespace(text, 0)
    rest = text[i:]
    if rest.startswith(PYTHON_TAG):
        return i + len(PYTHON_TAG)
    if rest.startswith("{"):
        return i
    if not rest or PYTHON_TAG.startswith(rest):
        return -1
    return None


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract(self, text: str) -> ExtractedToolCalls:
        start = _calls_start(text)
        if start is None or start < 0:
            return ExtractedToolCalls(text or None, [])
        calls: list[ToolCall] = []
        i = start
        while True:
            body = text[skip_whitespace(text, i) :]
            scan = scan_call(body, 0, ARGS_KEYS)
            call = call_from_scan(body, scan, self.make_id(len(calls)))
            if call is None or scan.end is None:
                return ExtractedToolCalls(text or None, [])
            calls.append(call)
            i = skip_whitespace(text, len(text) - len(body) + scan.end)
            if i >= len(text):
                return ExtractedToolCalls(None, calls)
            if text[i] != ";":
                return ExtractedToolCalls(text or None, [])
            i += 1
            if skip_whitespace(text, i) >= len(text):
                return ExtractedToolCalls(None, calls)  # a trailing separator

    def streaming(self) -> StreamingToolParser:
        return _Llama3Stream(self)


class _Llama3Stream(StreamingToolParser):
    def __init__(self, parser: Llama3JsonToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.mode: str | None = None  # "content" or "calls" once known
        self.content_sent = 0
        self.call_start = 0  # where the current call object's text starts
        self.call: JsonCallStream | None = None
        self.expect_separator = False  # a call just ended: only ";" may start another
        self.num_calls = 0
        self.sent_call = False  # some call's header went out

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        self.text += delta_text
        return self._advance()

    def finish(self) -> list[dict[str, Any]]:
        if self.mode is None and self.text:
            self.mode = "content"  # only whitespace or a partial tag: it was content after all
        out = self._advance()
        if self.mode != "content" and not self.sent_call and self.text:
            out.append({"content": self.text})  # no call came of it: it was all content
        return out

    def _advance(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.mode is None:
            start = _calls_start(self.text)
            if start is None:
                self.mode = "content"
            elif start >= 0:
                self.mode, self.call_start = "calls", start
        if self.mode == "content":
            if len(self.text) > self.content_sent:
                out.append({"content": self.text[self.content_sent :]})
                self.content_sent = len(self.text)
            return out
        if self.mode != "calls":
            return out
        while True:
            if self.call is None:
                i = skip_whitespace(self.text, self.call_start)
                if i >= len(self.text):
                    return out
                if self.expect_separator:
                    if self.text[i] != ";":
                        self.mode = "done"  # trailing text: not another call
                        return out
                    self.call_start, self.expect_separator = i + 1, False
                    continue
                if self.text[i] != "{":
                    self.mode = "done"
                    return out
                self.call = JsonCallStream(
                    self.num_calls, self.parser.make_id(self.num_calls), ARGS_KEYS
                )
                self.num_calls += 1
                self.call_start = i
            body = self.text[self.call_start :]
            scan = scan_call(body, 0, ARGS_KEYS)
            out += self.call.deltas(body[: scan.end or len(body)], complete=scan.end is not None)
            self.sent_call = self.sent_call or self.call.header_sent
            if scan.end is None:
                return out
            self.call_start += scan.end
            self.call = None
            self.expect_separator = True
