"""A pure-PyTorch LLM inference and serving engine.

Public API: `LLM` (offline generation), `SamplingParams` (with `RequestOutputKind`), `EngineArgs`,
`LLMEngine`.
"""

from __future__ import annotations

import logging
import os

from engine.config import EngineArgs
from engine.engine import LLM, LLMEngine
from engine.request import CompletionOutput, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "__version__",
]


def _configure_logging() -> None:
    """INFO lines from the engine on stderr, unless ENGINE_CONFIGURE_LOGGING=0 (as vLLM does)."""
    if os.environ.get("ENGINE_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("engine")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("ENGINE_LOGGING_LEVEL", "INFO"))


_configure_logging()
