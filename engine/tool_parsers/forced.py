"""Tool calls of output generated under tool_choice `required` or a named function (the JSON
grammars of `engine.structured.openai.tool_choice_structured_outputs`), with the same
`extract` / `streaming` interface as the format parsers, so a server streams them the same way:

- named function `f`: the whole output is f's arguments object -> one call to f; streaming sends
  the header at once and then the output text as argument fragments (leading and trailing
  whitespace left out);
- required: the output is a JSON array of `{"name": ..., "parameters": {...}}` -> one call per
  element, arguments = the `parameters` text as written; streamed like the format parsers.

There is no content: all of the output is tool calls. `extract` on output cut short (max_tokens)
returns the calls complete so far (for a named function, the arguments text as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.tool_parsers.base import (
    WHITESPACE,
    ExtractedToolCalls,
    JsonCallStream,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    random_tool_call_id,
    scan_call,
    skip_whitespace,
)

ARGS_KEYS = ("parameters",)


class ForcedToolCallParser(ToolParser):
    """`function_name` None: tool_choice required; else the named function."""

    name = "forced"

    def __init__(
        self,
        function_name: str | None,
        make_id: Callable[[int], str] = random_tool_call_id,
    ) -> None:
        super().__init__(make_id)
        self.function_name = function_name

    def extract(self, text: str) -> ExtractedToolCalls:
        if self.function_name is not None:
            return ExtractedToolCalls(
                None, [ToolCall(self.function_name, text.strip(WHITESPACE), self.make_id(0))]
            )
        calls: list[ToolCall] = []
        for start, scan in _elements(text):
            if scan.end is None or scan.name is None:
                break
            arguments = (
                "{}"
                if scan.args_start is None
                else text[start + scan.args_start : start + scan.args_end]
            )
            calls.append(ToolCall(scan.name, arguments, self.make_id(len(calls))))
        return ExtractedToolCalls(None, calls)

    def streaming(self) -> StreamingToolParser:
        if self.function_name is not None:
            return _NamedStream(self.function_name, self.make_id(0))
        return _RequiredStream(self)


def _elements(text: str) -> list[tuple[int, Any]]:
    """(start, scan) of each element object of the top-level array, the last maybe partial."""
    out = []
    i = skip_whitespace(text, 0)
    if i >= len(text) or text[i] != "[":
        return out
    i += 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text) or text[i] == "]":
            return out
        if text[i] == ",":
            i = skip_whitespace(text, i + 1)
            if i >= len(text):
                return out
        scan = scan_call(text[i:], 0, ARGS_KEYS)
        out.append((i, scan))
        if scan.end is None or not scan.valid:
            return out
        i += scan.end


class _NamedStream(StreamingToolParser):
    def __init__(self, name: str, call_id: str) -> None:
        self.name = name
        self.call_id = call_id
        self.text = ""
        self.sent = 0  # characters of the stripped arguments sent
        self.header_sent = False

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        self.text += delta_text
        return self._advance(final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[dict[str, Any]]:
        del final  # nothing is held back that the end would release
        out: list[dict[str, Any]] = []
        if not self.header_sent:
            self.header_sent = True
            header = {"name": self.name, "arguments": ""}
            out.append(
                {
                    "tool_calls": [
                        {"index": 0, "id": self.call_id, "type": "function", "function": header}
                    ]
                }
            )
        # Trailing whitespace waits: it is sent only if more arguments text follows it.
        ready = self.text.strip(WHITESPACE)
        if len(ready) > self.sent:
            out.append(
                {"tool_calls": [{"index": 0, "function": {"arguments": ready[self.sent :]}}]}
            )
            self.sent = len(ready)
        return out


class _RequiredStream(StreamingToolParser):
    def __init__(self, parser: ForcedToolCallParser) -> None:
        self.parser = parser
        self.text = ""
        self.calls: list[JsonCallStream] = []

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        self.text += delta_text
        out: list[dict[str, Any]] = []
        for index, (start, scan) in enumerate(_elements(self.text)):
            if index == len(self.calls):
                self.calls.append(JsonCallStream(index, self.parser.make_id(index), ARGS_KEYS))
            stream = self.calls[index]
            end = start + scan.end if scan.end is not None else len(self.text)
            out += stream.deltas(self.text[start:end], complete=scan.end is not None)
        return out
