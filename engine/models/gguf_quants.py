"""GGUF's 4-bit block formats as int4 codes with one scale and zero per 32 weights.

The int4 linear (engine/quantization/int4.py) computes W = (q - 8) * scale + zero per group of
32 inputs. llama.cpp's 4-bit blocks (ggml-quants.c) are exactly of that form:

    Q4_0  block of 32: d (f16), 16 bytes of nibbles     w = d * (q - 8)
    Q4_1  block of 32: d, m (f16), 16 bytes of nibbles  w = d * q + m
    Q4_K  super-block of 256: d, dmin (f16), 12 bytes of 6-bit (scale, min) pairs for its 8
          sub-blocks of 32, 128 bytes of nibbles        w = d * sc_j * q - dmin * m_j

Nibble order: in Q4_0/Q4_1 byte i holds weight i (low nibble) and weight i + 16 (high); in
Q4_K each 32-byte run holds sub-block 2r (low nibbles) and 2r + 1 (high). So the codes carry
over unchanged and (scale, zero) = (d, 0), (d, m + 8d), (d*sc, 8*d*sc - dmin*m): the values are
kept exactly (in float32; the bfloat16 kernel then rounds scale and zero as documented there).
tests/test_gguf_quants.py checks every format against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch

FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
GROUP_SIZE = 32


def _f16(raw: np.ndarray) -> np.ndarray:  # [..., 2] uint8 -> [...] float32
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [..., 16] uint8 -> [..., 32] codes (Q4_0/Q4_1)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def unpack_4bit(
    raw: np.ndarray,  # [rows, bytes per row] uint8, as GGUFReader gives a quantized tensor
    qtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (q [rows, cols] uint8 0..15, scale [rows, cols/32], zero [rows, cols/32]) float32."""
    rows = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        size = 18 if qtype == "Q4_0" else 20
        blocks = raw.reshape(rows, -1, size)  # [rows, nb, size]
        d = _f16(blocks[..., 0:2])
        q = _nibbles(blocks[..., size - 16 :])  # [rows, nb, 32]
        zero = np.zeros_like(d) if qtype == "Q4_0" else _f16(blocks[..., 2:4]) + 8.0 * d
        scale = d
    elif qtype == "Q4_K":
        blocks = raw.reshape(rows, -1, 144)  # [rows, nb, 144]
        d = _f16(blocks[..., 0:2])[..., None]  # [rows, nb, 1]
        dmin = _f16(blocks[..., 2:4])[..., None]
        sc_raw = blocks[..., 4:16].astype(np.int32)  # [rows, nb, 12]
        sc = np.empty((*sc_raw.shape[:2], 8), dtype=np.int32)
        mn = np.empty_like(sc)
        sc[..., :4] = sc_raw[..., 0:4] & 63
        mn[..., :4] = sc_raw[..., 4:8] & 63
        sc[..., 4:] = (sc_raw[..., 8:12] & 0x0F) | ((sc_raw[..., 0:4] >> 6) << 4)
        mn[..., 4:] = (sc_raw[..., 8:12] >> 4) | ((sc_raw[..., 4:8] >> 6) << 4)
        qs = blocks[..., 16:].reshape(rows, -1, 4, 32)  # [rows, nb, 4 runs, 32]
        q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [rows, nb, 4, 2, 32]: sub-block 2r + h
        scale = d * sc  # [rows, nb, 8]
        zero = 8.0 * scale - dmin * mn
    else:
        raise ValueError(f"{qtype} is not a 4-bit GGUF type ({', '.join(FOUR_BIT_TYPES)})")
    q = q.reshape(rows, -1).astype(np.uint8)
    return (
        torch.from_numpy(q),
        torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, -1), dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(zero.reshape(rows, -1), dtype=np.float32)),
    )
