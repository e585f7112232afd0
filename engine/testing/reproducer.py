"""Running a property under hypothesis and turning its shrunk failure into a script.

`find_failure(body, strategy)` runs `body(example)` on examples drawn from `strategy`; when one
fails, hypothesis shrinks it and replays the minimal example last, so the last recorded failure
is the minimal one. `write_reproducer(script, name)` saves a standalone Python script (it
imports only the engine and the code under test) to `$ENGINE_REPRO_DIR` (default: the system
temp dir's `engine-repro/`) and prints its path; `KitFailure` carries the path and the script.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPRO_DIR_ENV = "ENGINE_REPRO_DIR"


class KitFailure(AssertionError):
    """A kit check failed; `reproducer` is the path of the standalone script."""

    def __init__(self, message: str, reproducer: Path, example: Any, cause: BaseException):
        super().__init__(message)
        self.reproducer = reproducer
        self.example = example
        self.cause = cause


def find_failure(
    body: Callable[[Any], None],
    strategy: st.SearchStrategy,
    max_examples: int = 100,
    derandomize: bool = False,
) -> tuple[Any, BaseException] | None:
    """(minimal failing example, its exception), or None when every example passes."""
    failures: list[tuple[Any, BaseException]] = []

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )
    @given(strategy)
    def prop(example: Any) -> None:
        try:
            body(example)
        except Exception as e:
            failures.append((example, e))
            raise

    try:
        prop()
    except Exception:
        if not failures:
            raise
        return failures[-1]
    return None


def repro_dir(directory: str | os.PathLike | None = None) -> Path:
    if directory is None:
        directory = os.environ.get(REPRO_DIR_ENV) or Path(tempfile.gettempdir()) / "engine-repro"
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_reproducer(script: str, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Writes the script (named by its content's hash) and prints its path to stderr."""
    digest = hashlib.sha1(script.encode()).hexdigest()[:10]
    path = repro_dir(directory) / f"{name}-{digest}.py"
    path.write_text(script)
    print(f"engine.testing: reproducer written to {path}", file=sys.stderr)
    return path


def fail(
    what: str,
    example: Any,
    cause: BaseException,
    script: str,
    name: str,
    directory: str | os.PathLike | None = None,
) -> KitFailure:
    """The KitFailure to raise: message with the cause, the path and the script itself."""
    path = write_reproducer(script, name, directory)
    message = (
        f"{what}\nminimal failing case: {example!r}\ncause: {type(cause).__name__}: {cause}\n"
        f"reproducer: {path} (run: python {path})\n--- {path.name} ---\n{script}"
    )
    return KitFailure(message, path, example, cause)


def importable_reference(obj: Any) -> str | None:
    """`module:qualname` when a fresh process can import `obj` (not a lambda or local)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def factory_line(variable: str, factory: Any, kind: str, args: str = "") -> str:
    """Source that rebuilds `factory(args)` in the script, or a line telling what to fill in."""
    reference = importable_reference(factory)
    if reference is None:
        return (
            f"{variable} = None  # FILL IN: build the {kind} here ({factory!r} cannot be "
            "imported by reference)\n"
        )
    return f'{variable} = load_reference("{reference}", "{kind}")({args})\n'
