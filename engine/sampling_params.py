"""SamplingParams: how one request picks its tokens and when it stops.

Field names, ranges and meanings are OpenAI's and vLLM's. Every field is validated at
construction and a bad value raises `ValueError` naming the field, so a bad request fails before
it touches the engine. What needs the model (token ids inside the vocabulary, `logprobs` against
the engine's `max_logprobs`) is checked by `validate_for_model`, which `LLMEngine.add_request`
calls.

Invariants: instances are frozen and hashable (lists become tuples, `logit_bias` a read-only
`LogitBias` mapping with int keys); `temperature < 1e-5` means greedy (argmax of the processed
logits), and then min-p / top-k / top-p are ignored; `top_k == -1` means no top-k cut (0 is
rejected); `min_tokens <= max_tokens`. The order in which the sampler applies the fields is in
`engine/sampler.py` and the README's "Sampling" section.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.structured.params import StructuredOutputsParams

# Below this temperature sampling is treated as greedy; vLLM uses the same cut-off.
_GREEDY_EPS = 1e-5
_MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
_MAX_ABS_PENALTY = 2.0  # OpenAI's range for presence_penalty / frequency_penalty


class RequestOutputKind(enum.IntEnum):
    """What each `RequestOutput` of a request carries (vLLM v1's names and values).

    CUMULATIVE: every output holds everything so far (the n samples, all tokens, text, logprobs).
    DELTA: an output holds only what is new since the request's previous output: the samples that
        advanced, each with its new token ids, text and logprobs (`cumulative_logprob` stays
        cumulative, and `prompt_logprobs` come once, in the first output). Joining a request's
        deltas per sample index gives the CUMULATIVE output; the engine's work per output is
        proportional to what is new, not to the length so far.
    FINAL_ONLY: one output, when the request has finished, holding everything (as CUMULATIVE).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class LogitBias(Mapping[int, float]):
    """A read-only, hashable token id -> bias mapping (so SamplingParams stays hashable)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[int, float]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: int) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"LogitBias({self._items!r})"


class ExtraArgs(Mapping[str, Any]):
    """A read-only, hashable copy of `SamplingParams.extra_args`: a dict whose keys are strings
    and whose values are JSON values (None, bool, int, finite float, str, lists and dicts of
    them). Hashes by its canonical JSON text. Nested values are copies: changing one does not
    change the request's arguments (`to_dict()` gives a fresh deep copy)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        if not isinstance(items, Mapping):
            raise ValueError(f"extra_args must be a dict with string keys, got {items!r}")
        _check_json("extra_args", items)
        self._items = copy.deepcopy(dict(items))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(json.dumps(self._items, sort_keys=True))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExtraArgs):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._items)

    def __repr__(self) -> str:
        return f"ExtraArgs({self._items!r})"


