"""GGUF checkpoints (llama.cpp's single-file format): architecture and tensor checks, tensor
names mapped onto Hugging Face's, llama.cpp's q/k row permutation undone.

A GGUF file holds the config (`<arch>.*` keys), the tokenizer and chat template
(`tokenizer.*`) and the tensors, each with a ggml type. The engine builds the HF config and the
tokenizer with transformers (`from_pretrained(dir, gguf_file=...)`, see engine/config.py) and
reads the tensors itself with the `gguf` package:

- every tensor is yielded dequantized to float32 under its HF name (the weight mapper fills the
  model's parameters with them: the reference values);
- the raw blocks of quantized tensors stay available (`quantized[hf name]`), so the int8/int4
  linear methods can take a 4-bit type's codes as they are (engine/models/gguf_quants.py).

llama.cpp's converter permutes the rows of Llama's q and k projections (per head, pairs of
rotary halves interleaved: `reshape(heads, 2, D/2).swapaxes`); `_unpermute_rows` applies the
inverse to float rows and to raw quantized rows alike (quantization blocks run along a row).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF general.architecture -> the engine's (HF) architecture name.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# ggml tensor types the engine reads: floats, the types whose values the int8/int4 kernels
# keep, and the k-quants / legacy types it dequantizes.
GGUF_TENSOR_TYPES: tuple[str, ...] = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q2_K",
    "Q3_K",
)
_FLOAT_TYPES = ("F32", "F16", "BF16")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = ("rope_freqs.weight",)  # llama3 rope factors: the config carries the rope scaling
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf_file(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name (None: not a model weight we map)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation over the first axis (float or raw rows)."""
    n = rows.shape[0]
    half = n // n_head // 2
    idx = np.arange(n).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)
    return rows[idx]


_OPENED: dict[tuple[str, int, int], GGUFCheckpoint] = {}


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """The GGUFCheckpoint of a file, parsed once per (path, size, mtime): parsing the metadata
    of a file with a 49k-token vocabulary takes seconds, and start-up reads it twice (config,
    then weights). Only the most recent file is kept."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _OPENED:
        _OPENED.clear()
        _OPENED[key] = GGUFCheckpoint(resolved)
    return _OPENED[key]


@contextlib.contextmanager
def reuse_parsed_metadata(checkpoint: GGUFCheckpoint) -> Iterator[None]:
    """While active, transformers' GGUF readers of this file get the already parsed reader.

    transformers builds the config and tokenizer with its own `gguf.GGUFReader(path)`, which
    re-parses every metadata field (8 s of a 17 s start-up for SmolLM2's 49k-token vocabulary
    on the 2-core machine). The reader is read-only, so sharing it changes nothing else.
    """
    import gguf

    original = gguf.GGUFReader

    def reader(path, *args, **kwargs):  # gguf.GGUFReader(path, mode="r")
        if not args and not kwargs and Path(path).resolve() == checkpoint.path.resolve():
            return checkpoint.reader
        return original(path, *args, **kwargs)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized GGUF tensor's raw blocks [rows, bytes per row], rows in HF order."""

    qtype: str
    raw: np.ndarray
    shape: tuple[int, int]  # (rows, cols) of the weight


class GGUFCheckpoint:
    def __init__(self, path: str | Path) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as e:
            raise ValueError(
                "reading a .gguf model needs the gguf package (pip install gguf)"
            ) from e
        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"could not read GGUF file {str(self.path)!r}: {e}") from e
        self.gguf_architecture = self._field("general.architecture") or "(none)"
        self.quantized: dict[str, QuantizedTensor] = {}

    def _field(self, key: str) -> object | None:
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    @property
    def architecture(self) -> str:
        return GGUF_ARCHITECTURES[self.gguf_architecture]

    def check(self) -> None:
        """ValueError naming an unsupported architecture or the tensors of unsupported types."""
        if self.gguf_architecture not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"GGUF file {self.path.name}: architecture {self.gguf_architecture!r} is not "
                f"supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        bad = [
            f"{t.name} ({t.tensor_type.name})"
            for t in self.reader.tensors
            if t.tensor_type.name not in GGUF_TENSOR_TYPES
        ]
        if bad:
            shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            raise ValueError(
                f"GGUF file {self.path.name}: unsupported tensor type(s): {shown}; "
                f"supported: {', '.join(GGUF_TENSOR_TYPES)}"
            )

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def _heads(self) -> tuple[int, int]:
        arch = self.gguf_architecture
        n_head = int(self._field(f"{arch}.attention.head_count"))  # type: ignore[arg-type]
        n_kv = self._field(f"{arch}.attention.head_count_kv")
        return n_head, int(n_kv) if n_kv is not None else n_head  # type: ignore[arg-type]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every model tensor; quantized ones are also recorded
        in `self.quantized` (raw rows, permutation undone)."""
        from gguf.quants import dequantize

        self.check()
        n_head, n_kv = self._heads()
        permute = self.gguf_architecture == "llama"
        for t in self.reader.tensors:
            name = hf_tensor_name(t.name)
            if name is None:
                if t.name not in _IGNORED:
                    logger.warning("GGUF tensor %s is not used by the engine", t.name)
                continue
            qtype = t.tensor_type.name
            data = np.asarray(t.data)
            heads = None
            if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = n_head
            elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = n_kv
            if heads is not None:
                data = _unpermute_rows(data, heads)
            values = data if qtype == "F32" else dequantize(data, t.tensor_type)
            values = np.ascontiguousarray(values, dtype=np.float32)
            if not values.flags.writeable:  # a view of the memory-mapped file
                values = values.copy()
            if qtype not in _FLOAT_TYPES:
                self.quantized[name] = QuantizedTensor(qtype, data, tuple(values.shape))
            yield name, torch.from_numpy(values)
