"""GGUF's 4-bit blocks read as int4 codes + group scales/zeros equal gguf's own dequantization
(so loading them onto the int4 kernels keeps the weights' values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.models.gguf_quants import GROUP_SIZE, unpack_4bit  # noqa: E402
from engine.quantization.int4 import dequantize_int4  # noqa: E402


def _random_blocks(qtype: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random bytes in the block layout, with finite, moderate f16 scale fields."""
    kind = gguf.GGMLQuantizationType[qtype]
    _, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    n_f16 = 1 if qtype == "Q4_0" else 2
    f16 = (rng.standard_normal((rows, blocks, n_f16)) * 0.01).astype(np.float16)
    raw[..., : 2 * n_f16] = f16.view(np.uint8).reshape(rows, blocks, 2 * n_f16)
    return raw.reshape(rows, blocks * size)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("seed", [0, 1])
def test_4bit_blocks_unpack_to_the_same_values(qtype, seed):
    rows, blocks = 5, 3
    raw = _random_blocks(qtype, rows, blocks, seed)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])  # [rows, cols]
    q, scale, zero = unpack_4bit(raw, qtype)
    assert q.shape == expected.shape and int(q.max()) <= 15
    got = dequantize_int4(q, scale, zero, GROUP_SIZE)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def test_other_types_are_refused_by_name():
    with pytest.raises(ValueError, match="Q6_K is not a 4-bit GGUF type"):
        unpack_4bit(np.zeros((1, 210), dtype=np.uint8), "Q6_K")
