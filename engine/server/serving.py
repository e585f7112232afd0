"""Responses and Server-Sent Event streams for the generation routes.

`CompletionJob` and `ChatJob` turn one HTTP request's engine outputs into OpenAI's response body
(from the complete final output) or its stream chunks (from DELTA outputs: only new text,
tokens and logprobs, so a chunk costs what is new, never the length so far); each choice keeps
what it already sent (`_ChoiceState`).
With a tool parser (tool_choice required / a named function, or auto with --tool-call-parser),
a chat choice's text is read as tool calls: the response's `message.tool_calls`, and in a stream
the parser's deltas (`content` and incremental `tool_calls`), which reassemble to the response.
`stream_sse` writes the chunks; a failure after the stream has started is sent as an SSE error
event followed by `data: [DONE]`, and whatever ends the stream closes the request's engine
streams (aborting what did not finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.async_engine import RequestStream, merge_streams
from engine.request import CompletionOutput, RequestOutput
from engine.server import protocol as P
from engine.tool_parsers import ToolParser

logger = logging.getLogger(__name__)

__all__ = ["ChatJob", "CompletionJob", "stream_sse"]

# ---- streaming -----------------------------------------------------------------------------------

ChunkSource = Callable[[list[RequestStream]], Any]  # -> AsyncIterator[dict]


async def stream_sse(
    request: web.Request,
    streams: list[RequestStream],
    chunks: ChunkSource,
    to_api_error: Callable[[Exception], P.APIError],
) -> web.StreamResponse:
    """Writes `data: {chunk}` events, then `data: [DONE]`; a failure becomes an error event."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        try:
            async with contextlib.aclosing(chunks(streams)) as events:
                async for event in events:
                    await response.write(P.sse(event))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            error = to_api_error(e)
            if error.status >= 500:
                logger.error("stream failed: %s", error.message)
            await response.write(P.sse(error.body()))
        await response.write(P.SSE_DONE)
        await response.write_eof()
    except ConnectionError:
        logger.info("client disconnected; aborting %s", ", ".join(s.request_id for s in streams))
    finally:
        for stream in streams:
            stream.close()  # aborts whatever did not finish
    return response


@dataclass
class _ChoiceState:
    """What was already sent of one choice."""

    num_tokens: int = 0  # output token ids
    sent_chars: int = 0  # characters sent, echoed prompt included (logprobs text_offset)
    started: bool = False
    done: bool = False
    called_tools: bool = False  # some tool_calls delta went out
    pending_logprobs: list[dict[str, Any]] | None = None  # not yet sent with a delta


