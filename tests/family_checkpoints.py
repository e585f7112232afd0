"""Small random-weight checkpoints of the families beyond Llama (Gemma 2/3, Phi-3, MoE), made
with each family's own HF config and model class, like engine.demo.make_checkpoint makes the
Llama-family ones (same tokenizer, same deterministic initialisation, same generation config).

FAMILY_VARIANTS: variant key -> (architecture, config overrides). Dimensions are tiny (2 layers,
hidden 64, 4 experts) and windows short (8-12 tokens), so prompts of 9-40 tokens cross block
boundaries and windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

from engine.demo import ENDOFTEXT_TOKEN, IM_END_TOKEN, _init_weights

FAMILY_CLASSES: dict[str, tuple[type, type]] = {
    "Gemma2ForCausalLM": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "Gemma3ForCausalLM": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "Phi3ForCausalLM": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "MixtralForCausalLM": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "Qwen2MoeForCausalLM": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "Qwen3MoeForCausalLM": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
}

_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

FAMILY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "tie_word_embeddings": True,
        },
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        {
            "head_dim": 256,  # as released Gemma 3
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
            },
            "tie_word_embeddings": True,
        },
    ),
    "phi3-longrope": (
        "Phi3ForCausalLM",
        {
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 32,
            "rope_scaling": {
                "type": "su",  # the old name of longrope, as Phi-3 checkpoints spell it
                "short_factor": [1.0, 1.3, 1.7, 2.2],
                "long_factor": [1.5, 2.5, 4.0, 6.0],
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mixtral": (
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 12},
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        {
            **_MOE,
            "num_experts": 4,
            "shared_expert_intermediate_size": 48,
            # One sliding and one global layer (HF derives layer_types from these).
            "use_sliding_window": True,
            "sliding_window": 10,
            "max_window_layers": 1,
        },
    ),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        {**_MOE, "num_experts": 4, "norm_topk_prob": True, "head_dim": 16},
    ),
}


def make_family_checkpoint(
    path: Path, architecture: str, tokenizer: Any, seed: int = 0, **overrides: Any
) -> Path:
    config_cls, model_cls = FAMILY_CLASSES[architecture]
    eos_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN)
    kwargs = {**_DIMS, "vocab_size": len(tokenizer), "bos_token_id": None}
    kwargs |= {"eos_token_id": eos_id, "pad_token_id": pad_id, **overrides}
    config = config_cls(**kwargs)
    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def family_checkpoint(root: Path, key: str, tokenizer: Any) -> Path:
    architecture, overrides = FAMILY_VARIANTS[key]
    path = root / key
    if not (path / "config.json").is_file():
        make_family_checkpoint(path, architecture, tokenizer, **overrides)
    return path
