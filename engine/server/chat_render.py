"""Chat templates for the server: message normalisation and bounded rendering in worker processes.

* `detect_content_format(template)`: whether a template iterates a message's `content` as a list
  of parts ("openai") or prints it as a string ("string"), found from the template's syntax tree
  as vLLM does. `prepare_messages` then hands each template the shape it expects: text parts
  joined with newlines for "string" templates, a list of parts for "openai" ones; `content: null`
  (an assistant turn that only calls tools) becomes "" or []; tool-call `arguments` given as a
  JSON string become an object, which is what templates that iterate arguments expect.
* `ChatTemplateRenderer`: renders to text in a small pool of worker processes
  (`template_worker.py`; the caller tokenizes, as `apply_chat_template` does, without special
  tokens). Each render has a time limit (the worker interrupts itself when it runs over, and
  is killed and replaced when it does not answer `KILL_GRACE_S` later), an address-space limit
  and a limit on the rendered text's length; workers run at a lower CPU priority (`niceness`).
  Calls block, so the server makes them from a thread, never from its event loop.

Invariant: a failed or timed-out render raises `ChatTemplateError` (a ValueError: HTTP 400) and
leaves the pool with the same number of usable workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import nodes

from engine.server.body_parser import PipeWorker

__all__ = [
    "ChatTemplateError",
    "ChatTemplateRenderer",
    "detect_content_format",
    "prepare_messages",
]

ContentFormat = Literal["string", "openai"]
_HEADER = struct.Struct(">I")
_WORKER = Path(__file__).with_name("template_worker.py")
# How long after its own timer a worker that has not answered is killed (it is stuck in one
# long C-level operation, which the timer cannot interrupt).
KILL_GRACE_S = 1.0


class ChatTemplateError(ValueError):
    """The chat template could not be applied (bad template, too slow, too big)."""


# ---- content format --------------------------------------------------------------------------


def _is_content(node: nodes.Node) -> bool:
    """`x.content` / `x['content']`."""
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return False


@functools.lru_cache(maxsize=32)
def detect_content_format(template: str) -> ContentFormat:
    """The content format a template expects: "openai" when it loops over a message's content
    (`for part in message['content']`), else "string" (also for an unparsable template)."""
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return "string"
    for loop in tree.find_all(nodes.For):
        iterated = loop.iter
        while isinstance(iterated, nodes.Filter) and iterated.node is not None:
            iterated = iterated.node  # `message.content | selectattr(...)`
        if _is_content(iterated):
            return "openai"
    return "string"


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def prepare_messages(
    messages: list[dict[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """Messages in the shape the template expects (see the module docstring); copies."""
    prepared = []
    for message in messages:
        message = dict(message)
        parts = _parts(message.get("content"))
        if content_format == "string":
            message["content"] = "\n".join(p["text"] for p in parts if p.get("type") == "text")
        else:
            message["content"] = parts
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_tool_call_arguments(call) for call in message["tool_calls"]]
        prepared.append(message)
    return prepared


def _tool_call_arguments(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError, RecursionError):
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


# ---- worker processes ------------------------------------------------------------------------


class _Worker(PipeWorker):
    """One worker process and its pipes; used by one thread at a time."""

    name = "chat template worker"

    def __init__(self, memory_limit: int, niceness: int) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER), str(memory_limit), str(niceness)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._ready = False

    def wait_ready(self, start_timeout: float) -> None:
        if not self._ready:
            self._read(time.monotonic() + start_timeout)  # {"ready": true} once loaded
            self._ready = True

    def call(self, request: dict[str, Any], timeout: float, start_timeout: float) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wait_ready(start_timeout)
        data = json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()
        return self._read(time.monotonic() + timeout)

    def _read(self, deadline: float) -> Any:
        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
        return json.loads(self._read_exact(size, deadline).decode("utf-8"))


class ChatTemplateRenderer:
    """A pool of `num_workers` template worker processes, started on first use.

    `render` blocks (call it from a thread): it waits for a free worker (started workers are
    reused first) and returns the rendered text. `timeout_s` bounds one render (a render that
    runs over is interrupted inside its worker, which stays; one that does not answer
    `KILL_GRACE_S` later has its worker killed); `start_timeout_s` bounds a worker's start
    (importing transformers' template module); `niceness` lowers the workers' CPU priority.
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        start_timeout_s: float = 60.0,
        memory_limit_bytes: int = 4 * 2**30,
        niceness: int = 10,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.memory_limit_bytes = memory_limit_bytes
        self.niceness = niceness
        self.num_spawned = 0  # worker processes started so far (tests, diagnostics)
        # Free slots, last in first out so a started worker is reused before a new one starts;
        # None means "no process yet" (started lazily by whoever takes the slot).
        self._free: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(num_workers):
            self._free.put(None)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str,
        add_generation_prompt: bool,
        kwargs: dict[str, Any],
        max_chars: int,
    ) -> str:
        """The rendered conversation; `kwargs` reach the template (`tools` and `documents`
        included); more than `max_chars` characters is a ChatTemplateError."""
        kwargs = dict(kwargs)
        request = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "chat_template": chat_template,
            "tools": kwargs.pop("tools", None),
            "documents": kwargs.pop("documents", None),
            "kwargs": kwargs,
            "max_chars": max_chars,
            "timeout_s": self.timeout_s,
        }
        worker = self._free.get()
        try:
            if self._closed:
                raise ChatTemplateError("the server is shutting down")
            if worker is None:
                worker = self._spawn()
            try:
                reply = worker.call(request, self.timeout_s + KILL_GRACE_S, self.start_timeout_s)
            except TimeoutError:
                self._discard(worker)
                worker = None
                raise ChatTemplateError(
                    f"rendering the chat template took longer than {self.timeout_s:g} s"
                ) from None
            except (EOFError, OSError, ValueError):
                self._discard(worker)
                worker = None
                raise ChatTemplateError(
                    "rendering the chat template failed (its worker process exited)"
                ) from None
        finally:
            self._free.put(worker)
        if reply.get("timeout"):
            raise ChatTemplateError(
                f"rendering the chat template took longer than {self.timeout_s:g} s"
            )
        if "error" in reply:
            raise ChatTemplateError(str(reply["error"]))
        return str(reply["text"])

    def prestart(self) -> None:
        """Starts one worker and waits until it is ready (blocking), so the first chat request
        does not pay for the start; a worker that fails to start is dropped."""
        worker = self._free.get()
        try:
            if worker is None and not self._closed:
                worker = self._spawn()
                try:
                    worker.wait_ready(self.start_timeout_s)
                except (TimeoutError, EOFError, OSError, ValueError):
                    self._discard(worker)
                    worker = None
        finally:
            self._free.put(worker)

    def close(self) -> None:
        """Kills every worker (idempotent); later renders fail."""
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_limit_bytes, self.niceness)
        with self._lock:
            self.num_spawned += 1
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.kill()