class CompletionJob:
    """Builds /v1/completions responses and chunks for one request (all its prompts)."""

    def __init__(
        self,
        tokenizer: Any,
        req: P.CompletionRequest,
        model: str,
        response_id: str,
        created: int,
        encoded: list[tuple[str | None, list[int]]],
        echo_only: bool,
    ) -> None:
        self.req = req
        self.model = model
        self.response_id = response_id
        self.created = created
        self.encoded = encoded
        self.echo_only = echo_only
        self.n = int(req.sampling.get("n", 1))
        self.token_text = P.TokenText(tokenizer, req.return_tokens_as_token_ids)
        self._prompt_logprobs: list[list[Any] | None] = [None] * len(encoded)

    def _note_prompt_logprobs(self, prompt_index: int, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:  # a DELTA request's first output carries them
            self._prompt_logprobs[prompt_index] = list(out.prompt_logprobs)

    def _prompt_positions(self, prompt_index: int) -> list[Any]:
        positions = self._prompt_logprobs[prompt_index]
        return positions if positions is not None else [None] * len(self.encoded[prompt_index][1])

    def _choice_parts(
        self, prompt_index: int, c: CompletionOutput, state: _ChoiceState
    ) -> tuple[str, list[int], list[Any]]:
        """(text, token ids, their logprob positions) to send for sample output `c` (a delta,
        or a whole final output with a fresh state); the echoed prompt goes with the first."""
        prompt_text, prompt_ids = self.encoded[prompt_index]
        prompt_text = prompt_text or ""  # decoded whenever echo is on
        if self.echo_only:
            if state.started:
                return "", [], []
            return prompt_text, prompt_ids, self._prompt_positions(prompt_index)
        text, ids = c.text, c.token_ids
        positions: list[Any] = list(c.logprobs or []) or [{}] * len(ids)
        state.num_tokens += len(ids)
        if self.req.echo and not state.started:
            return (
                prompt_text + text,
                prompt_ids + ids,
                self._prompt_positions(prompt_index) + positions,
            )
        return text, ids, positions

    def _logprobs(self, ids: list[int], positions: list[Any], offset: int) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        return P.completion_logprobs(ids, positions, self.req.logprobs, self.token_text, offset)

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for _, ids in self.encoded)
        return P.usage(prompt_tokens, 0 if self.echo_only else completion_tokens)

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """The response body from each prompt's complete output."""
        choices = []
        for i, out in enumerate(finals):
            self._note_prompt_logprobs(i, out)
            for c in out.outputs:
                text, ids, positions = self._choice_parts(i, c, _ChoiceState())
                finish = "length" if self.echo_only else c.finish_reason
                stop_reason = None if self.echo_only else c.stop_reason
                choices.append(
                    P.completion_choice(
                        i * self.n + c.index,
                        text,
                        self._logprobs(ids, positions, 0),
                        finish,
                        stop_reason,
                    )
                )
        generated = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return P.completion_response(
            self.response_id, self.created, self.model, choices, self._usage(generated)
        )

    async def chunks(self, streams: list[RequestStream]) -> Any:
        """Stream chunks from the prompts' DELTA outputs (one chunk per advanced sample)."""
        opts = self.req.stream_options
        states = {(i, s): _ChoiceState() for i in range(len(streams)) for s in range(self.n)}

        def generated() -> int:
            return sum(state.num_tokens for state in states.values())

        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                self._note_prompt_logprobs(i, out)
                for c in out.outputs:
                    state = states[(i, c.index)]
                    if state.done or (self.echo_only and c.finish_reason is None):
                        continue
                    offset = state.sent_chars
                    text, ids, positions = self._choice_parts(i, c, state)
                    finish = None
                    if c.finish_reason is not None:
                        finish = "length" if self.echo_only else c.finish_reason
                    if not text and not ids and finish is None:
                        continue
                    state.started = True
                    state.done = finish is not None
                    state.sent_chars += len(text)
                    choice = P.completion_choice(
                        i * self.n + c.index,
                        text,
                        self._logprobs(ids, positions, offset),
                        finish,
                        None if self.echo_only or finish is None else c.stop_reason,
                    )
                    usage = self._usage(generated()) if opts.continuous_usage_stats else None
                    yield P.completion_response(
                        self.response_id, self.created, self.model, [choice], usage, chunk=True
                    )
        if opts.include_usage:
            yield P.completion_response(
                self.response_id, self.created, self.model, [], self._usage(generated()), chunk=True
            )


