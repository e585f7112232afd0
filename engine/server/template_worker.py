"""The chat-template worker process: renders conversations to text, one at a time.

Run as a script (`python template_worker.py MEMORY_LIMIT`) by
`engine.server.chat_render.ChatTemplateRenderer`, never imported by the server: it imports only
the standard library and transformers' chat-template module (`render_jinja_template`, the same
sandboxed Jinja environment `apply_chat_template` uses), so it starts without torch, the engine
or a tokenizer. The server tokenizes the text it returns.

Why a process: a Jinja template (the server's, or a request's when the operator trusts them) can
loop for minutes or build gigabytes of text, and the sandbox does not bound either. Here the
parent kills the process after a timeout, the address-space limit (`RLIMIT_AS`) turns a huge
allocation into a `MemoryError`, and the rendered text is refused above `max_chars` before it is
sent back. Whatever the template does, the server's memory and event loop are untouched.

Protocol on stdin / stdout: frames of a 4-byte big-endian length and a UTF-8 JSON object.
Request: {"messages", "add_generation_prompt", "chat_template", "tools", "documents", "kwargs",
"max_chars"} (`kwargs` already holds the tokenizer's special tokens). Reply: {"text": str} or
{"error": message}.
"""

from __future__ import annotations

import sys

# Run by path: its own directory (engine/server) must not shadow any module it imports.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    del sys.path[0]

import json
import os
import struct
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")


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


def main(argv: list[str]) -> int:
    from transformers.utils.chat_template_utils import (
        _normalize_chat_messages,
        render_jinja_template,
    )

    _limit_memory(int(argv[0]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    write_frame(stdout, {"ready": True})
    while True:
        request = read_frame(stdin)
        if request is None:
            return 0
        try:
            rendered, _ = render_jinja_template(
                conversations=[_normalize_chat_messages(request["messages"])],
                tools=request.get("tools"),
                documents=request.get("documents"),
                chat_template=request["chat_template"],
                add_generation_prompt=request["add_generation_prompt"],
                **request["kwargs"],
            )
            text = rendered[0]
            max_chars = int(request.get("max_chars") or 0)
            if max_chars and len(text) > max_chars:
                reply: dict[str, Any] = {
                    "error": f"the rendered prompt has {len(text)} characters, more than the "
                    f"{max_chars} this server accepts"
                }
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"error": "rendering the chat template ran out of its memory limit"}
        except RecursionError:
            reply = {"error": "the chat template or the messages are nested too deeply"}
        except Exception as e:  # jinja errors (raise_exception included), bad kwargs
            reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
        del request
        write_frame(stdout, reply)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
