"""The aiohttp application: OpenAI routes over an AsyncEngine, auth, errors, limits, lifecycle.

Routes: GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /version, POST /tokenize, POST /detokenize, GET /metrics.

Threads: the event loop runs the handlers; tokenizing and chat templates run off it
(`inputs.InputProcessor`), the engine on the AsyncEngine's thread. The loop keeps one tokenizer
of its own only to render single tokens' text in responses (logprobs), so no tokenizer or engine
object is used by two threads. The loop does no work proportional to an input's size beyond
reading its body and parsing a small one (bodies over 256 KiB parse in a worker process,
`body_parser.BodyParser`); a body over the limit is refused on its Content-Length, unread; every
other size is bounded before any work (`ServerConfig`, `protocol.RequestLimits`).

Invariants: every error leaves as `{"error": {...}}` JSON with its HTTP status (unknown routes,
methods and malformed HTTP included) and no internal object's repr; a request that ends for any
reason other than finishing (client gone, write error, server shutdown) has its stream closed,
which aborts it and frees its KV blocks; shutdown takes at most `shutdown_timeout` plus about a
second, however the clients behave.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

import engine as engine_pkg
from engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
    RequestStream,
)
from engine.cpu_contention import AUTO, ThreadsSummary, parse_reserved_cpus
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.server import protocol as P
from engine.server.body_parser import BodyError, BodyParser
from engine.server.connections import ConnectionGuard, GuardedSockSite, install_log_rate_limits
from engine.server.inputs import InputProcessor
from engine.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics, StatsLogger
from engine.server.serving import ChatJob, CompletionJob, stream_sse
from engine.server.thread import ServerThread, bind_socket
from engine.structured.openai import forced_tool_call_parser
from engine.tokenizer import load_tokenizer
from engine.tool_parsers import ToolParser, get_tool_parser

logger = logging.getLogger(__name__)

__all__ = ["OpenAIServer", "ServerConfig", "ServerThread", "bind_socket"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP-side settings (the engine's are EngineArgs). Every limit has a flag of the same
    name in `python -m engine.server` (README: Server limits)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # empty: the engine's model argument
    api_key: str | None = None
    max_waiting_requests: int | None = 1024  # samples (n per request); None: unbounded
    log_stats_interval: float | None = 5.0  # seconds; None: no stats log lines
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    chat_template: str | None = None  # overrides the tokenizer's
    access_log: bool = True
    retry_after_s: int = 1
    # Per-request limits, checked before any tokenizing or engine work.
    max_n: int | None = None  # None: half the engine's max_num_seqs (what can run at once)
    max_prompts_per_request: int = 256
    max_prompt_chars_per_token: int = 32  # x max_model_len = characters accepted per prompt
    max_stop_strings: int = 64  # stop (and bad_words) strings per request
    max_stop_string_chars: int = 1024
    # A body limit; the server applies the smaller of this and what the other limits let a valid
    # request need (`OpenAIServer.max_request_body_bytes`).
    max_request_body_bytes: int = 32 * 2**20
    # Chat templates: rendered in worker processes, each render bounded in time.
    trust_request_chat_template: bool = False  # vLLM's --trust-request-chat-template
    chat_template_timeout: float = 5.0
    chat_template_workers: int = 2
    prestart_chat_template_worker: bool = False  # at start-up (the CLI does; tests need not)
    # Connections.
    max_connections: int | None = 1000
    request_header_timeout: float | None = 10.0
    request_body_timeout: float | None = 60.0
    timeout_keep_alive: float = 5.0  # uvicorn's name and default
    # CPU cores left to the event loop and the server's workers (vLLM's
    # VLLM_CPU_NUM_OF_RESERVED_CPU; the CLI reads ENGINE_CPU_NUM_OF_RESERVED_CPU or that). An
    # integer: the engine always steps with that many fewer torch threads than torch's default
    # (0: every core). "auto": every core while the machine is otherwise quiet, one fewer while
    # other work competes for the cores (engine/cpu_contention.py).
    reserved_cpus: int | Literal["auto"] = "auto"
    # Tool calling (vLLM's flags): tool_choice "auto" (the default when a request has tools)
    # needs both; the parser reads tool calls out of the model's text.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a name of engine.tool_parsers (hermes, llama3_json)
    # Structured outputs: wrap the tokenizer for the grammar engine at start-up (about a second
    # for a 49k vocabulary) rather than on the engine thread at the first structured request.
    warm_structured_outputs: bool = False

    def __post_init__(self) -> None:
        # ValueError naming the field; "AUTO" or "1" (a string) become "auto" or 1.
        object.__setattr__(
            self, "reserved_cpus", parse_reserved_cpus(self.reserved_cpus, "reserved_cpus")
        )
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError listing the known names
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")


class OpenAIServer:
    """Owns the AsyncEngine, the input processor, the metrics and the aiohttp application."""

    def __init__(self, engine: LLMEngine, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.model_config = engine.model_config
        self.max_model_len = self.model_config.max_model_len
        # Default: half of what can run at once, so one request's samples never hold every
        # running slot (measured, demo model: with n = max_num_seqs = 256 a concurrent 8-token
        # request waited 8.9 s for a slot; with n = 128 it ran at once, 217 ms in a batch of 129).
        max_n = self.config.max_n or max(1, engine.scheduler_config.max_num_seqs // 2)
        if self.config.max_waiting_requests is not None:
            max_n = min(max_n, self.config.max_waiting_requests)
        self.limits = P.RequestLimits(
            max_n=max_n,
            max_prompts=self.config.max_prompts_per_request,
            max_prompt_chars=self.config.max_prompt_chars_per_token * self.max_model_len,
            max_stop_strings=self.config.max_stop_strings,
            max_stop_chars=self.config.max_stop_string_chars,
            trust_request_chat_template=self.config.trust_request_chat_template,
        )
        # The largest body a valid request can need: its most prompts, each of the most
        # characters, plus 1 MiB for every other field. Bigger bodies are refused before they are
        # read (on their Content-Length) or while they arrive, never parsed on the event loop.
        self.max_request_body_bytes = min(
            self.config.max_request_body_bytes,
            self.limits.max_prompts * self.limits.max_prompt_chars + 2**20,
        )
        # Bodies over 256 KiB are parsed in a worker process (json.loads holds the GIL), and one
        # holding more JSON values than a valid request can (its most token-id prompts at full
        # context, plus a logit_bias / allowed_token_ids over the vocabulary) is refused there.
        self.body_parser = BodyParser(
            max_values=self.limits.max_prompts * self.max_model_len
            + 2 * self.model_config.vocab_size
            + 2**16
        )
        # The loop's own tokenizer: single tokens' text for logprobs (see the module docstring).
        self.tokenizer = load_tokenizer(
            self.model_config.tokenizer_path, trust_remote_code=self.model_config.trust_remote_code
        )
        self.inputs = InputProcessor(
            self.model_config.tokenizer_path,
            trust_remote_code=self.model_config.trust_remote_code,
            vocab_size=self.model_config.vocab_size,
            chat_template=self.config.chat_template,
            max_prompt_chars=self.limits.max_prompt_chars,
            template_timeout_s=self.config.chat_template_timeout,
            template_workers=self.config.chat_template_workers,
        )
        self.model_names = self.config.served_model_names or (self.model_config.model,)
        # Defaults of the sampling fields a request does not set (the model's generation config).
        self.generation_defaults = engine.generation_defaults
        # The parser for tool_choice "auto" (None: such requests get vLLM's 400).
        self.auto_tool_parser: type[ToolParser] | None = None
        if self.config.enable_auto_tool_choice and self.config.tool_call_parser is not None:
            self.auto_tool_parser = get_tool_parser(self.config.tool_call_parser)
        self._engine = engine
        self.metrics = ServerMetrics(
            self.model_names[0],
            lambda: self.async_engine.stats,
            cpu_threads=lambda: self.async_engine.cpu_threads,
            cpu_contention=self._cpu_contention,
        )
        self.async_engine = AsyncEngine(
            engine,
            max_waiting_requests=self.config.max_waiting_requests,
            observer=self.metrics,
            num_threads=engine_threads(self.config.reserved_cpus),
        )
        self.connections = ConnectionGuard(
            self.config.max_connections, self.config.request_header_timeout
        )
        self.created = int(time.time())
        self._shutting_down = False
        self._force_shutdown: asyncio.Event | None = None
        self._log_task: asyncio.Task[None] | None = None

    # ---- application -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._error_middleware, self._gate_middleware],
            client_max_size=self.max_request_body_bytes,
        )
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.retrieve_model)
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
        self.connections.request_started(request.transport)  # its headers have all arrived
        try:
            return await handler(request)
        except P.APIError as e:
            return _error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = e.reason
            if e.status == 404:
                message = f"Route {request.method} {request.path} not found"
            elif e.status == 405:
                message = f"Method {request.method} is not allowed on {request.path}"
            elif e.status == 413:
                message = (
                    "The request body is too large: this server accepts at most "
                    f"{self.max_request_body_bytes} bytes (--max-request-body-bytes, or "
                    "--max-prompts-per-request x --max-prompt-chars-per-token x max_model_len "
                    "+ 1 MiB when smaller)"
                )
                # Part of the body is unread: the connection cannot carry another request.
                response = _error_response(P.APIError(message, status=e.status))
                response.force_close()
                return response
            return _error_response(P.APIError(message, status=e.status))
        except Exception:
            logger.exception("error while handling %s %s", request.method, request.path)
            return _error_response(P.APIError("Internal server error", status=500))
        finally:
            self.connections.request_finished(request.transport)

    @web.middleware
    async def _gate_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._shutting_down:
            raise P.APIError("The server is shutting down", status=503)
        key = self.config.api_key
        if (
            key is not None
            and request.path != "/health"
            and not _authorized(request.headers.get("Authorization", ""), key)
        ):
            raise P.APIError(
                "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="engine"'},
            )
        return await handler(request)

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object; its upload must finish within request_body_timeout. A
        body whose Content-Length is over the limit is refused before any of it is read."""
        declared = request.content_length
        if declared is not None and declared > self.max_request_body_bytes:
            _refuse_body(request)
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_request_body_bytes, actual_size=declared
            )
        timeout = self.config.request_body_timeout
        try:
            raw = await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on; a different class on 3.10
            raise P.APIError(
                f"The request body did not arrive within {timeout:g} s", status=408
            ) from None
        if self.body_parser.is_inline(raw):
            return P.parse_json_body(raw)
        try:  # in the parser's worker process, waited for on a thread
            return await asyncio.to_thread(self.body_parser.parse, raw)
        except BodyError as e:
            raise P.APIError(e.message, param=e.param) from e

    # ---- simple routes ---------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        cards = [P.model_card(n, self.max_model_len, self.created) for n in self.model_names]
        return web.json_response(P.models_list(cards))

    async def retrieve_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.model_names:
            raise P.APIError(f"The model `{name}` does not exist.", status=404, param="model")
        return web.json_response(P.model_card(name, self.max_model_len, self.created))

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
        body = await self._read_json(request)
        self._model_name(P.get_field(body, "model", "str"))
        if "messages" in body:
            chat = P.parse_chat_request(body, self.model_config.max_logprobs, self.limits)
            token_ids = await self.inputs.render_chat(chat)
        else:
            prompt = P.get_field(body, "prompt", "str")
            if prompt is None:
                raise P.APIError("prompt (a string) or messages is required", param="prompt")
            P.check_prompt_chars(len(prompt), self.limits)
            add_special = P.get_field(body, "add_special_tokens", "bool", True)
            token_ids = await self.inputs.tokenize(prompt, add_special)
        token_strs = None
        if P.get_field(body, "return_token_strs", "bool", False):
            token_strs = await self.inputs.token_strs(token_ids)
        return web.json_response(
            {
                "count": len(token_ids),
                "max_model_len": self.max_model_len,
                "tokens": token_ids,
                "token_strs": token_strs,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        self._model_name(P.get_field(body, "model", "str"))
        tokens = P.get_field(body, "tokens", "int_list")
        if tokens is None:
            raise P.APIError("tokens (an array of token ids) is required", param="tokens")
        return web.json_response({"prompt": await self.inputs.detokenize(tokens)})

    # ---- helpers ---------------------------------------------------------------------------------

    def _model_name(self, requested: str | None) -> str:
        """The name to answer with; a 404 for a model this server does not serve."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise P.APIError(f"The model `{requested}` does not exist.", status=404, param="model")
        return requested

    async def _structured_outputs(self, body: dict[str, Any], chat: bool) -> Any:
        """The request's StructuredOutputsParams, checked and compiled in a worker thread (a
        schema's cost grows with its size; the loop keeps serving meanwhile)."""
        if not P.asks_for_structured_outputs(body, chat):
            return None
        return await asyncio.to_thread(P.read_structured_outputs, body, chat)

    def _tool_parser(self, req: P.ChatRequest) -> ToolParser | None:
        """The parser of the request's tool calls: the forced one for tool_choice required / a
        named function, the --tool-call-parser for auto; None for none."""
        forced = forced_tool_call_parser(req.tool_choice)
        if forced is not None:
            return forced
        if req.tool_choice != "auto":
            return None
        if self.auto_tool_parser is None:
            raise P.APIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set",
                param="tool_choice",
            )
        return self.auto_tool_parser()

    def _check_total_samples(self, num_prompts: int, n: int) -> None:
        """A request whose samples could never all wait at once would only ever get 503s."""
        limit = self.config.max_waiting_requests
        if limit is not None and num_prompts * n > limit:
            raise P.APIError(
                f"{num_prompts} prompts x n={n} is more samples than this server ever admits "
                f"at once (max_waiting_requests={limit})",
                param="n",
            )

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
            param = P.field_named_in(message, P.SAMPLING_FIELDS)
            if param is None and message.startswith("prompt"):
                param = "prompt"
            if param is None:  # a grammar that does not compile for this tokenizer
                param = P.structured_error(error).param
            return P.APIError(message, param=param)
        logger.error("request failed: %s", error, exc_info=error)
        return P.APIError("Internal server error", status=500)

    # ---- /v1/completions -------------------------------------------------------------------------

    async def create_completion(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        req = P.parse_completion_request(
            body, self.model_config.max_logprobs, self.limits, self.generation_defaults
        )
        model = self._model_name(req.model)
        structured = await self._structured_outputs(body, chat=False)
        n = int(req.sampling.get("n", 1))
        self._check_total_samples(len(req.prompts), n)
        encoded = await self.inputs.encode_prompts(req.prompts, need_text=req.echo)
        echo_only = req.max_tokens == 0  # echo with max_tokens 0: return the prompt only
        params = []
        for _, token_ids in encoded:
            max_tokens = P.check_length(len(token_ids), max(req.max_tokens, 1), self.max_model_len)
            sampling = {**req.sampling, "max_tokens": max_tokens, "logprobs": req.logprobs}
            if structured is not None:
                sampling["structured_outputs"] = structured
            params.append(P.make_sampling_params(sampling, delta=True))
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await self._add_all(
            response_id, [ids for _, ids in encoded], [t for t, _ in encoded], params
        )
        job = CompletionJob(self.tokenizer, req, model, response_id, created, encoded, echo_only)
        if req.stream:
            return await stream_sse(request, streams, job.chunks, self._api_error)
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
        body = await self._read_json(request)
        req = P.parse_chat_request(
            body, self.model_config.max_logprobs, self.limits, self.generation_defaults
        )
        model = self._model_name(req.model)
        tool_parser = self._tool_parser(req)
        structured = await self._structured_outputs(body, chat=True)
        token_ids = await self.inputs.render_chat(req)
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = P.check_length(
            len(token_ids),
            req.max_tokens,
            self.max_model_len,
            param,
            fit=req.max_tokens_from_config,
        )
        sampling = {
            **req.sampling,
            "max_tokens": max_tokens,
            "logprobs": req.top_logprobs if req.logprobs else None,
        }
        if structured is not None:
            sampling["structured_outputs"] = structured
        params = P.make_sampling_params(sampling, delta=True)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await self._add_all(response_id, [token_ids], [None], [params])
        job = ChatJob(
            self.tokenizer, req, model, response_id, created, len(token_ids), params.n, tool_parser
        )
        if req.stream:
            return await stream_sse(request, streams, job.chunks, self._api_error)
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
        install_log_rate_limits()
        structured = getattr(self._engine, "structured", None)
        if self.config.warm_structured_outputs and structured is not None:
            try:  # before the engine thread owns the engine
                _ = structured.compiler
            except Exception as e:  # the first structured request will say what is wrong
                logger.warning("structured outputs: the grammar engine is not ready: %s", e)
        self.async_engine.start()
        if self.config.prestart_chat_template_worker:
            self.inputs.prestart()
        runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,  # a client that goes away cancels (and aborts) its request
            access_log=logging.getLogger("engine.server.access")
            if self.config.access_log
            else None,
            access_log_format='%a "%r" %s %Tfs',
            keepalive_timeout=self.config.timeout_keep_alive,
            shutdown_timeout=0.5,  # what is still open then was aborted by shutdown() anyway
        )
        await runner.setup()
        await GuardedSockSite(runner, sock, self.connections).start()
        if self.config.log_stats_interval:
            self._log_task = asyncio.create_task(self._log_stats(self.config.log_stats_interval))
        return runner

    async def shutdown(self, runner: web.AppRunner) -> None:
        """Stops accepting, lets in-flight requests finish (up to shutdown_timeout), ends the
        rest with an error (SSE error event / 503), then aborts every connection still open
        (a client that stopped reading cannot hold the shutdown) and stops the engine."""
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
        grace = loop.time() + 0.5  # for the error events to go out to clients that read
        while self.connections.num_open and loop.time() < grace:
            await asyncio.sleep(0.02)
        if aborted := self.connections.abort_all():
            logger.info("closed %d connections still open at shutdown", aborted)
        await runner.cleanup()
        await self.async_engine.shutdown()
        if self.async_engine.stopped:  # nobody steps the engine any more
            self._engine.shutdown()  # tensor parallelism: stops its worker processes
        self.inputs.close()
        self.body_parser.close()
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

    def _cpu_contention(self) -> float | None:
        adaptive = self.async_engine.adaptive
        return adaptive.others_cores if adaptive is not None and adaptive.enabled else None

    def _cpu_summary(self) -> ThreadsSummary | None:
        adaptive = self.async_engine.adaptive
        if adaptive is None or not adaptive.enabled:
            return None
        return adaptive.summary(reset_max=True)

    async def _log_stats(self, interval: float) -> None:
        stats_logger = StatsLogger(lambda: self.async_engine.stats, cpu=self._cpu_summary)
        while True:
            await asyncio.sleep(interval)
            line = stats_logger.line()
            if line is not None:
                logger.info(line)
            cpu_line = stats_logger.cpu_line()  # None unless the reservation measured something
            if cpu_line is not None:
                logger.info(cpu_line)


def engine_threads(reserved_cpus: int | Literal["auto"]) -> int | Literal["auto"] | None:
    """The engine thread's torch threads when `reserved_cpus` cores are left to the rest of the
    server (None: torch's default, all cores; "auto": chosen before each step, see
    engine/cpu_contention.py). Why reserve: an OpenMP team as large as the machine waits at
    every op for any member the kernel has preempted, so each thread the server (or anything
    else) runs on those cores stalls every step, not just its own share: measured on 2 shared
    cores, one engine thread took 6-9 ms per decode step of the demo model where two took
    54-327 ms."""
    if reserved_cpus == AUTO:
        return AUTO
    if reserved_cpus <= 0:
        return None
    import torch

    return max(1, torch.get_num_threads() - reserved_cpus)


# How long a connection whose body was refused stays open for its client to read the 413.
_REFUSED_BODY_LINGER_S = 0.5


def _refuse_body(request: web.Request) -> None:
    """Stops reading a request whose body is refused unread, and closes its connection once the
    client has had `_REFUSED_BODY_LINGER_S` to read the error. aiohttp would otherwise read and
    discard the whole upload (up to 10 s of it) on the event loop; closing at once would make
    the kernel reset the connection over the unread bytes, which can destroy the reply."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    transport.pause_reading()  # type: ignore[attr-defined]
    asyncio.get_running_loop().call_later(_REFUSED_BODY_LINGER_S, transport.close)


def _authorized(header: str, key: str) -> bool:
    """`Authorization: Bearer <key>`; the scheme is case-insensitive (RFC 7235). Compared as
    bytes (a header with a non-UTF-8 byte is simply wrong, never an error)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))


def _error_response(error: P.APIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)
