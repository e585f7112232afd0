"""Writes small GGUF files from HF checkpoints for tests (no downloads), as llama.cpp's
converter lays them out: llama.* metadata keys, blk.N.* tensor names, q/k rows permuted for
llama.cpp's rope layout, each weight stored in a chosen ggml type.

Types gguf-py cannot quantize (the k-quants) are written as blocks of random codes with small
scales: the test compares engines reading the same bytes, so any valid block will do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
# f16 scale fields of the k-quant blocks: (block bytes, [(byte offset, magnitude)])
_K_BLOCKS = {
    "Q4_K": (144, [(0, 1e-4), (2, 1e-4)]),
    "Q5_K": (176, [(0, 5e-5), (2, 5e-5)]),
    "Q6_K": (210, [(208, 2e-5)]),
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, idx, rest = hf_name.split(".", 3)
    return f"blk.{idx}.{_LAYER[rest]}"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (the engine undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def encode(w: np.ndarray, qtype: str, seed: int) -> tuple[np.ndarray, object]:
    """A float32 [rows, cols] weight -> (array for GGUFWriter.add_tensor, raw_dtype)."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype in _K_BLOCKS:
        size, fields = _K_BLOCKS[qtype]
        rng = np.random.default_rng(seed)
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
        for offset, magnitude in fields:
            f16 = (rng.uniform(0.5, 1.0, (rows, cols // 256)) * magnitude).astype(np.float16)
            raw[..., offset : offset + 2] = f16[..., None].view(np.uint8)
        return raw.reshape(rows, -1), kind
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def write_gguf(
    checkpoint: Path,
    out: Path,
    type_for: Callable[[str], str],
    architecture: str = "llama",
) -> Path:
    """The HF checkpoint at `checkpoint` as a GGUF file; `type_for(hf name)` picks each
    2-D weight's ggml type (1-D tensors are F32)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(f))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(int(cfg.eos_token_id))
    if architecture == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    permute = architecture == "llama"  # llama.cpp permutes only Llama's q/k rows
    for i, (name, t) in enumerate(sorted(tensors.items())):
        w = t.to(torch.float32).numpy()
        if permute and name.endswith("q_proj.weight"):
            w = permute_rows(w, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = permute_rows(w, cfg.num_key_value_heads)
        qtype = type_for(name) if w.ndim == 2 else "F32"
        data, raw_dtype = encode(w, qtype, seed=i)
        if raw_dtype is None:
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
