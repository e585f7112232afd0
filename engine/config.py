"""Engine configuration: what the user asks for (`EngineArgs`) and what it resolves to.

`EngineArgs` holds the user's arguments under vLLM's names (the CLI flags map 1:1 onto its
fields, `--max-model-len` -> `max_model_len`). `EngineArgs.create_configs()` resolves them against
the checkpoint into three frozen configs: `ModelConfig` (what to load, in which dtype, on which
device), `CacheConfig` (the paged KV cache's shape and budget) and `SchedulerConfig` (batch limits).

Invariants: configs are frozen and never mutated after construction (derive a new one with
`dataclasses.replace`); every resolved config has concrete values (no "auto" survives
resolution); a bad argument raises `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}

SCHEDULERS = ("default", "reference")
# "name" or "org/name", as the hub spells repository ids; anything else is meant as a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hf_head_dim(hf_config: Any) -> int:
    """A transformers config's attention head size: `head_dim` when set (Qwen3, Gemma), else
    hidden_size / num_attention_heads."""
    cfg = hf_config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The checkpoint and how to run it."""

    model: str  # the name the user gave (local path or hub id)
    model_path: Path  # local directory (config.json + safetensors) or a .gguf file
    tokenizer_path: Path
    hf_config: Any = field(repr=False, compare=False)  # transformers.PretrainedConfig
    architecture: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    seed: int
    max_logprobs: int
    eos_token_ids: tuple[int, ...]
    trust_remote_code: bool = False
    # None (the checkpoint's own format), "int8", "int4", "gguf" or "none"; engine/quantization
    quantization: str | None = None
    tensor_parallel_size: int = 1  # ranks the model is sharded over (engine/distributed)

    @property
    def is_gguf(self) -> bool:
        """model_path is a single .gguf file (config, tokenizer and weights in one)."""
        return self.model_path.suffix.lower() == ".gguf"

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        cfg = self.hf_config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def num_kv_heads_per_rank(self) -> int:
        """KV heads each rank's cache holds: an even share, or one (replicated) when there are
        fewer KV heads than ranks (layers.kv_head_slice)."""
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    @property
    def head_dim(self) -> int:
        return hf_head_dim(self.hf_config)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache: `num_blocks` blocks of `block_size` token slots per layer."""

    block_size: int
    num_blocks: int
    kv_cache_memory_bytes: int  # the budget the block count was derived from
    enable_prefix_caching: bool = True

    @property
    def num_token_slots(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one engine step."""

    scheduler: str  # "default" (production) or "reference"
    max_num_seqs: int  # requests in one step
    max_num_batched_tokens: int  # tokens in one step
    max_model_len: int
    enable_chunked_prefill: bool = True


SPEC_METHODS = ("ngram", "draft_model", "suffix")
_SUFFIX_FIELDS = {  # method "suffix": vLLM's names, (type, default, lowest, highest)
    "suffix_decoding_max_tree_depth": (int, 24, 1, None),
    "suffix_decoding_max_cached_requests": (int, 10000, 0, None),
    "suffix_decoding_max_spec_factor": (float, 1.0, 0.0, None),
    "suffix_decoding_min_token_prob": (float, 0.1, 0.0, 1.0),
}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's shape:

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b}
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": k}
    {"method": "suffix", "num_speculative_tokens": k, "suffix_decoding_max_tree_depth": 24, ...}
    {"method": NAME or "pkg.mod:Factory", ...}  a registered proposer (spec_decode/registry.py);
                                                 its own keys are kept in `extra`
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    model: str | None = None  # the draft checkpoint (method "draft_model")
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    extra: tuple[tuple[str, Any], ...] = ()  # a plug-in method's own keys, sorted

    @classmethod
    def from_value(cls, value: Any) -> SpeculativeConfig | None:
        """Parses a dict, a JSON string (the CLI's --speculative-config) or a config."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {value!r}")
        known = {
            "method",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "model",
            *_SUFFIX_FIELDS,
        }
        method = value.get("method")
        if method is None and value.get("model"):
            method = "draft_model"
        plugin = method not in SPEC_METHODS
        if plugin:  # a registered proposer, or a ValueError listing every name
            from engine.spec_decode.registry import check_proposer_method

            check_proposer_method(method)
        unknown = sorted(set(value) - known)
        if unknown and not plugin:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)}")
        k = value.get("num_speculative_tokens")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer >= 1, got {k!r}"
            )
        fields: dict[str, Any] = {"method": method, "num_speculative_tokens": k}
        if method == "ngram":
            lo = value.get("prompt_lookup_min")
            hi = value.get("prompt_lookup_max")
            lo, hi = (lo if lo is not None else hi), (hi if hi is not None else lo)
            lo, hi = (lo if lo is not None else 1), (hi if hi is not None else 3)
            for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(
                        f"speculative_config.{name} must be an integer >= 1, got {v!r}"
                    )
            if lo > hi:
                raise ValueError(
                    f"speculative_config.prompt_lookup_min ({lo}) is larger than "
                    f"prompt_lookup_max ({hi})"
                )
            fields.update(prompt_lookup_min=lo, prompt_lookup_max=hi)
        elif method == "suffix":
            for name, (kind, default, lowest, highest) in _SUFFIX_FIELDS.items():
                v = value.get(name, default)
                types = (int, float) if kind is float else int
                ok = not isinstance(v, bool) and isinstance(v, types)
                if not ok or v < lowest or (highest is not None and v > highest):
                    bounds = f">= {lowest}" + ("" if highest is None else f" and <= {highest}")
                    raise ValueError(
                        f"speculative_config.{name} must be a number {bounds}, got {v!r}"
                    )
                fields[name] = kind(v)
        elif plugin:
            fields["model"] = value.get("model")
            fields["extra"] = tuple(sorted((key, value[key]) for key in unknown))
        else:
            model = value.get("model")
            if not model or not isinstance(model, str):
                raise ValueError("speculative_config.model: the draft_model method needs a path")
            fields["model"] = model
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """Everything a user can set, under vLLM's names. Defaults follow vLLM where it has one."""

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    max_logprobs: int = 20
    # "default": the production scheduler (chunked prefill, prefix caching, preemption);
    # "reference": the simplest correct one, to diff against.
    scheduler: str = "default"
    # None: on for the default scheduler; the reference scheduler has neither.
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    # dict / JSON string / SpeculativeConfig, parsed and validated at construction
    speculative_config: Any = None
    attention_backend: str = "auto"
    # Weight-only quantization applied at load time (vLLM's --quantization): "int8", "int4",
    # "gguf", "none", or None for the checkpoint's own format (see engine/quantization).
    quantization: str | None = None
    # vLLM's custom logits processors: 'package.module:Class' references or classes, each built
    # once per engine (engine/logits_process.py); checked to load here.
    logits_processors: Any = None
    # Tensor parallelism (vLLM's name): the model sharded over this many ranks
    # (engine/distributed); 1 runs in this process alone.
    tensor_parallel_size: int = 1
    # vLLM's --generation-config: "auto" (the model's generation_config.json sets the default
    # sampling fields of requests that set none), "vllm" (plain defaults) or a folder holding a
    # generation_config.json to read instead (engine/generation_defaults.py has the rules).
    generation_config: str = "auto"
    # vLLM's --override-generation-config: sampling keys (temperature, top_p, top_k, min_p,
    # repetition_penalty, max_new_tokens) merged over the generation config; a dict or JSON text.
    override_generation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_logprobs", self.max_logprobs, allow_zero=True)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "kv_cache_memory_bytes",
            "num_gpu_blocks_override",
        ):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {self.dtype!r}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        from engine.quantization import validate_quantization

        object.__setattr__(self, "quantization", validate_quantization(self.quantization))
        spec = SpeculativeConfig.from_value(self.speculative_config)
        if spec is not None and self.scheduler == "reference":
            raise ValueError("speculative_config: the reference scheduler does not speculate")
        object.__setattr__(self, "speculative_config", spec)
        from engine.logits_process import validate_logits_processors

        processors = validate_logits_processors(self.logits_processors)
        object.__setattr__(self, "logits_processors", processors)
        from engine.generation_defaults import check_generation_config, check_override

        check_generation_config(self.generation_config)
        override = check_override(self.override_generation_config)
        object.__setattr__(self, "override_generation_config", override)

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    def create_model_config(self) -> ModelConfig:
        """Resolves the checkpoint (local dir or hub id), its config, dtype, device and length."""
        from transformers import AutoConfig

        from engine.models.registry import resolve_architecture

        model_path = resolve_model_path(self.model, self.revision)
        if model_path.suffix.lower() == ".gguf":
            hf_config, architecture, gguf_tokenizer = _gguf_config(model_path)
            tokenizer_path = (
                resolve_model_path(self.tokenizer, self.revision)
                if self.tokenizer
                else gguf_tokenizer()
            )
        else:
            if self.quantization == "gguf":
                raise ValueError("quantization 'gguf' needs a .gguf model file")
            tokenizer_path = (
                resolve_model_path(self.tokenizer, self.revision) if self.tokenizer else model_path
            )
            if not (model_path / "config.json").is_file():
                raise ValueError(f"model directory {str(model_path)!r} has no config.json")
            try:
                hf_config = AutoConfig.from_pretrained(
                    model_path, trust_remote_code=self.trust_remote_code
                )
            except Exception as e:  # transformers raises several types for bad configs
                raise ValueError(f"could not read {model_path / 'config.json'}: {e}") from e
            architecture = resolve_architecture(hf_config)
        device = _resolve_device(self.device)
        dtype = _resolve_dtype(self.dtype, hf_config, device)

        max_pos = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
        max_model_len = self.max_model_len or max_pos
        if max_model_len <= 0:
            raise ValueError("max_model_len: the config has no max_position_embeddings; set it")
        if max_pos and max_model_len > max_pos:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's "
                f"max_position_embeddings ({max_pos})"
            )
        return ModelConfig(
            model=self.model,
            model_path=model_path,
            tokenizer_path=tokenizer_path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=self.seed,
            max_logprobs=self.max_logprobs,
            eos_token_ids=_eos_token_ids(model_path, hf_config),
            trust_remote_code=self.trust_remote_code,
            quantization=self.quantization,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    @property
    def resolved_chunked_prefill(self) -> bool:
        if self.scheduler == "reference":
            if self.enable_chunked_prefill:
                raise ValueError("enable_chunked_prefill: the reference scheduler has none")
            return False
        return self.enable_chunked_prefill is not False

    @property
    def resolved_prefix_caching(self) -> bool:
        if self.scheduler == "reference":
            if self.enable_prefix_caching:
                raise ValueError("enable_prefix_caching: the reference scheduler has none")
            return False
        return self.enable_prefix_caching is not False

    def create_scheduler_config(self, model_config: ModelConfig) -> SchedulerConfig:
        chunked = self.resolved_chunked_prefill
        max_len = model_config.max_model_len
        # Without chunking a step must fit a whole prompt; with it, 2048 tokens a step keeps
        # decodes flowing between prompt chunks.
        budget = self.max_num_batched_tokens or (2048 if chunked else max(max_len, 2048))
        if not chunked and budget < max_len:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) is smaller than max_model_len ({max_len}); "
                "without chunked prefill a step must fit the longest prompt"
            )
        if budget < self.max_num_seqs and self.max_num_batched_tokens is not None:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        return SchedulerConfig(
            scheduler=self.scheduler,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            enable_chunked_prefill=chunked,
        )


