"""Weight-only quantization: the `quantization=` argument and the linear methods it selects.

    None     the checkpoint's own format: plain weights (oneDNN-packed on CPU float32); for a
             GGUF file, its quantized types where a kernel keeps their values ("gguf")
    "int8"   weight-only int8, symmetric, one scale per output channel (int8.py)
    "int4"   weight-only int4, asymmetric, one scale and zero per group of 32 inputs (int4.py)
    "gguf"   a GGUF file's Q8_0 tensors on the int8 kernels, its 4-bit types on the int4 ones,
             everything else dequantized to the engine's dtype (gguf only)
    "none"   no quantized kernels: every weight (also a GGUF file's) dequantized to the dtype

Every method's reference is the dequantized weight in x @ W.T (`Linear.dequantized_weight`).
"""

from __future__ import annotations

QUANTIZATION_METHODS: tuple[str, ...] = ("int8", "int4", "gguf", "none")


def validate_quantization(value: str | None) -> str | None:
    """The method name, or a ValueError naming `quantization` and listing the supported ones."""
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization {value!r} is not supported; supported: "
            f"{', '.join(QUANTIZATION_METHODS)} (or None for the checkpoint's own format)"
        )
    return value.lower()
