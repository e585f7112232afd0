"""Tokenizer loading, chat templating and incremental (streaming) detokenization.

This module owns the boundary between token ids and text:

* ``load_tokenizer`` loads a Hugging Face tokenizer and turns any failure into one ``ValueError``
  that names the path.
* ``apply_chat_template`` renders a conversation with the tokenizer's (or a given) chat template
  and always returns a plain ``list[int]``, whatever container ``transformers`` hands back.
* ``IncrementalDetokenizer`` turns a growing stream of output token ids into text deltas.

Invariants of ``IncrementalDetokenizer``:

* A delta is final: text once returned is never revised. A character whose bytes are spread
  over several tokens (emoji, CJK with byte-level BPE) is held back until it is complete, so no
  delta ever shows a U+FFFD that a later token would have completed.
* For a byte-level or SentencePiece-style tokenizer, the deltas joined together with
  ``flush()`` equal ``tokenizer.decode(output_ids, skip_special_tokens=...)``. (With
  SentencePiece the first output token's leading space is kept, as it follows the prompt; a
  plain decode of the output alone would drop it.)
* Each call decodes only a short window of recent tokens, so the work per call is proportional
  to the number of new tokens, not to the length of the output so far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

__all__ = ["IncrementalDetokenizer", "apply_chat_template", "load_tokenizer"]


def load_tokenizer(
    model: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with ``model`` (a local directory or a hub id)."""
    try:
        return AutoTokenizer.from_pretrained(
            str(model), revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... here
        raise ValueError(f"could not load a tokenizer from {str(model)!r}: {exc}") from exc


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **kwargs: Any,
) -> list[int]:
    """Render ``messages`` with the chat template and return the prompt's token ids.

    ``chat_template`` overrides the tokenizer's own template. Extra ``kwargs`` reach the
    template (e.g. ``tools``, ``enable_thinking``).
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template=... or use a plain prompt"
        )
    result = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        tokenize=True,
        # transformers 5 defaults to a BatchEncoding; ask for the bare ids (and still normalise
        # below, since older versions and custom tokenizers differ in what they return).
        return_dict=False,
        **kwargs,
    )
    return _as_token_ids(result)


def _as_token_ids(result: Any) -> list[int]:
    """Flatten whatever ``apply_chat_template`` returned into one ``list[int]``."""
    if isinstance(result, Mapping):  # BatchEncoding is a Mapping (a UserDict subclass)
        result = result["input_ids"]
    if hasattr(result, "tolist"):  # a tensor or ndarray
        result = result.tolist()
    if isinstance(result, Sequence) and len(result) == 1 and isinstance(result[0], Sequence):
        result = result[0]  # a batch of one conversation
    if not isinstance(result, Sequence) or not all(
        isinstance(t, int) or hasattr(t, "__index__") for t in result
    ):
        raise TypeError(f"apply_chat_template returned {type(result).__name__}, not token ids")
    return [int(t) for t in result]


# How many prompt tokens to decode in front of the output. A handful is enough for the output's
# first token to be rendered as it would be mid-text (e.g. SentencePiece keeps its leading
# space), and to reach back over any token-level merging the decoder does.
_PROMPT_CONTEXT_TOKENS = 5
# A byte-level tokenizer needs at most 3 more one-byte tokens to finish a UTF-8 character.
# Beyond this many pending tokens, still ending in U+FFFD means the bytes are really invalid
# (e.g. a model looping on a stray continuation byte): look for a safe point to release them
# rather than holding (and re-decoding) an ever longer tail.
_MAX_PENDING_TOKENS = 8
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of one sequence's output tokens as they are generated.

    Keeps the output's token strings plus two offsets into them (as vLLM does): text up to
    ``_read_offset`` has been returned; ``_prefix_offset`` marks where the decode window starts,
    a few tokens earlier, so that the window's first token is rendered with its left context.
    Each call decodes ``tokens[prefix:read]`` and ``tokens[prefix:]``; the difference is the
    candidate delta, returned only once it does not end in a half-built character.

    ``spaces_between_special_tokens`` matters only for tokenizers without a fast (Rust)
    backend, where, as in vLLM, kept added tokens are rendered verbatim and joined to the
    neighbouring text with a space (or not). A fast tokenizer's decoder renders added tokens
    inline itself, and so does this class, so that the text matches ``decode``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._is_fast = bool(getattr(tokenizer, "is_fast", False))
        self._skip_ids = (
            _special_ids(tokenizer, fast=self._is_fast) if skip_special_tokens else set()
        )
        # Added tokens get verbatim rendering on the slow path only (see class docstring).
        self._added_vocab: set[str] = set() if self._is_fast else set(tokenizer.get_added_vocab())

        self._output_ids: list[int] = []
        self._text_chunks: list[str] = []
        self._text_cache: str | None = ""

        # Token strings of the prompt context followed by those of the output. A few extra ids
        # are converted so that skipped special tokens at the prompt's end (a chat template's
        # header) do not eat into the context.
        context = self._to_tokens(prompt_token_ids[-(_PROMPT_CONTEXT_TOKENS + 8) :])
        context = context[-_PROMPT_CONTEXT_TOKENS:]
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character (or with a real U+FFFD): the window would not
            # split cleanly at the prompt/output boundary, so decode the output on its own.
            context, context_text = [], ""
        self._tokens: list[str] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text

    @property
    def text(self) -> str:
        """All output text made final so far (the prompt is not included)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._text_chunks)
        return self._text_cache

    @property
    def token_ids(self) -> list[int]:
        """All output token ids seen so far, special ones included. Do not mutate."""
        return self._output_ids

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append newly generated tokens; return the text they made final (possibly "")."""
        self._output_ids.extend(new_token_ids)
        new_tokens = self._to_tokens(new_token_ids)
        if not new_tokens:
            return ""
        self._tokens.extend(new_tokens)

        window_text = self._decode(self._tokens[self._prefix_offset :])
        if window_text.endswith(_REPLACEMENT_CHAR):
            if len(self._tokens) - self._read_offset > _MAX_PENDING_TOKENS:
                return self._release_invalid_prefix(window_text)
            return ""  # Hold back: the next token may complete the character.
        if len(window_text) <= len(self._prefix_text):
            return ""  # Nothing visible yet (e.g. a token that decodes to nothing on its own).
        return self._advance(window_text, len(self._tokens))

    def flush(self) -> str:
        """Return any held-back text; call once the sequence has finished.

        Incomplete or invalid bytes come out as U+FFFD, exactly as ``decode`` renders them.
        """
        if self._read_offset == len(self._tokens):
            return ""
        window_text = self._decode(self._tokens[self._prefix_offset :])
        delta = window_text[len(self._prefix_text) :]
        if window_text.endswith(_REPLACEMENT_CHAR):
            # Anything appended later must not be able to rewrite this U+FFFD, so restart the
            # window after it (dropping left context).
            self._prefix_offset = self._read_offset = len(self._tokens)
            self._prefix_text = ""
            self._emit(delta)
            return delta
        return self._advance(window_text, len(self._tokens))

    # ---- internals ---------------------------------------------------------------------------

    def _advance(self, window_text: str, new_read_offset: int) -> str:
        """Emit ``window_text`` past the already-returned prefix and slide the window."""
        delta = window_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = new_read_offset
        # The next window starts at the old read offset; its already-returned part is this
        # call's delta text, re-decoded from that offset (cheap: only the new tokens).
        self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        self._emit(delta)
        return delta

    def _release_invalid_prefix(self, window_text: str) -> str:
        """Emit the longest pending run whose text no later token can change.

        A split point ``r`` is safe when decoding the window in two parts at ``r`` gives the
        same text as decoding it whole: for UTF-8 with maximal-subpart replacement (byte-level
        BPE), how the bytes before ``r`` decode depends only on the first byte after it, which
        is known. (A ``ByteFallback`` decoder judges a whole run of byte tokens at once, so
        after a long invalid run its U+FFFDs may differ in number from ``decode``'s.)
        """
        window = self._tokens[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        for split in range(len(window) - 1, read, -1):
            head = self._decode(window[:split])
            if len(head) <= len(self._prefix_text) or not head.startswith(self._prefix_text):
                continue
            if head + self._decode(window[split:]) == window_text:
                return self._advance(head, self._prefix_offset + split)
        return ""

    def _emit(self, delta: str) -> None:
        if delta:
            self._text_chunks.append(delta)
            self._text_cache = None

    def _to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Token strings for ``token_ids``, minus skipped specials and ids the vocab lacks."""
        tokens: list[str] = []
        for token_id in token_ids:
            if token_id in self._skip_ids:
                continue
            token = self.tokenizer.convert_ids_to_tokens(int(token_id))
            # Ids past the vocabulary (a model's padded embedding rows) decode to nothing,
            # as in decode().
            if token is not None:
                tokens.append(token)
        return tokens

    def _decode(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        if not self._added_vocab:
            return self.tokenizer.convert_tokens_to_string(tokens)
        # Slow tokenizer: render added tokens verbatim, the runs between them with the
        # tokenizer's own rules, and join the pieces as requested.
        pieces: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_vocab:
                if run:
                    pieces.append(self.tokenizer.convert_tokens_to_string(run))
                    run = []
                pieces.append(token)
            else:
                run.append(token)
        if run:
            pieces.append(self.tokenizer.convert_tokens_to_string(run))
        return (" " if self.spaces_between_special_tokens else "").join(pieces)


def _special_ids(tokenizer: PreTrainedTokenizerBase, *, fast: bool) -> set[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops for this tokenizer.

    A fast tokenizer's Rust decoder drops every added token flagged special, which can include
    tokens (e.g. ``<think>``) missing from ``all_special_ids``; a slow one drops exactly
    ``all_special_ids``.
    """
    ids = set(tokenizer.all_special_ids)
    if fast:
        ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids
