"""Default sampling parameters from the model's generation config (vLLM's `--generation-config`).

Model authors put their recommended sampling settings in `generation_config.json` (Qwen3:
temperature 0.6, top_p 0.95, top_k 20). Like vLLM, the engine uses them as the defaults of
requests that do not set those fields: the offline `LLM.generate` without sampling params
(`LLM.get_default_sampling_params()`) and the server's /v1/completions and /v1/chat/completions.

The rules (vLLM's, `ModelConfig.get_diff_sampling_param` and `get_max_tokens`):

- `generation_config` (EngineArgs; `--generation-config`): "auto" (the default) reads
  generation_config.json in the model's directory (a GGUF file has none); "vllm" reads nothing
  (the plain SamplingParams defaults); anything else is a folder holding a generation_config.json
  (or that file's own path), read instead of the model's.
- Only these keys count: SAMPLING_KEYS (repetition_penalty, temperature, top_k, top_p, min_p,
  max_new_tokens), and only when the file sets them explicitly to a non-null value. The JSON is
  read as written, so transformers' GenerationConfig class defaults (top_k=50 in older versions)
  never apply. Other keys (do_sample, eos_token_id, ...) are ignored here, as vLLM ignores them.
- `override_generation_config` (`--override-generation-config '{"temperature": 0.5}'`) is merged
  over the file's keys in every mode ("vllm" included); a null value drops the file's value.
- max_new_tokens (the Hugging Face name) becomes `max_tokens`: the default of a request that sets
  none. It is also a bound on every request's max_tokens (a larger value is lowered to it, as
  vLLM does) when it comes from `override_generation_config` or from a file given by path; the
  model's own file ("auto") only sets the default.
- top_k 0 (Hugging Face's "no cut") becomes -1, this engine's spelling of the same thing.
- A request's own value wins: a field the request sets, even to the plain default value, keeps
  it. Only absent (or null) fields take the default. Explicit offline `SamplingParams` are used
  as given.

Invariants: `GenerationDefaults.fields` holds SamplingParams field names only (those of
SAMPLING_KEYS, with max_tokens for max_new_tokens), values that SamplingParams accepts (checked
when they are read; a bad value is a ValueError naming the key and where it came from); a
`GenerationDefaults` is immutable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
GENERATION_CONFIG_MODES = ("auto", "vllm")
# The generation-config keys that become sampling defaults (vLLM's list), in its order.
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
# Generation-config key -> SamplingParams field (the others have the same name).
_FIELD_NAMES = {"max_new_tokens": "max_tokens"}


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The default sampling fields of requests that do not set them.

    fields: SamplingParams field -> default value (temperature, top_p, top_k, min_p,
        repetition_penalty, max_tokens); empty when nothing sets a default.
    max_tokens_cap: the most tokens any request may ask for (None: no bound beyond the model's
        context); a larger request value is lowered to it.
    source: where the values came from, for the start-up log line.
    """

    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    max_tokens_cap: int | None = None
    source: str = "none"

    @property
    def max_tokens(self) -> int | None:
        """The default max_tokens (None: the caller's own default)."""
        return self.fields.get("max_tokens")

    def sampling_params(self) -> SamplingParams:
        """SamplingParams() with the defaults set (vLLM's `LLM.get_default_sampling_params`)."""
        return SamplingParams(**self.fields)

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """Sets every default field except max_tokens that `values` (a request's sampling
        fields, absent and null ones already left out) lacks; returns `values`."""
        for name, value in self.fields.items():
            if name != "max_tokens":
                values.setdefault(name, value)
        return values

    def bound_max_tokens(self, max_tokens: int | None) -> int | None:
        """max_tokens lowered to max_tokens_cap (None stays None only without a cap)."""
        if self.max_tokens_cap is None:
            return max_tokens
        if max_tokens is None:
            return self.max_tokens_cap
        return min(max_tokens, self.max_tokens_cap)


NO_DEFAULTS = GenerationDefaults()


def check_generation_config(value: Any) -> str:
    """EngineArgs.generation_config: "auto", "vllm" or a folder holding generation_config.json
    (or that file); the file is read and checked here, so a bad one fails at construction.
    ValueError naming the field otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(
            'generation_config must be "auto", "vllm" or the path of a folder holding '
            f"{GENERATION_CONFIG_FILE}, got {value!r}"
        )
    if value not in GENERATION_CONFIG_MODES:
        path = _config_file(value)
        _to_fields(_read_sampling_keys(path, required=True), f"generation_config ({path})")
    return value


def check_override(value: Any) -> dict[str, Any] | None:
    """EngineArgs.override_generation_config: None, or a dict (or JSON object text) whose keys
    are SAMPLING_KEYS; values checked as SamplingParams checks them (null allowed: it drops the
    file's value). Returns a plain dict copy. ValueError naming the field and key otherwise."""
    if value is None:
        return None
    name = "override_generation_config"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f'{name} must be a JSON object such as {{"temperature": 0.5}}, got {value!r}'
        )
    unknown = sorted(str(k) for k in value if k not in SAMPLING_KEYS)
    if unknown:
        raise ValueError(
            f"{name}: unknown key(s) {', '.join(unknown)}; the sampling keys are "
            f"{', '.join(SAMPLING_KEYS)}"
        )
    override = dict(value)
    _to_fields(override, name)  # values checked now
    return override


def load_generation_defaults(
    model_path: Path, mode: str = "auto", override: Mapping[str, Any] | None = None
) -> GenerationDefaults:
    """The defaults for a model (its directory, or a .gguf file) under `mode` ("auto", "vllm"
    or a path) with `override` merged over; the module docstring has the rules. ValueError
    naming the key and the file for a value SamplingParams rejects."""
    override = dict(override or {})
    if mode == "vllm":
        config: dict[str, Any] = {}
        source = "override_generation_config"
    elif mode == "auto":
        path = Path(model_path) / GENERATION_CONFIG_FILE
        config = _read_sampling_keys(path, required=False) if Path(model_path).is_dir() else {}
        source = f"the model's {GENERATION_CONFIG_FILE} ({path})"
        # The file's own values are checked before merging: a bad one names the file.
        _to_fields(config, f"{source}, which generation_config='vllm' ignores")
    else:
        path = _config_file(mode)
        config = _read_sampling_keys(path, required=True)
        source = f"generation_config ({path})"
        _to_fields(config, source)
    if override:
        source = (
            f"{source} and override_generation_config" if config else "override_generation_config"
        )
    config.update(override)
    fields = _to_fields(config, source)
    if mode in GENERATION_CONFIG_MODES:
        cap = override.get("max_new_tokens")
    else:
        cap = fields.get("max_tokens")
    return GenerationDefaults(
        fields=MappingProxyType(fields), max_tokens_cap=cap, source=source if fields else "none"
    )


def log_generation_defaults(defaults: GenerationDefaults, mode: str) -> None:
    """One start-up line saying which defaults the generation config set (nothing if none)."""
    if not defaults.fields:
        return
    hint = ""
    if mode == "auto":
        hint = " (start with --generation-config vllm to ignore the model's file)"
    logger.warning(
        "Default sampling parameters set by %s: %s; requests that set a field keep their "
        "own value%s",
        defaults.source,
        dict(defaults.fields),
        hint,
    )
    if defaults.max_tokens_cap is not None:
        logger.warning("max_tokens of every request is at most %d", defaults.max_tokens_cap)


def _config_file(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / GENERATION_CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f'generation_config: {path_text!r} is neither "auto", "vllm" nor a folder holding '
            f"{GENERATION_CONFIG_FILE}"
        )
    return path


def _read_sampling_keys(path: Path, required: bool) -> dict[str, Any]:
    """The SAMPLING_KEYS the JSON file sets to a non-null value. A missing or unreadable file:
    {} (with a warning if unreadable), or a ValueError naming generation_config if `required`."""
    if not path.is_file():
        if required:
            raise ValueError(f"generation_config: {str(path)!r} does not exist")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if required:
            raise ValueError(f"generation_config: cannot read {path}: {e}") from None
        logger.warning("ignoring unreadable %s: %s", path, e)
        return {}
    return {key: data[key] for key in SAMPLING_KEYS if data.get(key) is not None}


def _to_fields(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """SAMPLING_KEYS -> SamplingParams fields (null values dropped, top_k 0 -> -1), checked by
    SamplingParams itself; a ValueError saying where the bad value came from."""
    fields: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if key == "top_k" and value == 0 and not isinstance(value, bool):
            value = -1  # Hugging Face's "no top-k cut"
        fields[_FIELD_NAMES.get(key, key)] = value
    try:
        SamplingParams(**fields)
    except ValueError as e:
        message = str(e)
        for key, name in _FIELD_NAMES.items():
            if message.startswith(name):
                message = key + message[len(name) :]
        raise ValueError(f"{source}: {message}") from None
    return fields
