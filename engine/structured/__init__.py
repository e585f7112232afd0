"""Structured outputs: constrained decoding by a grammar (JSON schema, regex, choice, CFG).

`params.StructuredOutputsParams` is what a request asks for; `grammar` compiles it (cached) and
holds each request's matcher; `manager` connects matchers to the engine's steps; `openai` turns
OpenAI / vLLM request fields into SamplingParams; `tools` builds the grammars of tool_choice.
"""

from engine.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