def _positive(name: str, value: int, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded if reachable.

    Raises ValueError saying both what was tried and why it failed, so a typo in a path does not
    surface as a network error.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"model file {model!r} does not exist")
        return path.resolve()
    if path.exists():
        raise ValueError(
            f"model {model!r} is a file; expected a checkpoint directory or a .gguf file"
        )
    if not _HUB_ID.fullmatch(model):
        raise ValueError(f"model directory {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:
        raise ValueError(
            f"model {model!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pass the path of a local checkpoint directory."
        ) from e
    return Path(local)


def resolve_device(device: str) -> torch.device:
    """EngineArgs.device ("auto", "cpu", "cuda", "cuda:1", ...) -> a torch.device."""
    return _resolve_device(device)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        # bf16/fp16 matmuls are several times slower than fp32 on these CPUs.
        return torch.float32
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _eos_token_ids(model_path: Path, hf_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's, then config.json's (both may be lists)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if int(v) not in ids:
                ids.append(int(v))

    if (model_path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            add(GenerationConfig.from_pretrained(model_path).eos_token_id)
        except Exception as e:  # a broken generation config should not stop serving
            logger.warning("ignoring unreadable generation_config.json: %s", e)
    add(getattr(hf_config, "eos_token_id", None))
    return tuple(ids)


def _gguf_config(path: Path) -> tuple[Any, str, Any]:
    """(HF config, architecture, a function building the tokenizer directory) of a GGUF file.

    The file's architecture and tensor types are checked first (a ValueError naming what is
    unsupported); transformers then builds the config from the GGUF metadata. The tokenizer and
    chat template are built by transformers too, once per file, and saved to a cache directory
    (ENGINE_CACHE_DIR or ~/.cache/engine) that the rest of the engine loads like any other.
    """
    from transformers import AutoConfig

    from engine.models.gguf_loader import open_gguf, reuse_parsed_metadata

    checkpoint = open_gguf(path)
    checkpoint.check()
    try:
        with reuse_parsed_metadata(checkpoint):
            hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"could not read the config of GGUF file {path.name}: {e}") from e
    hf_config.architectures = [checkpoint.architecture]

    def tokenizer_dir() -> Path:
        import hashlib
        import os

        stat = path.stat()
        key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        root = Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine")
        target = root / "gguf-tokenizers" / key[:24]
        if not (target / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            try:
                with reuse_parsed_metadata(checkpoint):
                    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except Exception as e:
                raise ValueError(
                    f"could not build a tokenizer from GGUF file {path.name} ({e}); "
                    "pass tokenizer=<a tokenizer directory>"
                ) from e
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tokenizer.save_pretrained(tmp)
            if target.exists():  # another process built it meanwhile
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.replace(target)
        return target

    return hf_config, checkpoint.architecture, tokenizer_dir
