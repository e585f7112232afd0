"""AsyncEngine: the LLMEngine stepped by a background thread, with per-request async streams.

Two threads, one owner each:

* The **engine thread** owns the `LLMEngine` (which is not thread-safe): it is the only thread
  that ever calls it. Between steps it drains a thread-safe command queue (add / abort / stop),
  then runs one `step()` and hands the step's outputs to the event loop in one
  `loop.call_soon_threadsafe` call. While the engine has nothing to do it blocks on the queue.
  It is the only thread with an OpenMP team: `start()` and `add_request` free the loop thread's
  (`engine.openmp.release_openmp_pool`), else the step's workers sleep and wake at every op.
  Its team's size is `num_threads`: fixed, or with `"auto"` chosen before each step by an
  `engine.cpu_contention.AdaptiveThreads` (all cores while the machine is otherwise quiet, one
  fewer while other work competes for them); `torch.set_num_threads` runs only on a change.
* The **event-loop thread** owns every `RequestStream` and all bookkeeping about them (the
  waiting count, the stream table, metric observations). It never touches the `LLMEngine`.

Invariants:

* A request is registered in the stream table before its add command is queued, so no output
  can arrive for an unknown stream; it leaves the table when its last output is dispatched, when
  it fails, or when its stream is closed (which queues an abort, freeing its blocks at once).
* `num_waiting_requests` counts the *samples* (`n` per request) of requests accepted here that
  have not produced their first output yet (queued adds included); `add_request` refuses with
  `QueueFullError` beyond `max_waiting_requests`, so neither a flood of clients nor a few
  requests with a huge `n` can grow an unbounded queue.
* Every add command's future is resolved exactly once: the engine thread claims it with
  `set_running_or_notify_cancel()` before adding (so a handler cancelled at any moment either
  finds its add skipped or finds it done and aborts it), and if the engine thread dies, every add
  still pending fails with `EngineDeadError` (those already queued and those queued later).
* A request's stream follows its `output_kind`. CUMULATIVE outputs (full text and token ids so
  far): a stream whose consumer is slower than the engine keeps only the newest one. DELTA
  outputs (only what is new, what the server uses so a step's cost does not grow with the
  length of the outputs): a stream keeps the deltas its consumer has not taken yet and hands
  them over merged into one (`merge_deltas`), so a slow consumer loses nothing; `final()` merges
  every delta into the complete output.
* A failing `step()` fails the requests that were in the engine (their streams raise
  `EngineStepError`), aborts them so no block leaks, and the engine keeps serving new requests.
  Only if that clean-up fails too is the engine declared dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from engine.config import EngineArgs
from engine.cpu_contention import AUTO, AdaptiveThreads
from engine.cpu_malloc import HeapTrimmer
from engine.engine import EngineStats, LLMEngine, PromptType
from engine.openmp import release_openmp_pool
from engine.request import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "EngineShutdownError",
    "EngineStepError",
    "QueueFullError",
    "RequestObserver",
    "RequestStream",
    "merge_deltas",
    "merge_streams",
]

# How long the engine thread waits for a command after a step that produced no output (a
# chunked-prefill step, or a scheduler with nothing it can admit): short enough not to slow real
# work, long enough that a stuck queue does not spin a core.
_IDLE_STEP_WAIT_S = 0.001


class QueueFullError(RuntimeError):
    """Too many requests are waiting for their first token; retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped after an unrecoverable error."""


class EngineShutdownError(RuntimeError):
    """The engine was shut down while the request was in flight."""


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in it; the request was aborted."""


