"""Attention backends by name: `--attention-backend auto|torch|flash-attn|xformers|reference`,
any name a plug-in registered, or a `package.module:Factory` reference.

`auto` picks, on CUDA, flash-attn if it imports, then xformers if it imports, and otherwise (and
always on CPU) the vectorised torch backend. Naming flash-attn or xformers explicitly on a device
without CUDA, or without the package installed, is a ValueError that says which.

A model that soft-caps attention logits (Gemma 2) can say so (`needs_softcap=True`): `auto` then
skips xformers, which cannot (the explicit name still builds it; the model refuses it at load).

Plug-ins: `register_attention_backend(name, factory)` adds a name; `factory()` (a class or a
function, no arguments) returns an object following `engine.attention.AttentionBackend`. A
`module:attr` reference is loaded on first use and registered under that string; modules listed
in `$ENGINE_PLUGINS` are imported before a name is resolved (see engine/plugins.py), so
`--attention-backend NAME` works from `python -m engine.generate` and the server.

Invariant: flash-attn and xformers are imported only here, lazily, when they are asked for (or
probed by `auto` on CUDA), never at import time, so the engine runs on machines without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.attention import AttentionBackend
from engine.plugins import is_reference, load_plugin_modules, load_reference, register_factory

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "flash-attn", "xformers", "reference")
_PACKAGES = {"flash-attn": "flash-attn", "xformers": "xformers"}
AttentionBackendFactory = Callable[[], AttentionBackend]
_PLUGINS: dict[str, AttentionBackendFactory] = {}


def register_attention_backend(
    name: str, factory: AttentionBackendFactory, *, override: bool = False
) -> None:
    """Makes `attention_backend=name` build `factory()`. Built-in names cannot be taken; a name
    registered twice needs `override=True` (re-registering the same factory is a no-op)."""
    register_factory("attention backend", _PLUGINS, ATTENTION_BACKENDS, name, factory, override)


def unregister_attention_backend(name: str) -> None:
    _PLUGINS.pop(name, None)


def available_attention_backends() -> tuple[str, ...]:
    """Built-in names, then registered plug-ins (after importing $ENGINE_PLUGINS)."""
    load_plugin_modules()
    return ATTENTION_BACKENDS + tuple(sorted(_PLUGINS))


def _build_plugin(name: str) -> AttentionBackend:
    factory = _PLUGINS.get(name) or load_reference(name, "attention_backend")
    try:
        backend = factory()
    except TypeError as e:  # not a zero-argument factory
        raise ValueError(f"attention_backend {name!r}: calling the factory failed: {e}") from e
    for method in ("write_kv", "forward"):
        if not callable(getattr(backend, method, None)):
            raise ValueError(
                f"attention_backend {name!r}: the factory returned {type(backend).__name__}, "
                f"which has no {method}() (see engine.attention.AttentionBackend)"
            )
    if not hasattr(backend, "name"):
        backend.name = name
    return backend


def _build(name: str) -> AttentionBackend:
    """The named CUDA backend; ImportError when its package is missing or does not load."""
    if name == "flash-attn":
        from engine.fast.flash_attn import FlashAttnBackend

        return FlashAttnBackend()
    from engine.fast.xformers import XformersBackend

    return XformersBackend()


def get_attention_backend(
    name: str, device: torch.device | str, needs_softcap: bool = False
) -> AttentionBackend:
    load_plugin_modules()  # $ENGINE_PLUGINS, once: a plug-in may register on import
    if name not in ATTENTION_BACKENDS:
        if name in _PLUGINS or is_reference(name):
            return _build_plugin(name)
        names = ", ".join(ATTENTION_BACKENDS + tuple(sorted(_PLUGINS)))
        raise ValueError(
            f"attention_backend must be one of {names} (or 'package.module:Factory'), got {name!r}"
        )
    device = torch.device(device)
    if name == "reference":
        from engine.reference.attention import ReferenceAttention

        return ReferenceAttention()
    if name in _PACKAGES:
        if device.type != "cuda":
            raise ValueError(
                f"attention_backend {name!r} needs a CUDA device, and the device is "
                f"{device.type!r}; use 'torch' or 'auto'"
            )
        try:
            return _build(name)
        except ImportError as e:
            raise ValueError(
                f"attention_backend {name!r} needs the {_PACKAGES[name]} package, which could "
                f"not be imported ({e}); install it (pip install {_PACKAGES[name]}) or use "
                "'torch' or 'auto'"
            ) from e
    if name == "auto" and device.type == "cuda":
        for candidate in ("flash-attn", "xformers"):
            try:
                backend = _build(candidate)
            except ImportError as e:
                logger.info("attention backend %s unavailable: %s", candidate, e)
                continue
            if needs_softcap and not getattr(backend, "supports_softcap", True):
                logger.info("attention backend %s cannot soft-cap; skipped", candidate)
                continue
            logger.info("attention backend: %s", candidate)
            return backend
    from engine.fast.torch_native import TorchNativeAttention

    return TorchNativeAttention()
