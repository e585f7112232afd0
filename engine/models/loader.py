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
from engine.cpu_features import log_dtype_support
from engine.models.gguf_loader import is_gguf_file, open_gguf
from engine.models.layers import Linear
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
    """Builds the model, fills it from the checkpoint (safetensors directory or GGUF file) and
    gives every linear layer its weight format (`quantization`, engine/quantization)."""
    from engine.quantization.selection import method_chooser, resolve_quantization

    start = time.perf_counter()
    log_dtype_support(model_config.dtype, model_config.device)
    model_class = get_model_class(model_config.architecture)
    model = model_class(
        model_config.hf_config,
        model_config.architecture,
        backend,
        model_config.max_model_len,
        model_config.dtype,
        model_config.device,
    )
    # Counted before loading: loading may move linear weights into other formats.
    # A tied head shares the embedding's values: counted once.
    tied = getattr(model, "tie_word_embeddings", False)
    num_params = sum(
        p.numel() for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")
    )
    gguf = None
    if is_gguf_file(model_config.model_path):
        gguf = open_gguf(model_config.model_path)
        logger.info(
            "GGUF %s: %s",
            model_config.model_path.name,
            ", ".join(f"{n} {t}" for t, n in sorted(gguf.tensor_types().items())),
        )
        weights = gguf.tensors()
    else:
        weights = iterate_weights(checkpoint_files(model_config.model_path))
    quantization = resolve_quantization(
        model_config.quantization, gguf is not None, model_config.dtype
    )
    head_source = "model.embed_tokens.weight" if tied else None
    if hasattr(model, "process_weights"):  # fill, then choose formats knowing the sources
        mapper = model.weight_mapper()
        mapper.load(weights)
        choose = method_chooser(
            quantization,
            model_config.dtype,
            model_config.device,
            sources=mapper.sources,
            quantized=gguf.quantized if gguf is not None else None,
            tied_head_source=head_source,
        )
        model.process_weights(choose)
    else:  # a family with only load_weights(weights, method_for): no per-tensor GGUF formats
        choose = method_chooser(quantization, model_config.dtype, model_config.device)
        model.load_weights(weights, choose)
    if hasattr(choose, "report"):
        choose.report()
    if gguf is not None:
        gguf.quantized.clear()  # the raw blocks were only needed to choose the formats
    model.eval()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %s, quantization %s) in %.2f s; weights: %s",
        model_config.model_path,
        model_config.architecture,
        num_params / 1e6,
        model_config.dtype,
        quantization,
        time.perf_counter() - start,
        format_weight_bytes(weight_bytes_by_dtype(model)),
    )
    return model


def weight_bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights held per dtype (each storage once): linear layers in their method's
    format, every other parameter as is."""
    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(t: torch.Tensor) -> None:
        try:
            key_ptr = t.data_ptr()
        except RuntimeError:  # opaque oneDNN tensors have no storage pointer
            key_ptr = id(t)
        if t.numel() == 0 or key_ptr in seen:
            return
        seen.add(key_ptr)
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()

    linear_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, Linear):
            for t in module.method.weight_tensors(module):
                add(t)
            linear_params.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in linear_params:
            add(p.data)
    return out


def format_weight_bytes(by_dtype: dict[str, int]) -> str:
    total = sum(by_dtype.values())
    parts = [f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1])]
    return f"{total / 2**20:.1f} MiB ({', '.join(parts)})"
