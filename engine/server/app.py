"""The aiohttp application: OpenAI routes over an AsyncEngine, auth, errors, lifecycle.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics.

Threads: the event loop runs every handler and owns its own tokenizer copy (prompt encoding,
chat templates, echo and logprob text); the engine and its tokenizer live on the AsyncEngine's
thread. So no tokenizer or engine object is ever used by two threads.

Invariants: every error leaves as `{"error": {...}}` JSON with its HTTP status (unknown routes
and methods included); a request that ends for any reason other than finishing (client gone,
write error, server shutdown) has its stream closed, which aborts it and frees its KV blocks; a
failure after a stream has started is sent as an SSE error event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import engine as engine_pkg
from engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
    RequestStream,
    merge_streams,
)
from engine.engine import LLMEngine
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from engine.server import protocol as P
from engine.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics, StatsLogger
from engine.tokenizer import apply_chat_template, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["OpenAIServer", "ServerConfig", "ServerThread", "bind_socket"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Big enough for long prompts given as token ids (aiohttp's default is 1 MiB).
_MAX_BODY_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP-side settings (the engine's are EngineArgs)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # empty: the engine's model argument
    api_key: str | None = None
    max_waiting_requests: int | None = 1024  # None: unbounded
    log_stats_interval: float | None = 5.0  # seconds; None: no stats log lines
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    chat_template: str | None = None  # overrides the tokenizer's
    access_log: bool = True
    retry_after_s: int = 1


class OpenAIServer:
    """Owns the AsyncEngine, the metrics registry and the aiohttp application."""

    def __init__(self, engine: LLMEngine, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.model_config = engine.model_config
        self.max_model_len = self.model_config.max_model_len
        self.tokenizer = load_tokenizer(
            self.model_config.tokenizer_path, trust_remote_code=self.model_config.trust_remote_code
        )
        self.model_names = self.config.served_model_names or (self.model_config.model,)
        self.metrics = ServerMetrics(self.model_names[0], lambda: self.async_engine.stats)
        self.async_engine = AsyncEngine(
            engine,
            max_waiting_requests=self.config.max_waiting_requests,
            observer=self.metrics,
        )
        self.created = int(time.time())
        self._shutting_down = False
        self._force_shutdown: asyncio.Event | None = None
        self._log_task: asyncio.Task[None] | None = None

    # ---- application -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._error_middleware, self._gate_middleware],
            client_max_size=_MAX_BODY_BYTES,
        )
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.create_completion)
        app.router.add_post("/v1/chat/completions", self.create_chat_completion)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics_endpoint)
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except P.APIError as e:
            return _error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = e.text if e.text and e.text != f"{e.status}: {e.reason}" else e.reason
            if e.status == 404:
                message = f"Route {request.method} {request.path} not found"
            elif e.status == 405:
                message = f"Method {request.method} is not allowed on {request.path}"
            return _error_response(P.APIError(message, status=e.status))
        except Exception as e:
            logger.exception("error while handling %s %s", request.method, request.path)
            return _error_response(P.APIError(f"Internal server error: {e!r}", status=500))

    @web.middleware
    async def _gate_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._shutting_down:
            raise P.APIError("The server is shutting down", status=503)
        key = self.config.api_key
        if key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise P.APIError(
                    "Invalid or missing API key: send 'Authorization: Bearer <key>'", status=401
                )
        return await handler(request)

    # ---- simple routes ---------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        root = str(self.model_config.model_path)
        cards = [P.model_card(n, root, self.max_model_len, self.created) for n in self.model_names]
        return web.json_response(P.models_list(cards))

    async def health(self, request: web.Request) -> web.Response:
        if not self.async_engine.is_running:
            raise P.APIError("The engine is not running", status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": engine_pkg.__version__})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        body = P.parse_json_body(await request.read())
        self._model_name(P.get_field(body, "model", "str"))
        if "messages" in body:
            chat = P.parse_chat_request(body, self.model_config.max_logprobs)
            token_ids = self._render_chat(chat)
        else:
            prompt = P.get_field(body, "prompt", "str")
            if prompt is None:
                raise P.APIError("prompt (a string) or messages is required", param="prompt")
            add_special = P.get_field(body, "add_special_tokens", "bool", True)
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        token_strs = None
        if P.get_field(body, "return_token_strs", "bool", False):
            token_strs = self.tokenizer.convert_ids_to_tokens(token_ids)
        return web.json_response(
            {
                "count": len(token_ids),
                "max_model_len": self.max_model_len,
                "tokens": token_ids,
                "token_strs": token_strs,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body = P.parse_json_body(await request.read())
        self._model_name(P.get_field(body, "model", "str"))
        tokens = P.get_field(body, "tokens", "int_list")
        if tokens is None:
            raise P.APIError("tokens (an array of token ids) is required", param="tokens")
        self._check_vocab(tokens, "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(tokens)})

    # ---- helpers ---------------------------------------------------------------------------------

    def _model_name(self, requested: str | None) -> str:
        """The name to answer with; a 404 for a model this server does not serve."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise P.APIError(f"The model `{requested}` does not exist.", status=404, param="model")
        return requested

    def _check_vocab(self, token_ids: list[int], param: str) -> None:
        vocab = self.model_config.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab:
                raise P.APIError(
                    f"token id {token_id} is outside the vocabulary [0, {vocab})", param=param
                )

    def _encode_prompt(self, prompt: P.Prompt, need_text: bool) -> tuple[str | None, list[int]]:
        """(text, token ids); the text of a token-id prompt is decoded only when needed (echo)."""
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            if not token_ids:
                raise P.APIError(
                    "prompt is empty: it must contain at least one token", param="prompt"
                )
            return prompt, token_ids
        self._check_vocab(prompt, "prompt")
        return (self.tokenizer.decode(prompt) if need_text else None), list(prompt)

    def _render_chat(self, chat: P.ChatRequest) -> list[int]:
        try:
            return apply_chat_template(
                self.tokenizer,
                chat.messages,
                add_generation_prompt=chat.add_generation_prompt,
                chat_template=chat.chat_template or self.config.chat_template,
                **chat.chat_template_kwargs,
            )
        except Exception as e:  # jinja errors, a missing template, a bad kwarg
            raise P.APIError(f"Could not apply the chat template: {e}", param="messages") from e

    async def _add_all(
        self,
        response_id: str,
        prompts: list[list[int]],
        texts: list[str | None],
        params: list[SamplingParams],
    ) -> list[RequestStream]:
        """Adds one engine request per prompt; on any failure none stays in the engine."""
        streams: list[RequestStream] = []
        try:
            for i, (token_ids, text, p) in enumerate(zip(prompts, texts, params, strict=True)):
                engine_id = response_id if len(prompts) == 1 else f"{response_id}-{i}"
                prompt = {"prompt_token_ids": token_ids, "prompt": text}
                streams.append(await self.async_engine.add_request(engine_id, prompt, p))
        except BaseException as e:
            for stream in streams:
                stream.close()
            if isinstance(e, Exception):
                raise self._api_error(e) from e
            raise
        return streams

    def _api_error(self, error: Exception) -> P.APIError:
        if isinstance(error, P.APIError):
            return error
        if isinstance(error, QueueFullError):
            return P.APIError(
                str(error), status=503, headers={"Retry-After": str(self.config.retry_after_s)}
            )
        if isinstance(error, (EngineShutdownError, EngineDeadError)):
            return P.APIError(str(error), status=503)
        if isinstance(error, EngineStepError):
            return P.APIError(str(error), status=500)
        if isinstance(error, ValueError):
            message = str(error)
            param = (
                "prompt"
                if message.startswith("prompt")
                else P.field_named_in(message, P.SAMPLING_FIELDS)
            )
            return P.APIError(message, param=param)
        return P.APIError(f"Internal server error: {error!r}", status=500)

    # ---- /v1/completions -------------------------------------------------------------------------

    async def create_completion(self, request: web.Request) -> web.StreamResponse:
        body = P.parse_json_body(await request.read())
        req = P.parse_completion_request(body, self.model_config.max_logprobs)
        model = self._model_name(req.model)
        encoded = [self._encode_prompt(p, need_text=req.echo) for p in req.prompts]
        echo_only = req.max_tokens == 0  # echo with max_tokens 0: return the prompt only
        params = []
        for _, token_ids in encoded:
            max_tokens = P.check_length(len(token_ids), max(req.max_tokens, 1), self.max_model_len)
            sampling = {**req.sampling, "max_tokens": max_tokens, "logprobs": req.logprobs}
            params.append(P.make_sampling_params(sampling))
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await self._add_all(
            response_id, [ids for _, ids in encoded], [t for t, _ in encoded], params
        )
        job = _CompletionJob(self, req, model, response_id, created, encoded, echo_only)
        if req.stream:
            return await _stream_sse(request, streams, job.chunks, self._api_error)
        try:
            finals = await asyncio.gather(*(s.final() for s in streams))
        except Exception as e:
            raise self._api_error(e) from e
        finally:
            for stream in streams:
                stream.close()
        return web.json_response(job.response(finals))

    # ---- /v1/chat/completions --------------------------------------------------------------------

    async def create_chat_completion(self, request: web.Request) -> web.StreamResponse:
        body = P.parse_json_body(await request.read())
        req = P.parse_chat_request(body, self.model_config.max_logprobs)
        model = self._model_name(req.model)
        token_ids = self._render_chat(req)
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = P.check_length(len(token_ids), req.max_tokens, self.max_model_len, param)
        sampling = {
            **req.sampling,
            "max_tokens": max_tokens,
            "logprobs": req.top_logprobs if req.logprobs else None,
        }
        params = P.make_sampling_params(sampling)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await self._add_all(response_id, [token_ids], [None], [params])
        job = _ChatJob(self, req, model, response_id, created, len(token_ids), params.n)
        if req.stream:
            return await _stream_sse(request, streams, job.chunks, self._api_error)
        try:
            final = await streams[0].final()
        except Exception as e:
            raise self._api_error(e) from e
        finally:
            streams[0].close()
        return web.json_response(job.response(final))

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> web.AppRunner:
        """Starts the engine thread and serves on `sock` (bound, not yet listening)."""
        self.async_engine.start()
        runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,  # a client that goes away cancels (and aborts) its request
            access_log=logging.getLogger("engine.server.access")
            if self.config.access_log
            else None,
            access_log_format='%a "%r" %s %Tfs',
            shutdown_timeout=5.0,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        if self.config.log_stats_interval:
            self._log_task = asyncio.create_task(self._log_stats(self.config.log_stats_interval))
        return runner

    async def shutdown(self, runner: web.AppRunner) -> None:
        """Stops accepting, lets in-flight requests finish (up to shutdown_timeout), then ends
        the rest with an error (SSE error event / 503) and stops the engine."""
        self._shutting_down = True
        for site in list(runner.sites):
            await site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        force = self._force_shutdown
        while self.async_engine.num_in_flight and loop.time() < deadline:
            if force is not None and force.is_set():
                break
            await asyncio.sleep(0.05)
        if self.async_engine.num_in_flight:
            logger.info("ending %d unfinished requests", self.async_engine.num_in_flight)
        self.async_engine.fail_all(EngineShutdownError("The server is shutting down"))
        await runner.cleanup()
        await self.async_engine.shutdown()
        if self._log_task is not None:
            self._log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task

    async def serve(
        self,
        sock: socket.socket,
        stop: asyncio.Event | None = None,
        ready: Callable[[str], None] | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Serves until `stop` is set (or SIGINT/SIGTERM with handle_signals), then shuts down."""
        stop = stop or asyncio.Event()
        self._force_shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals:

            def on_signal(signum: int) -> None:
                if stop.is_set():  # a second signal: stop waiting for in-flight requests
                    self._force_shutdown.set()  # type: ignore[union-attr]
                else:
                    logger.info("received %s: shutting down", signal.Signals(signum).name)
                    stop.set()

            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal, signum)
        runner = await self.start(sock)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        logger.info(
            "Serving %s on %s (OpenAI API under %s/v1)", ", ".join(self.model_names), url, url
        )
        if ready is not None:
            ready(url)
        try:
            await stop.wait()
        finally:
            await self.shutdown(runner)
            if handle_signals:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
        logger.info("server stopped")

    async def _log_stats(self, interval: float) -> None:
        stats_logger = StatsLogger(lambda: self.async_engine.stats)
        while True:
            await asyncio.sleep(interval)
            line = stats_logger.line()
            if line is not None:
                logger.info(line)


def _error_response(error: P.APIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


# ---- streaming -----------------------------------------------------------------------------------

ChunkSource = Callable[[list[RequestStream]], Any]  # -> AsyncIterator[dict]


async def _stream_sse(
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

    text_len: int = 0  # characters of the output text
    num_tokens: int = 0  # output token ids
    sent_chars: int = 0  # characters sent, echoed prompt included (logprobs text_offset)
    started: bool = False
    done: bool = False


class _CompletionJob:
    """Builds /v1/completions responses and chunks for one request (all its prompts)."""

    def __init__(
        self,
        server: OpenAIServer,
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
        self.token_text = P.TokenText(server.tokenizer, req.return_tokens_as_token_ids)

    def _prompt_positions(self, out: RequestOutput) -> list[Any]:
        if out.prompt_logprobs is not None:
            return list(out.prompt_logprobs)
        return [None] * len(out.prompt_token_ids)

    def _choice_parts(
        self, prompt_index: int, out: RequestOutput, sample: int, state: _ChoiceState
    ) -> tuple[str, list[int], list[Any], bool]:
        """(new text, new token ids, their logprob positions, includes the prompt) to send."""
        c = out.outputs[sample]
        prompt_text, prompt_ids = self.encoded[prompt_index]
        prompt_text = prompt_text or ""  # decoded whenever echo is on
        if self.echo_only:
            if state.started:
                return "", [], [], False
            return prompt_text, prompt_ids, self._prompt_positions(out), True
        text = c.text[state.text_len :]
        ids = c.token_ids[state.num_tokens :]
        positions: list[Any] = list((c.logprobs or [])[state.num_tokens :]) or [{}] * len(ids)
        state.text_len, state.num_tokens = len(c.text), len(c.token_ids)
        if self.req.echo and not state.started:
            return (
                prompt_text + text,
                prompt_ids + ids,
                self._prompt_positions(out) + positions,
                True,
            )
        return text, ids, positions, False

    def _logprobs(self, ids: list[int], positions: list[Any], offset: int) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        return P.completion_logprobs(ids, positions, self.req.logprobs, self.token_text, offset)

    def _usage(self, outs: list[RequestOutput | None]) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for _, ids in self.encoded)
        completion = (
            0
            if self.echo_only
            else sum(len(c.token_ids) for o in outs if o is not None for c in o.outputs)
        )
        return P.usage(prompt_tokens, completion)

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(finals):
            for sample, c in enumerate(out.outputs):
                text, ids, positions, _ = self._choice_parts(i, out, sample, _ChoiceState())
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
        return P.completion_response(
            self.response_id, self.created, self.model, choices, self._usage(list(finals))
        )

    async def chunks(self, streams: list[RequestStream]) -> Any:
        opts = self.req.stream_options
        states = {(i, s): _ChoiceState() for i in range(len(streams)) for s in range(self.n)}
        latest: list[RequestOutput | None] = [None] * len(streams)
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                latest[i] = out
                for sample, c in enumerate(out.outputs):
                    state = states[(i, sample)]
                    if state.done or (self.echo_only and c.finish_reason is None):
                        continue
                    offset = state.sent_chars
                    text, ids, positions, _ = self._choice_parts(i, out, sample, state)
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
                    usage = self._usage(latest) if opts.continuous_usage_stats else None
                    yield P.completion_response(
                        self.response_id, self.created, self.model, [choice], usage, chunk=True
                    )
        if opts.include_usage:
            yield P.completion_response(
                self.response_id, self.created, self.model, [], self._usage(latest), chunk=True
            )


class _ChatJob:
    """Builds /v1/chat/completions responses and chunks for one request."""

    def __init__(
        self,
        server: OpenAIServer,
        req: P.ChatRequest,
        model: str,
        response_id: str,
        created: int,
        num_prompt_tokens: int,
        n: int,
    ) -> None:
        self.req = req
        self.model = model
        self.response_id = response_id
        self.created = created
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.token_text = P.TokenText(server.tokenizer, req.return_tokens_as_token_ids)

    def _logprobs(self, ids: list[int], positions: list[Any]) -> list[dict[str, Any]] | None:
        if not self.req.logprobs:
            return None
        return P.chat_logprobs_content(ids, positions, self.req.top_logprobs, self.token_text)

    def _usage(self, out: RequestOutput | None) -> dict[str, int]:
        generated = sum(len(c.token_ids) for c in out.outputs) if out is not None else 0
        return P.usage(self.num_prompt_tokens, generated)

    def response(self, final: RequestOutput) -> dict[str, Any]:
        choices = [
            P.chat_choice(
                c.index,
                c.text,
                self._logprobs(c.token_ids, list(c.logprobs or [{}] * len(c.token_ids))),
                c.finish_reason,
                c.stop_reason,
            )
            for c in final.outputs
        ]
        return P.chat_response(
            self.response_id, self.created, self.model, choices, self._usage(final)
        )

    async def chunks(self, streams: list[RequestStream]) -> Any:
        opts = self.req.stream_options
        states = [_ChoiceState() for _ in range(self.n)]
        latest: RequestOutput | None = None

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            usage = self._usage(latest) if opts.continuous_usage_stats else None
            return P.chat_chunk(
                self.response_id, self.created, self.model, [choice], usage, opts.include_usage
            )

        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for _, out in merged:
                latest = out
                for c in out.outputs:
                    state = states[c.index]
                    if state.done:
                        continue
                    if not state.started:
                        state.started = True
                        yield chunk(
                            P.chat_chunk_choice(c.index, {"role": "assistant", "content": ""})
                        )
                    text = c.text[state.text_len :]
                    ids = c.token_ids[state.num_tokens :]
                    positions = list((c.logprobs or [])[state.num_tokens :]) or [{}] * len(ids)
                    state.text_len, state.num_tokens = len(c.text), len(c.token_ids)
                    finish = c.finish_reason
                    if not text and not ids and finish is None:
                        continue
                    state.done = finish is not None
                    yield chunk(
                        P.chat_chunk_choice(
                            c.index,
                            {"content": text} if text or finish is None else {},
                            self._logprobs(ids, positions),
                            finish,
                            c.stop_reason,
                        )
                    )
        if opts.include_usage:
            yield P.chat_chunk(self.response_id, self.created, self.model, [], self._usage(latest))


# ---- sockets and threads -------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); port 0 picks a free one (see getsockname())."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise ValueError(f"cannot resolve host {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Runs an OpenAIServer on its own event loop in a background thread (tests, notebooks).

    `start()` returns the base URL once the server listens; `stop()` shuts it down cleanly.
    """

    def __init__(self, server: OpenAIServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self._sock = bind_socket(host, port)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="server-loop", daemon=True)
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(url: str) -> None:
                self.url = url
                self._ready.set()

            await self.server.serve(self._sock, stop=self._stop, ready=ready)

        try:
            asyncio.run(run())
        except BaseException as e:
            self._error = e
            logger.exception("server thread failed")
        finally:
            self._ready.set()