class RequestObserver(Protocol):
    """Receives per-request timings on the event-loop thread (the server's metrics)."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, finish_reasons: Sequence[str], e2e_s: float) -> None: ...


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    done: concurrent.futures.Future[None]


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


@dataclass(slots=True)
class _Stop:
    pass


_Command = _Add | _Abort | _Stop


class RequestStream:
    """The outputs of one request, as an async iterator of `RequestOutput`s (cumulative, or
    deltas for a DELTA request: then each item merges every delta not taken before it).

    Iteration ends after the output with `finished=True`. `close()` aborts the request if it has
    not finished (a client that went away); it is idempotent and safe after the end.
    """

    def __init__(
        self, request_id: str, owner: AsyncEngine, arrival_time: float, delta: bool = False
    ) -> None:
        self.request_id = request_id
        self.arrival_time = arrival_time  # time.monotonic() when accepted
        self.first_token_time: float | None = None
        self.delta = delta
        self._owner = owner
        self._latest: RequestOutput | None = None
        self._pending: list[RequestOutput] = []  # DELTA: deltas not taken yet, in order
        self._error: BaseException | None = None
        self._finished = False  # the final output has been received (or the stream failed)
        self._closed = False
        self._last_token_time: float | None = None
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending:
                pending, self._pending = self._pending, []
                return pending[0] if len(pending) == 1 else merge_deltas(pending)
            if self._latest is not None:
                out, self._latest = self._latest, None
                return out
            if self._error is not None:
                raise self._error
            if self._finished or self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()

    async def final(self) -> RequestOutput:
        """Waits for and returns the finished output: complete, also for a DELTA request, when
        nothing was taken from the stream before (what was taken is not in it)."""
        outs = [out async for out in self]
        if not outs or not outs[-1].finished:
            raise EngineShutdownError(f"request {self.request_id} ended without a final output")
        return merge_deltas(outs) if self.delta else outs[-1]

    def close(self) -> None:
        """Stops following the request; aborts it in the engine if it is still running."""
        if self._closed:
            return
        self._closed = True
        self._owner._on_stream_closed(self)
        self._event.set()

    # ---- called by the AsyncEngine on the event-loop thread ----------------------------------

    def _put(self, out: RequestOutput, stamp: float, observer: RequestObserver | None) -> None:
        if self._closed:
            return
        if observer is not None:
            if self.first_token_time is None:
                observer.on_first_token(stamp - self.arrival_time)
            elif self._last_token_time is not None:
                observer.on_inter_token(stamp - self._last_token_time)
            if out.finished:
                reasons = [c.finish_reason or "abort" for c in out.outputs]
                observer.on_finished(reasons, stamp - self.arrival_time)
        if self.first_token_time is None:
            self.first_token_time = stamp
        self._last_token_time = stamp
        if self.delta:
            self._pending.append(out)
        else:
            self._latest = out
        if out.finished:
            self._finished = True
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        if self._finished or self._closed:
            return
        self._error = error
        self._finished = True
        self._event.set()


class AsyncEngine:
    """Runs an `LLMEngine` on a background thread for asyncio code.

    Create and use it on one event loop: `start()` (or the first `add_request`) binds it to the
    running loop. `add_request` returns a `RequestStream`; `shutdown()` stops the thread.
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_waiting_requests: int | None = None,
        observer: RequestObserver | None = None,
        heap_trimmer: HeapTrimmer | None = None,
        num_threads: int | Literal["auto"] | AdaptiveThreads | None = None,
    ) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        if isinstance(num_threads, str) and num_threads != AUTO:
            raise ValueError(f"num_threads must be an integer >= 1 or 'auto', got {num_threads!r}")
        if isinstance(num_threads, int) and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        # torch intra-op (OpenMP) threads of the steps; None: torch's setting. Fewer threads than
        # cores leave cores to the event loop and the server's workers (see `engine_threads`).
        # "auto" (or an AdaptiveThreads, e.g. with injected readings): torch's setting while the
        # machine is otherwise quiet, one fewer while other work competes (engine/cpu_contention).
        self.num_threads = num_threads
        self.adaptive: AdaptiveThreads | None = (
            num_threads
            if isinstance(num_threads, AdaptiveThreads)
            else AdaptiveThreads()
            if num_threads == AUTO
            else None
        )
        self._cpu_threads: int | None = None  # the engine thread's current torch threads
        self.observer = observer
        # Called on the engine thread right before each step, inside its error handling: a hook
        # that raises makes that step fail like a real one (fault-injection soaks and tests).
        self.fault_hook: Any = None
        # Returns a spike's freed heap to the kernel (checked between steps, rate-limited).
        self.heap_trimmer = heap_trimmer if heap_trimmer is not None else HeapTrimmer()
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._stats: EngineStats = engine.get_stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        # Event-loop side.
        self._streams: dict[str, RequestStream] = {}
        self._waiting: dict[str, int] = {}  # request id -> samples (n) waiting for a 1st output
        self._num_waiting = 0  # sum of self._waiting's values
        self._pending_adds: set[concurrent.futures.Future[None]] = set()
        # Engine-thread side: ids added to the engine and not yet finished or aborted.
        self._live_ids: set[str] = set()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncEngine:
        return cls(LLMEngine(args), **kwargs)

    # ---- state readable from any thread --------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """The engine's counters after its latest step or command (a consistent snapshot)."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def stopped(self) -> bool:
        """No thread steps the engine (never started, or stopped): its owner may release it."""
        return self._thread is None or not self._thread.is_alive()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def num_waiting_requests(self) -> int:
        """Samples (`n` per request) accepted and still waiting for their first output."""
        return self._num_waiting

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def cpu_threads(self) -> int | None:
        """The torch threads the engine thread steps with now (None before it has started)."""
        return self._cpu_threads

    # ---- event-loop API ------------------------------------------------------------------------

    def start(self) -> None:
        """Binds to the running event loop and starts the engine thread (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        # The loop's thread usually loaded the model: its OpenMP team would make the step
        # thread's workers sleep and wake at every op (engine/openmp.py).
        release_openmp_pool()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> RequestStream:
        """Queues a request; returns its stream once the engine has accepted it.

        Raises QueueFullError when too many requests wait, ValueError when the engine rejects
        the request (nothing is added then), EngineDeadError / EngineShutdownError when the
        engine cannot take requests.
        """
        self.start()
        self._check_accepting()
        release_openmp_pool(rescan=False)  # the loop thread may have run a parallel op since
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        weight = max(1, int(params.n))
        if self.max_waiting_requests is not None and weight > self.max_waiting_requests:
            raise ValueError(
                f"n ({weight} samples) is more than this server ever admits at once "
                f"(max_waiting_requests={self.max_waiting_requests})"
            )
        if (
            self.max_waiting_requests is not None
            and self._num_waiting + weight > self.max_waiting_requests
        ):
            raise QueueFullError(
                f"{self._num_waiting} samples are already waiting for their first token and "
                f"this request adds {weight} (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later"
            )
        delta = params.output_kind is RequestOutputKind.DELTA
        stream = RequestStream(request_id, self, arrival_time=time.monotonic(), delta=delta)
        self._streams[request_id] = stream
        self._set_waiting(request_id, weight)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._pending_adds.add(done)
        self._commands.put(_Add(request_id, prompt, params, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            # The add may have happened on the engine thread: the abort queued behind it undoes it.
            stream.close()
            raise
        except BaseException:
            self._forget(request_id)
            stream._closed = True
            raise
        finally:
            self._pending_adds.discard(done)
        return stream

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Aborts requests (their streams end without a final output); unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.close()

    def fail_all(self, error: BaseException) -> None:
        """Ends every in-flight request with `error` and aborts them in the engine."""
        streams = list(self._streams.values())
        for stream in streams:
            stream._fail(error)
            self._forget(stream.request_id)
        if streams:
            self._commands.put(_Abort([s.request_id for s in streams]))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fails in-flight requests, stops the engine thread and waits for it."""
        self._stopping = True
        self.fail_all(EngineShutdownError("the server is shutting down"))
        self._commands.put(_Stop())
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(
                f"the engine has stopped after an error: {type(self._dead).__name__}"
            )
        if self._stopping:
            raise EngineShutdownError("the server is shutting down")

    def _set_waiting(self, request_id: str, weight: int) -> None:
        self._num_waiting += weight - self._waiting.pop(request_id, 0)
        if weight:
            self._waiting[request_id] = weight

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._set_waiting(request_id, 0)

    def _on_stream_closed(self, stream: RequestStream) -> None:
        # Still in the table and not finished: the engine may hold it (or its add is queued).
        in_flight = stream.request_id in self._streams and not stream.finished
        self._forget(stream.request_id)
        if in_flight:
            if self.observer is not None:
                self.observer.on_finished(["abort"], time.monotonic() - stream.arrival_time)
            self._commands.put(_Abort([stream.request_id]))

    def _dispatch(self, outputs: list[RequestOutput], stamp: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # closed by its consumer; its abort is on the way
            self._set_waiting(out.request_id, 0)
            stream._put(out, stamp, self.observer)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_requests(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._fail(error)
            self._forget(request_id)

    def _on_dead(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine has stopped after an error: {type(error).__name__}")
        for done in list(self._pending_adds):  # adds the dead thread will never take
            _resolve(done, dead)
        self.fail_all(dead)

    # ---- engine thread -------------------------------------------------------------------------

    def _post(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(callback, *args)

    def _init_threads(self) -> None:
        """Sets this thread's OpenMP team size (torch's setting is per thread) and starts the
        adaptive choice, if any."""
        import torch

        if isinstance(self.num_threads, int):
            torch.set_num_threads(self.num_threads)
        if self.adaptive is not None:
            self.adaptive.start(default_threads=torch.get_num_threads())
            torch.set_num_threads(self.adaptive.threads)
        self._cpu_threads = torch.get_num_threads()

    def _adapt_threads(self) -> None:
        """Before a step: applies the adaptive thread count when it changed (~0.2 us a switch,
        measured with libgomp; the check itself is a clock comparison between windows)."""
        if self.adaptive is None:
            return
        try:
            threads = self.adaptive.next_step_threads()
        except Exception:  # a bug there must not stop the engine: every thread from now on
            logger.exception("the adaptive CPU reservation failed; stepping with every thread")
            threads, self.adaptive = self.adaptive.max_threads, None
        if threads != self._cpu_threads:
            import torch

            torch.set_num_threads(threads)
            self._cpu_threads = threads

    def _run(self) -> None:
        engine = self.engine
        try:
            self._init_threads()
            idle_wait: float | None = None
            while True:
                busy = engine.has_unfinished_requests()
                # Idle: wake up now and then anyway, so a spike's heap is trimmed while idle.
                commands = self._take_commands(
                    block=not busy, timeout=self.heap_trimmer.interval_s if not busy else idle_wait
                )
                if any(isinstance(c, _Stop) for c in commands):
                    self._reject_adds(commands)
                    break
                for command in commands:
                    self._apply(command)
                idle_wait = None
                if engine.has_unfinished_requests():
                    self._adapt_threads()
                    produced = self._step()
                    idle_wait = None if produced else _IDLE_STEP_WAIT_S
                self._stats = engine.get_stats()
                self.heap_trimmer.maybe_trim()
        except BaseException as e:  # the engine's state is unknown: stop taking work
            logger.exception("the engine thread stopped after an error")
            self._dead = e
            dead = EngineDeadError(f"the engine has stopped after an error: {type(e).__name__}")
            self._reject_adds(self._take_commands(block=False, timeout=None), dead)
            self._post(self._on_dead, e)

    def _take_commands(self, block: bool, timeout: float | None) -> list[_Command]:
        commands: list[_Command] = []
        try:
            if block or timeout is not None:
                commands.append(self._commands.get(timeout=timeout))
        except queue.Empty:
            pass
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Add):
            # Claim the future: from here on the handler's cancellation cannot cancel it (it
            # queues an abort instead), so resolving it below cannot raise InvalidStateError.
            if not command.done.set_running_or_notify_cancel():
                return  # cancelled while queued: nothing to add
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except Exception as e:
                _resolve(command.done, e)
                return
            self._live_ids.add(command.request_id)
            _resolve(command.done, None)
        elif isinstance(command, _Abort):
            live = [i for i in command.request_ids if i in self._live_ids]
            if live:
                self.engine.abort_request(live)
                self._live_ids.difference_update(live)

    def _reject_adds(self, commands: list[_Command], error: BaseException | None = None) -> None:
        for command in commands:
            if isinstance(command, _Add):
                _resolve(command.done, error or EngineShutdownError("the server is shutting down"))

    def _step(self) -> bool:
        """One engine step; True when it produced outputs."""
        try:
            if self.fault_hook is not None:
                self.fault_hook()  # fault injection (bench/fault_soak.py): may raise
            outputs = self.engine.step()
        except Exception as e:
            logger.exception(
                "engine step failed; failing the %d requests in it", len(self._live_ids)
            )
            failed = sorted(self._live_ids)
            self.engine.abort_request(failed)  # raising here kills the thread (see _run)
            self._live_ids.clear()
            error = EngineStepError(
                f"the engine failed while running this request: {type(e).__name__}: {e}"[:500]
            )
            self._post(self._fail_requests, failed, error)
            return True
        stamp = time.monotonic()
        for out in outputs:
            if out.finished:
                self._live_ids.discard(out.request_id)
        # Before the outputs leave: a client that saw its request finish then sees it in /metrics.
        self._stats = self.engine.get_stats()
        if outputs:
            self._post(self._dispatch, outputs, stamp)
        return bool(outputs)


def merge_deltas(deltas: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive DELTA outputs of one request joined into one (one pass, linear in their
    size): per sample index, the token ids, text and logprobs in order, and the newest finish
    state; the prompt logprobs of whichever carries them (the first output)."""
    pieces: dict[int, list[CompletionOutput]] = {}
    for delta in deltas:
        for c in delta.outputs:
            pieces.setdefault(c.index, []).append(c)
    outputs = []
    for index in sorted(pieces):
        parts = pieces[index]
        last = parts[-1]
        logprobs = None
        if any(p.logprobs is not None for p in parts):
            logprobs = [entry for p in parts for entry in (p.logprobs or [])]
        outputs.append(
            CompletionOutput(
                index=index,
                text="".join(p.text for p in parts),
                token_ids=[t for p in parts for t in p.token_ids],
                cumulative_logprob=last.cumulative_logprob,
                logprobs=logprobs,
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
            )
        )
    first, newest = deltas[0], deltas[-1]
    prompt_logprobs = next(
        (d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None
    )
    return RequestOutput(
        request_id=first.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=outputs,
        finished=newest.finished,
        prompt_logprobs=prompt_logprobs,
    )


def _resolve(done: concurrent.futures.Future[None], outcome: BaseException | None) -> None:
    """Sets an add's outcome unless it is already resolved or cancelled (from any thread)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)


async def merge_streams(
    streams: Sequence[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields (stream index, output) from several streams as outputs arrive, until all end."""
    if len(streams) == 1:  # the common case: no task per output
        async for out in streams[0]:
            yield 0, out
        return
    pending: dict[asyncio.Task[RequestOutput], int] = {}

    def follow(index: int) -> None:
        pending[asyncio.ensure_future(streams[index].__anext__())] = index

    for index in range(len(streams)):
        follow(index)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                follow(index)
                yield index, out
    finally:
        for task in pending:
            task.cancel()
