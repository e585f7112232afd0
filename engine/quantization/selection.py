"""Which linear method each layer of a loaded model gets, from `quantization=` and the checkpoint.

    quantization   linears                             LM head
    None / "none"  unquantized (layers.default_linear_method)
    "int8"         Int8LinearMethod                     int8
    "int4"         Int4LinearMethod (groups of 32)      int8 (as llama.cpp's q4 files keep
                                                        their output / token_embd at q8_0)
    "gguf"         per layer, from the file's types: all shards 4-bit (Q4_0/Q4_1/Q4_K) -> int4
                   with the file's codes as they are; all Q8_0 -> int8, requantized from
                   group-32 to per-channel scales (logged); anything else -> unquantized

A GGUF file with quantization None means "gguf" in float32 / bfloat16 and "none" in other
dtypes (float64 runs compare against transformers, which dequantizes).

Tensor parallelism: every rank quantizes (or keeps the file's codes of) its own slice, with
the same values as TP=1: int8 scales are per output row, and a row-parallel layer's row maximum
is taken over all ranks (an all-reduce of the slices' maxima); int4 groups run along the input,
so a row-parallel slice must start and end on group boundaries (ValueError for `int4`; GGUF
4-bit codes fall back to the float weight, logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.models.gguf_loader import QuantizedTensor
from engine.models.gguf_quants import FOUR_BIT_TYPES, GROUP_SIZE, unpack_4bit
from engine.models.layers import Linear, LinearMethod, default_linear_method
from engine.quantization.int4 import Int4LinearMethod
from engine.quantization.int8 import Int8LinearMethod

logger = logging.getLogger(__name__)

MethodChooser = Callable[[str, Linear], LinearMethod]


def resolve_quantization(quantization: str | None, is_gguf: bool, dtype: torch.dtype) -> str | None:
    if quantization == "gguf" and not is_gguf:
        raise ValueError("quantization 'gguf' needs a .gguf model file")
    if quantization is None and is_gguf:
        if dtype in (torch.float32, torch.bfloat16):
            return "gguf"
        logger.info(
            "GGUF weights dequantized to %s (quantized kernels run in float32/bfloat16)", dtype
        )
        return "none"
    return quantization


def method_chooser(
    quantization: str | None,
    dtype: torch.dtype,
    device: torch.device,
    sources: dict[str, list[tuple[str, int, int]]] | None = None,
    quantized: dict[str, QuantizedTensor] | None = None,
    tied_head_source: str | None = None,
) -> MethodChooser:
    """`sources`: parameter -> checkpoint tensors that filled it (WeightMapper.sources);
    `quantized`: checkpoint name -> its GGUF blocks; `tied_head_source`: the checkpoint name
    a tied LM head takes its values from."""
    default = default_linear_method(dtype, device)
    if quantization in (None, "none"):
        return lambda _name, _layer: default
    int8, int4 = Int8LinearMethod(), Int4LinearMethod(GROUP_SIZE)
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        logger.info(
            "quantization %s on %s/%s: weights stored quantized, dequantized per call "
            "(F.linear on the dequantized weight; the int8/int4 kernels here are CPU ones)",
            quantization,
            device.type,
            dtype,
        )
    if quantization == "int8":
        return lambda _name, _layer: int8
    if quantization == "int4":
        return lambda name, _layer: int8 if name == "lm_head" else int4
    assert quantization == "gguf"
    sources = sources or {}
    quantized = quantized or {}
    requantized: list[str] = []
    kept: dict[str, int] = {}  # GGUF type -> tensors kept as int4 codes
    kept_layers: set[str] = set()

    def choose(name: str, layer: Linear) -> LinearMethod:
        shards = sorted(sources.get(f"{name}.weight", []), key=lambda src: src[1])  # by row
        if name == "lm_head" and not shards and tied_head_source is not None:
            shards = [(tied_head_source, 0, layer.out_features)]
        blocks = [quantized.get(src) for src, _, _ in shards]
        if not shards or any(b is None for b in blocks):
            return default  # float tensors in the file
        types = {b.qtype for b in blocks}  # type: ignore[union-attr]
        if types <= set(FOUR_BIT_TYPES) and layer.in_features % GROUP_SIZE == 0:
            parts = [unpack_4bit(b.raw, b.qtype) for b in blocks]  # type: ignore[union-attr]
            # This rank's rows / columns of the codes (all of them without tensor parallelism).
            local = layer.shard_quantized(parts, GROUP_SIZE)
            if local is None:
                logger.info(
                    "GGUF %s: this rank's input columns do not align with 4-bit groups of %d; "
                    "dequantized",
                    name,
                    GROUP_SIZE,
                )
                return default
            layer.pre_quantized = (*local, GROUP_SIZE)
            if name not in kept_layers:  # (a tied head is asked for twice)
                kept_layers.add(name)
                for b in blocks:
                    kept[b.qtype] = kept.get(b.qtype, 0) + 1  # type: ignore[union-attr]
            return int4
        if types == {"Q8_0"}:
            if name not in requantized:  # (a tied head is asked for twice)
                requantized.append(name)
            return int8
        return default

    def report() -> None:
        if kept:
            logger.info(
                "GGUF 4-bit tensors on the int4 kernels with their values kept: %s",
                ", ".join(f"{n} {t}" for t, n in sorted(kept.items())),
            )
        if requantized:
            logger.info(
                "GGUF Q8_0 weights requantized from group-32 to per-channel int8 scales: %d "
                "layer(s) (%s%s)",
                len(requantized),
                ", ".join(requantized[:3]),
                ", ..." if len(requantized) > 3 else "",
            )

    choose.report = report  # type: ignore[attr-defined]
    return choose