def _check_json(path: str, value: Any) -> None:
    """ValueError naming the path (extra_args.a[0].b) of the first value JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, got {value}")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be strings, got {key!r}")
            _check_json(f"{path}.{key}", item)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(f"{path}[{i}]", item)
        return
    raise ValueError(
        f"{path} must be a JSON value (null, bool, number, string, list, dict), "
        f"got {type(value).__name__} {value!r}"
    )


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping controls (vLLM's names and defaults).

    n: number of independent samples (completions) for the prompt.
    temperature: 0 is greedy; higher flattens the distribution.
    top_p: keep the most likely tokens whose probabilities sum to top_p (the smallest such set;
        tokens tied with the last one kept are kept too); in (0, 1].
    top_k: keep the k most likely tokens (and any tied with the k-th); -1 keeps all.
    min_p: drop tokens whose probability is below min_p times the most likely one's; in [0, 1].
    seed: per-request seed; the same seed gives the same tokens whatever else is in the batch.
    presence_penalty: subtracted from the logit of every token that occurs in the output so far;
        in [-2, 2].
    frequency_penalty: subtracted once per occurrence in the output so far; in [-2, 2].
    repetition_penalty: for tokens in the prompt or the output so far, positive logits are
        divided by it and negative ones multiplied (HF / CTRL); > 0, 1 disables.
    logit_bias: token id -> value added to its logit, in [-100, 100]. JSON's string keys are
        accepted and converted to int.
    min_tokens: the end-of-sequence and stop_token_ids tokens cannot be sampled, and stop strings
        do not match, before this many tokens are generated.
    max_tokens: the most tokens to generate (None: up to max_model_len).
    stop: strings that end generation when they appear in the output text; the text ends before
        the stop string unless include_stop_str_in_output.
    stop_token_ids: token ids that end generation (the token is kept in token_ids).
    include_stop_str_in_output: keep the matched stop string at the end of the text.
    ignore_eos: keep generating after the model's end-of-sequence tokens.
    logprobs: number of top logprobs to return beside each sampled token (None: none; 0: only
        the sampled token's). Logprobs are those of the raw model distribution (before any
        processing, temperature or truncation), as vLLM returns by default.
    prompt_logprobs: the same for every prompt token (the first prompt token has none).
    skip_special_tokens: drop special tokens from the output text.
    spaces_between_special_tokens: join kept special tokens to the text with spaces (slow
        tokenizers only, as in vLLM).
    allowed_token_ids: if given, only these token ids can be sampled.
    bad_words: words that must not be generated: a word's last token is banned whenever the
        output so far ends with the word's other tokens (with and without a leading space).
    output_kind: what each RequestOutput carries: RequestOutputKind.CUMULATIVE (everything so
        far), DELTA (only what is new since the previous output) or FINAL_ONLY (one output at
        the end). Accepts the enum, its value or its name.
    structured_outputs: the output must match a JSON schema, regex, choice or grammar
        (`StructuredOutputsParams`, or a dict of its fields, vLLM's names). The grammar's mask is
        applied after the logits processors and before temperature; logprobs stay the raw ones.
        A request whose grammar is complete and that emits end-of-sequence finishes with "stop".
    extra_args: per-request arguments for custom logits processors (vLLM's `extra_args`; the
        server fills it from the request's `vllm_xargs`): a JSON-like dict with string keys,
        kept as a read-only `ExtraArgs` mapping (a deep copy). The engine ignores it otherwise.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: LogitBias | None = None  # input: any Mapping[int | str, float]
    min_tokens: int = 0
    max_tokens: int | None = 16
    stop: tuple[str, ...] = field(default_factory=tuple)  # input: str, list of str or None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # input: list or None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: tuple[int, ...] | None = None  # input: a non-empty list of ids
    bad_words: tuple[str, ...] | None = None  # input: a list of str
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # input: also a dict of its fields
    extra_args: ExtraArgs | None = None  # input: a dict with str keys and JSON-like values

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -_MAX_ABS_PENALTY <= value <= _MAX_ABS_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
            if self.min_tokens > self.max_tokens:
                raise ValueError(
                    f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
                )
        object.__setattr__(self, "stop", _normalize_strings("stop", self.stop, allow_str=True))
        object.__setattr__(
            self, "stop_token_ids", _normalize_ids("stop_token_ids", self.stop_token_ids) or ()
        )
        for name in (
            "include_stop_str_in_output",
            "ignore_eos",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.allowed_token_ids is not None:
            ids = _normalize_ids("allowed_token_ids", self.allowed_token_ids)
            if not ids:
                raise ValueError("allowed_token_ids must not be empty")
            object.__setattr__(self, "allowed_token_ids", ids)
        if self.bad_words is not None:
            words = _normalize_strings("bad_words", self.bad_words, allow_str=False)
            object.__setattr__(self, "bad_words", words)
        object.__setattr__(self, "output_kind", _normalize_output_kind(self.output_kind))
        if self.structured_outputs is not None:
            structured = StructuredOutputsParams.from_dict(self.structured_outputs)
            object.__setattr__(self, "structured_outputs", structured)
        if self.extra_args is not None and not isinstance(self.extra_args, ExtraArgs):
            object.__setattr__(self, "extra_args", ExtraArgs(self.extra_args))

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def validate_for_model(self, vocab_size: int, max_logprobs: int) -> None:
        """The checks that need the model: token ids inside [0, vocab_size) and logprob counts
        within the engine's max_logprobs. Raises ValueError naming the field."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(
                    f"{name}: requested {value}, the most allowed is max_logprobs={max_logprobs}"
                )
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids or ()),
            ("logit_bias", tuple(self.logit_bias or ())),
        ):
            for token_id in ids:
                if token_id >= vocab_size:
                    raise ValueError(
                        f"{name}: token id {token_id} is outside the vocabulary [0, {vocab_size})"
                    )


def tokenize_bad_words(
    bad_words: Sequence[str] | None, tokenizer: Any
) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences of the bad words, each as it reads at the start of the text and after
    a space (the two ways a byte-level or SentencePiece tokenizer spells a word)."""
    sequences: list[tuple[int, ...]] = []
    for word in bad_words or ():
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in sequences:
                sequences.append(ids)
    return tuple(sequences)


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _normalize_ids(name: str, ids: Any) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    for token_id in ids:
        _check_int(name, token_id, minimum=0)
    return tuple(ids)


def _normalize_strings(name: str, values: Any, allow_str: bool) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        if not allow_str:
            raise ValueError(f"{name} must be a list of strings, got a string {values!r}")
        values = (values,)
    if not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {values!r}")
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must contain non-empty strings, got {value!r}")
    return tuple(values)


def _normalize_output_kind(kind: Any) -> RequestOutputKind:
    if isinstance(kind, RequestOutputKind):
        return kind
    if isinstance(kind, str) and kind.upper() in RequestOutputKind.__members__:
        return RequestOutputKind[kind.upper()]
    if isinstance(kind, int) and not isinstance(kind, bool):
        try:
            return RequestOutputKind(kind)
        except ValueError:
            pass
    names = ", ".join(k.name for k in RequestOutputKind)
    raise ValueError(f"output_kind must be a RequestOutputKind ({names}), got {kind!r}")


def _normalize_logit_bias(bias: Any) -> LogitBias | None:
    if bias is None:
        return None
    if isinstance(bias, LogitBias):
        return bias
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {bias!r}")
    items: dict[int, float] = {}
    for key, value in bias.items():
        try:
            # OpenAI's JSON has string keys ("50256"); ints and their string forms are accepted.
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token_id < 0:
            raise ValueError(f"logit_bias: token id {token_id} is negative")
        _check_number("logit_bias", value)
        if not -_MAX_ABS_LOGIT_BIAS <= value <= _MAX_ABS_LOGIT_BIAS:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for {key}")
        items[token_id] = float(value)
    return LogitBias(items)
