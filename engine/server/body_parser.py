"""Request bodies as JSON objects; big bodies are parsed in a worker process.

`parse_json_object(raw)` holds the rules every body follows (a JSON object; no NaN/Infinity; a
body nested too deeply for the parser or holding a lone UTF-16 surrogate is a `BodyError`, which
the server answers with a 400).

Why a process for big bodies: `json.loads` is one C call that holds the GIL from start to end,
so on the event loop (or on any thread of the server) a body of 8M small numbers stops every
other request, `/health` and the engine thread included, for about 350 ms. `BodyParser` sends
bodies larger than `inline_bytes` to a worker process (this file run as a script, standard
library only, at a lower CPU priority). The worker parses the body, applies the same rules and
counts its JSON values: a body with more values than `max_values` (what a valid request can
hold: its most token-id prompts at full context, plus logit_bias and the like) is refused there
with a 400 naming the field that holds the most, so the server never unpickles more than a valid
request's worth of objects. Smaller bodies parse in place (at most a few ms).

Worker protocol on stdin / stdout: the parent sends `>QI` (max_values, body length) and the raw
body; the worker answers one byte (`o`: a pickled dict follows; `e`: a JSON
`{"message", "param"}` follows), a 4-byte big-endian length and the payload.

Invariant: `BodyParser.parse` returns a dict or raises `BodyError`; a worker that fails, dies or
takes longer than `timeout_s` is killed and replaced by the next call.
"""

from __future__ import annotations

import os
import sys

# Run by path (the worker): its own directory (engine/server) must not shadow any module.
if __name__ == "__main__" and sys.path and __file__.startswith(sys.path[0] or "\0"):
    del sys.path[0]

import contextlib
import json
import pickle
import re
import select
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "BodyError",
    "BodyParser",
    "PipeWorker",
    "count_values",
    "json_type",
    "parse_json_object",
]

_REQUEST = struct.Struct(">QI")  # max_values, body length
_LENGTH = struct.Struct(">I")
_HERE = Path(__file__)

# A `\uD800`-`\uDFFF` escape: the only way a JSON text can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB89a-fA-F][0-9a-fA-F]{2}")


