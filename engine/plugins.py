"""Loading plug-ins by module path: the one place the engine imports user code.

A plug-in point (attention backends in `engine.fast.registry`, speculative proposers in
`engine.spec_decode.registry`) accepts either a registered name or a reference of the form
`package.module:attr`. The module is imported and `attr` is the factory (a class or a
function). Importing a module may also register names itself (calling `register_*`), so
`package.module` alone, without `:attr`, is accepted by `load_plugin_modules`.

`ENGINE_PLUGINS` (comma-separated module paths) lists modules imported before any name is
resolved, so a plug-in's own names (`--attention-backend mine`) work from the CLI and the
server without a code change: the analogue of vLLM's `VLLM_PLUGINS` / entry points.

Invariant: nothing is imported unless a name is unknown to the registry or listed in
`ENGINE_PLUGINS`; failures are ValueErrors naming the field and the reference.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

PLUGINS_ENV = "ENGINE_PLUGINS"
_loaded: set[str] = set()


def load_plugin_modules() -> None:
    """Imports every module named in $ENGINE_PLUGINS (once each)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{PLUGINS_ENV}: cannot import plug-in module {module!r}: {e}") from e
        _loaded.add(module)


def is_reference(name: str) -> bool:
    """True for `module.path:attr` references (a registered name never holds a colon)."""
    return ":" in name


def load_reference(reference: str, field: str) -> Any:
    """The object `attr` of `module.path:attr`; ValueError naming `field` otherwise."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{field}: {reference!r} is not of the form 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{field}: cannot import module {module_name!r} ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"{field}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(obj):
        raise ValueError(f"{field}: {reference!r} is not callable (a class or a factory)")
    return obj


def register_factory(
    kind: str,
    registry: dict[str, Any],
    builtins: tuple[str, ...],
    name: str,
    factory: Any,
    override: bool,
) -> None:
    """Adds `factory` under `name` to a plug-in point's `registry` (`kind` names the point in
    errors, e.g. "proposer"). Built-in names cannot be taken; a name registered twice needs
    `override=True` (re-registering the same factory is a no-op)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{kind} name must be a non-empty string without ':', got {name!r}")
    if not callable(factory):
        raise ValueError(f"{kind} {name!r}: the factory must be callable")
    if name in builtins:
        raise ValueError(f"{kind} {name!r} is built in and cannot be replaced")
    if name in registry and registry[name] is not factory and not override:
        raise ValueError(f"{kind} {name!r} is already registered (override=True)")
    registry[name] = factory