class ChatJob:
    """Builds /v1/chat/completions responses and chunks for one request."""

    def __init__(
        self,
        tokenizer: Any,
        req: P.ChatRequest,
        model: str,
        response_id: str,
        created: int,
        num_prompt_tokens: int,
        n: int,
        tool_parser: ToolParser | None = None,
    ) -> None:
        self.req = req
        self.model = model
        self.response_id = response_id
        self.created = created
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.token_text = P.TokenText(tokenizer, req.return_tokens_as_token_ids)
        self.tool_parser = tool_parser

    def _finish_reason(self, reason: str | None, called_tools: bool) -> str | None:
        """vLLM's rule: "tool_calls" when a choice that made calls stopped by itself, except
        under a named tool_choice (OpenAI answers "stop" there)."""
        if reason == "stop" and called_tools and self.req.named_function is None:
            return "tool_calls"
        return reason

    def _logprobs(self, ids: list[int], positions: list[Any]) -> list[dict[str, Any]] | None:
        if not self.req.logprobs:
            return None
        return P.chat_logprobs_content(ids, positions, self.req.top_logprobs, self.token_text)

    def _usage(self, generated: int) -> dict[str, int]:
        return P.usage(self.num_prompt_tokens, generated)

    def response(self, final: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in final.outputs:
            choice = P.chat_choice(
                c.index,
                c.text,
                self._logprobs(c.token_ids, list(c.logprobs or [{}] * len(c.token_ids))),
                c.finish_reason,
                c.stop_reason,
            )
            if self.tool_parser is not None:
                extracted = self.tool_parser.extract(c.text)
                choice["message"]["content"] = extracted.content
                choice["message"]["tool_calls"] = [t.to_openai() for t in extracted.tool_calls]
                choice["finish_reason"] = self._finish_reason(
                    c.finish_reason, extracted.tools_called
                )
            choices.append(choice)
        generated = sum(len(c.token_ids) for c in final.outputs)
        return P.chat_response(
            self.response_id, self.created, self.model, choices, self._usage(generated)
        )

    async def chunks(self, streams: list[RequestStream]) -> Any:
        """Stream chunks from the request's DELTA outputs: a role chunk opens each choice."""
        opts = self.req.stream_options
        states = [_ChoiceState() for _ in range(self.n)]

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            usage = None
            if opts.continuous_usage_stats:
                usage = self._usage(sum(state.num_tokens for state in states))
            return P.chat_chunk(
                self.response_id, self.created, self.model, [choice], usage, opts.include_usage
            )

        parsers = [
            self.tool_parser.streaming() if self.tool_parser is not None else None
            for _ in range(self.n)
        ]
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for _, out in merged:
                for c in out.outputs:
                    state = states[c.index]
                    if state.done:
                        continue
                    if not state.started:
                        state.started = True
                        yield chunk(
                            P.chat_chunk_choice(c.index, {"role": "assistant", "content": ""})
                        )
                    text, ids = c.text, c.token_ids
                    positions = list(c.logprobs or []) or [{}] * len(ids)
                    state.num_tokens += len(ids)
                    finish = c.finish_reason
                    if not text and not ids and finish is None:
                        continue
                    state.done = finish is not None
                    parser = parsers[c.index]
                    if parser is None:
                        yield chunk(
                            P.chat_chunk_choice(
                                c.index,
                                {"content": text} if text or finish is None else {},
                                self._logprobs(ids, positions),
                                finish,
                                c.stop_reason,
                            )
                        )
                        continue
                    # Tool parsing: one chunk per parser delta (the step's logprobs go with the
                    # first one sent), then the finish chunk.
                    logprobs = self._logprobs(ids, positions)
                    if logprobs is not None:
                        state.pending_logprobs = (state.pending_logprobs or []) + logprobs
                    deltas = parser.feed(text) if text else []
                    if finish is not None:
                        deltas += parser.finish()
                    for delta in deltas:
                        state.called_tools = state.called_tools or "tool_calls" in delta
                        pending, state.pending_logprobs = state.pending_logprobs, None
                        yield chunk(P.chat_chunk_choice(c.index, delta, pending))
                    if finish is not None:
                        pending, state.pending_logprobs = state.pending_logprobs, None
                        yield chunk(
                            P.chat_chunk_choice(
                                c.index,
                                {},
                                pending,
                                self._finish_reason(finish, state.called_tools),
                                c.stop_reason,
                            )
                        )
        if opts.include_usage:
            generated = sum(state.num_tokens for state in states)
            yield P.chat_chunk(
                self.response_id, self.created, self.model, [], self._usage(generated)
            )
