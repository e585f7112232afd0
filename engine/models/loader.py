"""Builds the engine's model for a checkpoint and fills it from safetensors files.

Weights are read through `safetensors.safe_open`, which memory-maps each file, one tensor at a
time, so peak memory stays near the model's size. A sharded checkpoint is read through the files
its `model.safetensors.index.json` names; otherwise every `*.safetensors` file in the directory.
No Hugging Face model object is built on this path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.attention import AttentionBackend
from engine.config import ModelConfig
from engine.models.registry import get_model_class

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, or a ValueError saying what is there instead."""
    index = model_path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{INDEX_FILE} names shard(s) that are missing: {', '.join(absent)}")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_path.glob("*.bin")) + sorted(
            p.name for p in model_path.glob("*.pt")
        )
        hint = f" (found {', '.join(others)}; convert them to safetensors)" if others else ""
        raise ValueError(f"no *.safetensors weights in {model_path}{hint}")
    return files


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def load_model(model_config: ModelConfig, backend: AttentionBackend) -> torch.nn.Module:
    start = time.perf_counter()
    model_class = get_model_class(model_config.architecture)
    model = model_class(
        model_config.hf_config,
        model_config.architecture,
        backend,
        model_config.max_model_len,
        model_config.dtype,
        model_config.device,
    )
    # Counted before loading: on CPU, loading may move linear weights into oneDNN's layout.
    # A tied head shares the embedding's values: counted once.
    tied = getattr(model, "tie_word_embeddings", False)
    num_params = sum(
        p.numel() for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")
    )
    model.load_weights(iterate_weights(checkpoint_files(model_config.model_path)))
    model.eval()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s) in %.2f s",
        model_config.model_path,
        model_config.architecture,
        num_params / 1e6,
        model_config.dtype,
        time.perf_counter() - start,
    )
    return model
