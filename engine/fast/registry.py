"""Attention backends by name: `--attention-backend auto|torch|flash-attn|xformers|reference`.

`auto` picks, on CUDA, flash-attn if it imports, then xformers if it imports, and otherwise (and
always on CPU) the vectorised torch backend. Naming flash-attn or xformers explicitly on a device
without CUDA, or without the package installed, is a ValueError that says which.

A model that soft-caps attention logits (Gemma 2) can say so (`needs_softcap=True`): `auto` then
skips xformers, which cannot (the explicit name still builds it; the model refuses it at load).

Invariant: flash-attn and xformers are imported only here, lazily, when they are asked for (or
probed by `auto` on CUDA), never at import time, so the engine runs on machines without them.
"""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionBackend

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "flash-attn", "xformers", "reference")
_PACKAGES = {"flash-attn": "flash-attn", "xformers": "xformers"}


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
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}"
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
