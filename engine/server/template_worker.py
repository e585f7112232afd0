"""The chat-template worker process: renders conversations to text, one at a time.

Run as a script (`python template_worker.py MEMORY_LIMIT [NICENESS]`) by
`engine.server.chat_render.ChatTemplateRenderer`, never imported by the server: it imports only
the standard library and transformers' chat-template module (`render_jinja_template`, the same
sandboxed Jinja environment `apply_chat_template` uses), so it starts without torch, the engine
or a tokenizer. The server tokenizes the text it returns.

Why a process: a Jinja template (the server's, or a request's when the operator trusts them) can
loop for minutes or build gigabytes of text, and the sandbox does not bound either. Here the
parent kills the process when it does not answer in time, the address-space limit (`RLIMIT_AS`)
turns a huge allocation into a `MemoryError`, and the rendered text is refused above
`max_chars` before it is sent back. Whatever the template does, the server's memory and event
loop are untouched.

Time: each render runs under an interval timer of the request's `timeout_s`. When it fires, the
render is interrupted between two Python operations and answered with a timeout error, so the
process survives and the next render does not pay for a new one (a start imports transformers:
about a second of CPU, which a stream of hostile templates would otherwise cost on every
request). The parent kills a worker only when it does not answer shortly after the timeout (a
template stuck in one long C-level operation).

CPU: the worker first lowers its own priority by NICENESS (default 10), so rendering, hostile
templates included, yields the cores to the server's event loop and engine thread when they are
scarce (measured: two workers looping on hostile templates took 1.4 of 2 cores at the default
priority and made normal requests several times slower).

Protocol on stdin / stdout: frames of a 4-byte big-endian length and a UTF-8 JSON object.
Request: {"messages", "add_generation_prompt", "chat_template", "tools", "documents", "kwargs",
"max_chars", "timeout_s"} (`kwargs` already holds the tokenizer's special tokens). Reply:
{"text": str}, {"error": message}, or {"error": message, "timeout": true}.
"""

from __future__ import annotations

import sys

# Run by path: its own directory (engine/server) must not shadow any module it imports.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    del sys.path[0]

import contextlib
import json
import os
import signal
import struct
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")
DEFAULT_NICENESS = 10


class RenderTimeout(BaseException):
    """Raised by the interval timer inside a render (a BaseException, so that no `except
    Exception` on the way, in Jinja or in transformers, can swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise RenderTimeout


def read_frame(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the parent closed the pipe: exit
    (size,) = _HEADER.unpack(header)
    return json.loads(stream.read(size).decode("utf-8"))


def write_frame(stream: BinaryIO, payload: Any) -> None:
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _limit_memory(limit_bytes: int) -> None:
    if limit_bytes <= 0:
        return
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit_bytes = min(limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))
    except (ImportError, ValueError, OSError):  # not POSIX: the timeout still bounds the work
        pass


def _lower_priority(niceness: int) -> None:
    if niceness > 0:
        with contextlib.suppress(AttributeError, OSError):  # not POSIX: the default priority
            os.nice(niceness)


def render(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request; the render is bounded by `request["timeout_s"]` (0: none)."""
    from transformers.utils.chat_template_utils import (
        _normalize_chat_messages,
        render_jinja_template,
    )

    timeout = float(request.get("timeout_s") or 0)
    try:
        if timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            rendered, _ = render_jinja_template(
                conversations=[_normalize_chat_messages(request["messages"])],
                tools=request.get("tools"),
                documents=request.get("documents"),
                chat_template=request["chat_template"],
                add_generation_prompt=request["add_generation_prompt"],
                **request["kwargs"],
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except RenderTimeout:
        return {"error": f"the render took longer than {timeout:g} s", "timeout": True}
    text = rendered[0]
    max_chars = int(request.get("max_chars") or 0)
    if max_chars and len(text) > max_chars:
        return {
            "error": f"the rendered prompt has {len(text)} characters, more than the "
            f"{max_chars} this server accepts"
        }
    return {"text": text}


def main(argv: list[str]) -> int:
    _lower_priority(int(argv[1]) if len(argv) > 1 else DEFAULT_NICENESS)
    import transformers.utils.chat_template_utils  # noqa: F401  (loaded before "ready")

    _limit_memory(int(argv[0]))
    signal.signal(signal.SIGALRM, _on_alarm)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    write_frame(stdout, {"ready": True})
    while True:
        request = read_frame(stdin)
        if request is None:
            return 0
        try:
            reply = render(request)
        except MemoryError:
            reply = {"error": "rendering the chat template ran out of its memory limit"}
        except RecursionError:
            reply = {"error": "the chat template or the messages are nested too deeply"}
        except RenderTimeout:  # the timer fired just after the render, outside its try
            reply = {"error": "the render took too long", "timeout": True}
        except Exception as e:  # jinja errors (raise_exception included), bad kwargs
            reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
        del request
        write_frame(stdout, reply)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