class BodyError(ValueError):
    """The body is not an acceptable JSON object (HTTP 400); `param` names the field, if any."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def json_type(value: Any) -> str:
    """A JSON value's kind, as error messages name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a BodyError (also for nesting too deep to parse and for
    strings holding a lone UTF-16 surrogate, which no tokenizer can encode)."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw or b"null", parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"The request body is not valid JSON: {e}") from e
    except RecursionError:
        raise BodyError("The request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise BodyError(f"The request body must be a JSON object, got {json_type(body)}")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the body (pairs are fine)
        for name, value in body.items():
            if not _valid_unicode(name) or not _valid_unicode(value):
                raise BodyError(
                    f"{name} holds a lone UTF-16 surrogate (not valid Unicode text)",
                    param=name if _valid_unicode(name) else None,
                )
    return body


def _valid_unicode(value: Any) -> bool:
    """No string inside `value` holds a lone surrogate (iterative: any nesting depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return True


def count_values(value: Any, limit: int | None = None) -> int:
    """JSON values in `value`, itself and object keys included (iterative: any nesting depth);
    with `limit`, stops counting once past it (the result is then just above the limit)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            count += len(item)  # the keys
            stack.extend(item.values())
        if limit is not None and count > limit:
            break
    return count


def check_values(body: dict[str, Any], max_values: int) -> None:
    """A BodyError naming the field with the most values when `body` holds more than
    `max_values` JSON values (counting stops past the limit: its cost is bounded too)."""
    if count_values(body, max_values) > max_values:
        counts = {name: count_values(value, max_values) for name, value in body.items()}
        field = max(counts, key=counts.__getitem__) if counts else None
        raise BodyError(
            f"The request body holds more than {max_values} JSON values, the most a valid "
            f"request to this server holds (the most are in {field})",
            param=field,
        )


# ---- the worker process -------------------------------------------------------------------


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _worker_main(niceness: int) -> int:
    if niceness > 0:
        with contextlib.suppress(AttributeError, OSError):
            os.nice(niceness)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = _read_exact(stdin, _REQUEST.size)
        if header is None:
            return 0  # the parent closed the pipe
        max_values, size = _REQUEST.unpack(header)
        raw = _read_exact(stdin, size)
        if raw is None:
            return 0
        try:
            body = parse_json_object(raw)
            del raw
            check_values(body, max_values)
            kind, payload = b"o", pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
        except BodyError as e:
            kind = b"e"
            payload = json.dumps({"message": e.message, "param": e.param}).encode()
        except MemoryError:
            kind = b"e"
            payload = json.dumps({"message": "The request body is too large to parse"}).encode()
        body = None
        stdout.write(kind + _LENGTH.pack(len(payload)) + payload)
        stdout.flush()


# ---- the server side ----------------------------------------------------------------------


class PipeWorker:
    """A worker process spoken to over its stdin / stdout pipes (`proc`), with a deadline on
    every read. Shared by the body parser's worker and the chat-template workers
    (engine/server/chat_render.py); it lives here because this module must import only the
    standard library (it is also the body parser's worker script)."""

    proc: subprocess.Popen[bytes]
    name = "worker"  # in the EOFError of a worker that exited

    def _read_exact(self, size: int, deadline: float) -> bytes:
        """`size` bytes from the worker's stdout; TimeoutError past `deadline` (monotonic)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks: list[bytes] = []
        while size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size, 1 << 20))
            if not chunk:
                raise EOFError(f"the {self.name} exited")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


class _Worker(PipeWorker):
    name = "body parser worker"

    def __init__(self, niceness: int) -> None:
        # The script imports only the standard library: it starts in ~50 ms.
        self.proc = subprocess.Popen(
            [sys.executable, str(_HERE), str(niceness)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def call(self, raw: bytes, max_values: int, timeout: float) -> tuple[bytes, bytes]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_REQUEST.pack(max_values, len(raw)))
        self.proc.stdin.write(raw)  # a blocking write: it releases the GIL
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        head = self._read_exact(1 + _LENGTH.size, deadline)
        (size,) = _LENGTH.unpack(head[1:])
        return head[:1], self._read_exact(size, deadline)


class BodyParser:
    """Parses bodies: in place up to `inline_bytes`, else in one worker process (started on
    first use; calls are serialized, so big bodies wait for each other, not the event loop).
    `parse` blocks on a big body: call it from a thread (the pipe I/O releases the GIL)."""

    def __init__(
        self,
        *,
        max_values: int,
        inline_bytes: int = 256 * 2**10,
        timeout_s: float = 30.0,
        niceness: int = 10,
    ) -> None:
        self.max_values = max(max_values, inline_bytes // 2)
        self.inline_bytes = inline_bytes
        self.timeout_s = timeout_s
        self.niceness = niceness
        self.num_spawned = 0
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self._closed = False

    def is_inline(self, raw: bytes) -> bool:
        return len(raw) <= self.inline_bytes

    def parse(self, raw: bytes) -> dict[str, Any]:
        """The body as a dict, or a BodyError. An inline body is not counted: it holds at most
        `inline_bytes / 2` values, which `max_values` must allow (see `__init__`)."""
        if self.is_inline(raw):
            return parse_json_object(raw)
        with self._lock:
            if self._closed:
                raise BodyError("The server is shutting down")
            if self._worker is None:
                self._worker = _Worker(self.niceness)
                self.num_spawned += 1
            try:
                kind, payload = self._worker.call(raw, self.max_values, self.timeout_s)
            except (TimeoutError, EOFError, OSError, struct.error):
                self._worker.kill()
                self._worker = None
                raise BodyError(
                    "The request body could not be parsed: its parser process failed or took "
                    f"longer than {self.timeout_s:g} s"
                ) from None
        if kind == b"e":
            error = json.loads(payload)
            raise BodyError(error["message"], error.get("param"))
        body = pickle.loads(payload)  # a dict of at most max_values JSON values
        assert isinstance(body, dict)
        return body

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._worker is not None:
                self._worker.kill()
                self._worker = None


if __name__ == "__main__":
    sys.exit(_worker_main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
