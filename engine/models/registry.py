"""Maps `config.architectures` to the engine's model classes."""

from __future__ import annotations

from typing import Any

# architecture name in config.json -> (module, class); every Llama-like family shares llama.py.
# Adding a family: a file in engine/models/ (see gemma2.py or mixtral.py) and one line here.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Gemma2ForCausalLM": ("engine.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("engine.models.gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("engine.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("engine.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.models.qwen_moe", "QwenMoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.qwen_moe", "QwenMoeForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def resolve_architecture(hf_config: Any) -> str:
    """The first supported name in config.architectures, or a ValueError listing them."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in _MODELS:
            return name
    raise ValueError(
        f"unsupported architecture {names or '(config.json names none)'}; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def layer_sliding_windows(hf_config: Any, architecture: str) -> list[int | None]:
    """Each layer's sliding window (None: global), as the architecture's model builds it.

    For KV-cache accounting: a block that falls out of every layer's window is never read
    again, so a model whose layers all slide needs at most about window - 1 + chunk tokens per
    request, and a model with any global layer needs the whole context.
    """
    from engine.models.base import layer_sliding_window

    num_layers = int(hf_config.num_hidden_layers)
    if architecture == "MistralForCausalLM":  # Mistral ignores layer_types
        window = getattr(hf_config, "sliding_window", None)
        return [int(window) if window else None] * num_layers
    return [layer_sliding_window(hf_config, i) for i in range(num_layers)]


def get_model_class(architecture: str) -> type:
    import importlib

    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
