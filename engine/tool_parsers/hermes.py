"""The `hermes` tool-call format (Hermes 2 Pro, Qwen 2.5 / 3 templates):

    some content<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><tool_call>...</tool_call>

`content` is the text before the first `<tool_call>` (None if empty); text between and after
calls is not content (as vLLM's hermes parser). A call's closing tag may be missing at the end of
the output. If any call is not a well-formed `{"name": str, "arguments": ...}` object, the
non-streaming result is no tool calls, the whole text as content (vLLM's fallback); streaming
has by then sent what it had, so the two agree only on well-formed output.
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
)

START, END = "<tool_call>", "</tool_call>"
ARGS_KEYS = ("arguments",)


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract(self, text: str) -> ExtractedToolCalls:
        first = text.find(START)
        if first < 0:
            return ExtractedToolCalls(text or None, [])
        calls: list[ToolCall] = []
        for body in _bodies(text, first):
            call = call_from_scan(body, scan_call(body, 0, ARGS_KEYS), self.make_id(len(calls)))
            if call is None:
                return ExtractedToolCalls(text or None, [])
            calls.append(call)
        return ExtractedToolCalls(text[:first] or None, calls)

    def streaming(self) -> StreamingToolParser:
        return _HermesStream(self)


def _bodies(text: str, first: int) -> list[str]:
    """The text inside each <tool_call> ... </tool_call> (the last may be unclosed)."""
    bodies = []
    at = first
    while at >= 0:
        start = at + len(START)
        end = text.find(END, start)
        if end < 0:
            bodies.append(text[start:])
            break
        bodies.append(text[start:end])
        at = text.find(START, end + len(END))
    return bodies


def held_back(text: str, tag: str) -> int:
    """How many trailing characters of text could be the start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class _HermesStream(StreamingToolParser):
    def __init__(self, parser: HermesToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0  # characters of content sent
        self.seen_call = False
        self.call_start: int | None = None  # where the current call's body starts
        self.search_from = 0  # where to look for the next <tool_call>
        self.call: JsonCallStream | None = None
        self.num_calls = 0
        self.sent_call = False  # some call's header went out

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        self.text += delta_text
        return self._advance(final=False)

    def finish(self) -> list[dict[str, Any]]:
        out = self._advance(final=True)
        if not self.sent_call:  # no call came of it: the whole text was content
            self._content(out, len(self.text))
        return out

    def _advance(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        text = self.text
        while True:
            if self.call_start is None:
                at = text.find(START, self.search_from)
                if at < 0:
                    if not self.seen_call:
                        keep = 0 if final else held_back(text, START)
                        self._content(out, len(text) - keep)
                    return out
                if not self.seen_call:
                    self._content(out, at)
                self.seen_call = True
                self.call_start = at + len(START)
                self.call = JsonCallStream(
                    self.num_calls, self.parser.make_id(self.num_calls), ARGS_KEYS
                )
                self.num_calls += 1
            assert self.call is not None
            end = text.find(END, self.call_start)
            body = text[self.call_start : end if end >= 0 else len(text)]
            out += self.call.deltas(body, complete=end >= 0)
            self.sent_call = self.sent_call or self.call.header_sent
            if end < 0:
                return out
            self.search_from = end + len(END)
            self.call_start = None

    def _content(self, out: list[dict[str, Any]], upto: int) -> None:
        if upto > self.content_sent:
            out.append({"content": self.text[self.content_sent : upto]})
            self.content_sent = upto
