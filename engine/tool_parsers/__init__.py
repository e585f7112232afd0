"""Tool-call parsers, by vLLM's `--tool-call-parser` names.

parser = get_tool_parser("hermes")()
parser.extract(text) -> ExtractedToolCalls(content, tool_calls)
stream = parser.streaming(); stream.feed(delta_text) -> OpenAI delta dicts; stream.finish()
"""

from __future__ import annotations

from engine.tool_parsers.base import (
    ExtractedToolCalls,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    reassemble,
)
from engine.tool_parsers.hermes import HermesToolParser
from engine.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    """Adds a parser class under its `name` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"tool parser {cls.__name__} has no name")
    TOOL_PARSERS[cls.name] = cls
    return cls


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class for --tool-call-parser NAME; ValueError listing the known names."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"tool_call_parser: unknown parser {name!r}; known: {known}") from None


register_tool_parser(HermesToolParser)
register_tool_parser(Llama3JsonToolParser)

__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCalls",
    "StreamingToolParser",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
    "reassemble",
    "register_tool_parser",
]
