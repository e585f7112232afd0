"""Grammar matchers per request, their token bitmasks, and the compiled-grammar cache.

The grammar engine is llguidance (see the README's "Structured outputs" for why). One
`GrammarCompiler` per engine wraps the tokenizer once (about a second at a 49k vocabulary) and
keeps a bounded LRU cache of compiled grammars: a compiled grammar is an `LLMatcher` in its
initial state, and each request gets a `deep_copy` of it, so a schema is compiled once however
many requests use it.

A `GrammarMatcher` is one request's state: the matcher has consumed exactly the first
`num_processed` output tokens of the request. Two ways to ask which tokens may come next:

- `allowed_token_ids_reference()`: asks the matcher about every token id, one at a time
  (`validate_tokens([t])`): slow and obvious. One rule of llguidance's masks is applied on top,
  found by the property tests and kept deliberately: where the grammar forces the next bytes
  and llguidance knows their canonical tokenization (`compute_ff_tokens`), a token spelling only
  part of the forced bytes is allowed only if it is that tokenization's first token (after `f`
  in a JSON boolean, `al` of `al|se` but not `a`), so forced text is tokenized the way the
  tokenizer would tokenize it. Tokens reaching past the forced bytes are judged as usual.
- `fill_bitmask(row)`: the engine's packed bitmask, one bit per token id (bit t % 32 of int32
  word t // 32; 1 = allowed), computed by the grammar engine in one call.

Property tests check the two agree on random grammars and states. `bitmask_to_bool` and
`apply_bitmask` unpack and apply bitmasks on the logits' device (CPU or CUDA).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from engine.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
DEFAULT_CACHE_SIZE = 128  # compiled grammars kept per engine (least recently used go first)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row for a vocabulary of vocab_size tokens."""
    return (vocab_size + 31) // 32


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 packed -> [B, vocab_size] bool (True = allowed); token ids past 32 * W are
    not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1).bool()  # [B, 32 W]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(
        bitmask.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool, device=bitmask.device
    )
    return torch.cat([allowed, pad], dim=1)


def bitmask_allows(bitmask: torch.Tensor, token_id: int) -> bool:
    """Whether a [W] int32 bitmask allows token_id."""
    word = token_id // 32
    return word < bitmask.shape[0] and bool((int(bitmask[word]) >> (token_id % 32)) & 1)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V], bitmask [B, W] int32 -> logits with disallowed tokens at -inf (a new
    tensor; the bitmask is moved to the logits' device)."""
    allowed = bitmask_to_bool(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill(~allowed, _NEG_INF)


class GrammarMatcher:
    """One request's grammar state. Not thread-safe; owned by the engine's step loop."""

    __slots__ = (
        "_eos_uncounted",
        "_matcher",
        "_token_bytes",
        "eos_token_ids",
        "num_processed",
        "terminated",
        "vocab_size",
    )

    def __init__(
        self,
        matcher: Any,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        token_bytes: Any = None,
    ) -> None:
        self._matcher = matcher
        self._token_bytes = token_bytes  # () -> list[bytes], each token's bytes (reference only)
        self.vocab_size = vocab_size  # the model's: the logits' width
        self.num_processed = 0  # output tokens consumed so far
        self.terminated = False  # consumed an end-of-sequence token in an accepting state
        self.eos_token_ids = eos_token_ids
        # The terminating end-of-sequence came when the matcher was already stopped: llguidance
        # then records no token for it, so a rollback must not count it.
        self._eos_uncounted = False

    # ---- asking -------------------------------------------------------------------------------

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Writes the allowed-next-token bitmask into row ([W] int32, contiguous, CPU)."""
        assert row.dtype == torch.int32 and row.is_contiguous() and row.device.type == "cpu"
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def bitmask(self) -> torch.Tensor:
        """A fresh [W] int32 bitmask of the tokens allowed next."""
        row = torch.zeros(bitmask_width(self.vocab_size), dtype=torch.int32)
        self.fill_bitmask(row)
        return row

    def is_allowed(self, token_id: int) -> bool:
        """The reference question: may token_id come next? (one matcher call). A stopped
        matcher (the grammar is complete and admits nothing more) allows only end-of-sequence,
        as llguidance documents; a matcher in an error state allows nothing."""
        if self._matcher.is_error():
            return False
        if self._matcher.is_stopped():
            return token_id in self.eos_token_ids
        return self._matcher.validate_tokens([token_id]) == 1

    def allowed_token_ids_reference(self) -> list[int]:
        """Every allowed next token, asking the matcher token by token (slow, obvious), with
        the forced-bytes rule of the module docstring."""
        allowed = [t for t in range(self.vocab_size) if self.is_allowed(t)]
        forced = self._matcher.compute_ff_bytes() if allowed else b""
        canonical = self._matcher.compute_ff_tokens() if forced else []
        if not canonical:
            return allowed
        spelled = self._token_bytes()
        return [
            t
            for t in allowed
            if t == canonical[0] or not (spelled[t] and forced.startswith(spelled[t]))
        ]

    @property
    def is_error(self) -> bool:
        return self._matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    # ---- moving -------------------------------------------------------------------------------

    def accept(self, token_ids: Sequence[int]) -> int:
        """Consumes tokens in order until one is refused; returns how many were consumed. A
        refused token leaves the matcher as it was before it (still usable)."""
        done = 0
        for token_id in token_ids:
            if self.terminated:
                break
            if token_id in self.eos_token_ids and self._matcher.is_stopped():
                if self._matcher.is_error():
                    break
                self._eos_uncounted = True  # llguidance would not record it
            elif self._matcher.validate_tokens([token_id]) != 1:
                break  # refused: llguidance would enter its error state if it consumed it
            elif not self._matcher.consume_token(token_id):
                break
            if token_id in self.eos_token_ids:
                self.terminated = True
            done += 1
        self.num_processed += done
        return done

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last num_tokens consumed tokens."""
        if num_tokens <= 0:
            return
        if num_tokens > self.num_processed:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_processed} tokens")
        in_matcher = num_tokens - (1 if self._eos_uncounted else 0)
        if in_matcher and not self._matcher.rollback(in_matcher):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")
        self.num_processed -= num_tokens
        self.terminated = self._eos_uncounted = False

    def reset(self) -> None:
        self._matcher.reset()
        self.num_processed = 0
        self.terminated = self._eos_uncounted = False

    def sync(self, output_token_ids: Sequence[int]) -> bool:
        """Brings the matcher to exactly output_token_ids: rolls back tokens the request no
        longer has (dropped after a stop string), then consumes the new ones. Returns False when
        the grammar refuses a token (the matcher then stays before it)."""
        if self.num_processed > len(output_token_ids):
            self.rollback(self.num_processed - len(output_token_ids))
        new = output_token_ids[self.num_processed :]
        return self.accept(new) == len(new)


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer, with a bounded LRU cache."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        import llguidance.hf

        eos = [int(t) for t in eos_token_ids]
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [int(tokenizer.eos_token_id)]  # the model names none: the tokenizer's
        eos = eos or None
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos or ())
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=eos
        )
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._token_bytes: list[bytes] | None = None
        self.num_compiles = 0  # grammars compiled (cache misses), for tests and logs

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The initial-state matcher of params' grammar (cached). ValueError if it fails."""
        from llguidance import LLMatcher

        source = params.grammar_source()
        template = self._cache.get(source)
        if template is not None:
            self._cache.move_to_end(source)
            return template
        template = LLMatcher(self.ll_tokenizer, source, log_level=0)
        if template.is_error():
            field_name = "json" if params.form == "json_object" else params.form
            raise ValueError(
                f"structured_outputs.{field_name}: the grammar engine (llguidance) cannot "
                f"compile it: {template.get_error()}"
            )
        self.num_compiles += 1
        self._cache[source] = template
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return template

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher for one request (a copy of the cached compiled grammar)."""
        return GrammarMatcher(
            self.compile(params).deep_copy(), self.vocab_size, self.eos_token_ids, self.token_bytes
        )

    def token_bytes(self) -> list[bytes]:
        """Each token id's bytes (b"" for ids past the tokenizer's), computed once."""
        if self._token_bytes is None:
            n = self.ll_tokenizer.vocab_size
            self._token_bytes = [
                self.ll_tokenizer.decode_bytes([t]) if t < n else b""
                for t in range(self.vocab_size)
            ]
        return self._token_bytes
