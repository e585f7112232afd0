"""Tests for engine.tokenizer: loading, chat templates and incremental detokenization.

The detokenizer's contract is checked against ``tokenizer.decode`` on the demo byte-level
tokenizer, whose vocabulary splits most non-ASCII characters over several tokens.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BatchEncoding, PreTrainedTokenizer, PreTrainedTokenizerFast

from engine.demo import build_tokenizer
from engine.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer

HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _bytes_to_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_SYMBOL = _bytes_to_symbols()


def byte_token(tok: PreTrainedTokenizerFast, value: int) -> int:
    """Id of the single-byte token for ``value`` (every byte has one in the demo vocab)."""
    token_id = tok.convert_tokens_to_ids(_BYTE_SYMBOL[value])
    assert isinstance(token_id, int)
    return token_id


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None
) -> list[str]:
    """Feed ``ids`` in chunks (one at a time by default); return every delta plus flush()."""
    deltas: list[str] = []
    pos = 0
    sizes = iter(chunk_sizes or [])
    while pos < len(ids):
        size = max(1, next(sizes, 1))
        deltas.append(detok.add_tokens(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.flush())
    return deltas


# ---- incremental detokenization: properties -----------------------------------------------------


@HYPOTHESIS
@given(text=st.text(max_size=60), prompt=st.text(max_size=20), data=st.data())
def test_deltas_of_valid_text_equal_decode(
    tok: PreTrainedTokenizerFast, text: str, prompt: str, data: st.DataObject
) -> None:
    ids = tok.encode(text)
    prompt_ids = tok.encode(prompt)
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=len(ids)))
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = stream(detok, ids, chunks)

    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == unicodedata.normalize("NFC", text)
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert detok.token_ids == ids
    if "\ufffd" not in text:
        # Valid text: no delta may show a replacement for a half-received character.
        assert not any("\ufffd" in d for d in deltas)
        assert deltas[-1] == ""  # and nothing is left for flush()


@HYPOTHESIS
@given(
    ids=st.lists(st.integers(0, 1023), max_size=40),
    prompt_ids=st.lists(st.integers(0, 1023), max_size=8),
    skip=st.booleans(),
    data=st.data(),
)
def test_deltas_of_arbitrary_ids_equal_decode(
    tok: PreTrainedTokenizerFast,
    ids: list[int],
    prompt_ids: list[int],
    skip: bool,
    data: st.DataObject,
) -> None:
    # Arbitrary ids include stray and truncated UTF-8 sequences and special tokens.
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)))
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas = stream(detok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert detok.text == "".join(deltas)


@HYPOTHESIS
@given(
    pieces=st.lists(
        st.one_of(
            st.integers(0x80, 0xFF).map(lambda b: bytes([b])), st.text(max_size=2).map(str.encode)
        ),
        max_size=30,
    ),
    tail=st.text(max_size=5),
)
def test_byte_soup_matches_decode(
    tok: PreTrainedTokenizerFast, pieces: list[bytes], tail: str
) -> None:
    # One token per byte: stray bytes mixed with whole characters give long runs of pending
    # tokens, some invalid for good and some completed later.
    ids = [byte_token(tok, b) for b in b"".join(pieces)] + tok.encode(tail)
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(stream(detok, ids)) == tok.decode(ids)


# ---- incremental detokenization: specific cases -------------------------------------------------


def test_emoji_split_over_byte_tokens_is_emitted_whole(tok: PreTrainedTokenizerFast) -> None:
    text = "Ride a 🚲 to the 🏔️, then eat 🍣 and say 你好"
    ids = tok.encode(text)
    assert len(tok.tokenize(" 🚲")) > 1 and len(tok.tokenize(" 🍣")) > 1  # really split
    detok = IncrementalDetokenizer(tok, tok.encode("User says:"))
    deltas = [detok.add_tokens([i]) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    for char in ("🚲", "🍣", "你", "好"):
        assert any(char in d for d in deltas)  # each arrives whole, in one delta
    assert any(d == "" for d in deltas)  # something was held back mid-character
    assert detok.flush() == ""
    assert detok.text == text


def test_flush_releases_truncated_character(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("ok ") + [byte_token(tok, b) for b in "🚲".encode()[:3]]
    detok = IncrementalDetokenizer(tok, [])
    held = "".join(detok.add_tokens([i]) for i in ids)
    assert held == "ok "  # the three bytes of a four-byte character are held back
    assert detok.flush() == "\ufffd"
    assert detok.text == tok.decode(ids) == "ok \ufffd"
    assert detok.flush() == ""  # idempotent
    # Tokens after a flush start afresh: the released U+FFFD is never rewritten.
    assert detok.add_tokens(tok.encode("fine")) == "fine"
    assert detok.text == "ok \ufffdfine"


def test_endless_invalid_bytes_are_streamed_not_hoarded(tok: PreTrainedTokenizerFast) -> None:
    # A model stuck on a stray continuation byte: each decoded window ends in U+FFFD, but
    # the text must still stream out (and stay equal to decode()).
    for value in (0x80, 0xF0):
        ids = [byte_token(tok, value)] * 100
        detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
        before_flush = "".join(detok.add_tokens([i]) for i in ids)
        assert len(before_flush) >= 90
        assert before_flush + detok.flush() == tok.decode(ids) == "\ufffd" * 100


def test_prompt_ending_mid_character(tok: PreTrainedTokenizerFast) -> None:
    emoji = "🚲".encode()
    prompt = tok.encode("see ") + [byte_token(tok, b) for b in emoji[:2]]
    out = [byte_token(tok, b) for b in emoji[2:]] + tok.encode(" go")
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(detok, out)) == tok.decode(out) == "\ufffd\ufffd go"


def test_prompt_context_does_not_leak_into_text(tok: PreTrainedTokenizerFast) -> None:
    prompt = apply_chat_template(tok, [{"role": "user", "content": "Tell me about 日本"}])
    ids = tok.encode(" The river runs past the mill. 日本語")
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(detok, ids)) == " The river runs past the mill. 日本語"


def test_skip_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [im_start, *tok.encode("Hello"), im_end, *tok.encode(" world")]

    skipping = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(stream(skipping, ids)) == "Hello world"
    assert skipping.token_ids == ids  # ids are kept even when their text is not

    keeping = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    deltas = stream(keeping, ids)
    assert "".join(deltas) == "<|im_start|>Hello<|im_end|> world"
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=False)
    assert deltas[0] == "<|im_start|>"


def test_added_special_token_outside_all_special_ids_is_skipped() -> None:
    # The Rust decoder skips every added token flagged special, including ones transformers
    # does not list in all_special_ids; the detokenizer must agree with decode().
    tok = build_tokenizer()
    tok.add_tokens(["<think>"], special_tokens=True)
    think = tok.convert_tokens_to_ids("<think>")
    ids = [think, *tok.encode("hmm"), think]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=True) == "hmm"


def test_ids_beyond_the_vocabulary_decode_to_nothing(tok: PreTrainedTokenizerFast) -> None:
    # Models often pad their embedding past the tokenizer's vocabulary.
    ids = [*tok.encode("a"), len(tok) + 5, *tok.encode("b")]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(stream(detok, ids)) == "ab"


def test_spaces_between_special_tokens_is_decode_for_fast_tokenizers(
    tok: PreTrainedTokenizerFast,
) -> None:
    ids = [*tok.encode("a"), tok.convert_tokens_to_ids("<|im_end|>"), *tok.encode("b")]
    for spaces in (True, False):
        detok = IncrementalDetokenizer(
            tok, [], skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        assert "".join(stream(detok, ids)) == "a<|im_end|>b"


class _CharTokenizer(PreTrainedTokenizer):
    """A minimal pure-Python (slow) tokenizer: one token per printable ASCII character."""

    def __init__(self, **kwargs: Any) -> None:
        self._vocab = {chr(c): c - 32 for c in range(32, 127)}
        self._inverse = {i: t for t, i in self._vocab.items()}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self.added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._inverse[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def test_spaces_between_special_tokens_on_a_slow_tokenizer() -> None:
    slow = _CharTokenizer(eos_token="<eos>")
    eos = slow.convert_tokens_to_ids("<eos>")
    ids = [*slow.encode("ab", add_special_tokens=False), eos, *slow.encode("cd")]
    assert not slow.is_fast
    for spaces, expected in ((True, "ab <eos> cd"), (False, "ab<eos>cd")):
        detok = IncrementalDetokenizer(
            slow, [], skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        assert "".join(stream(detok, ids)) == expected
    detok = IncrementalDetokenizer(slow, [], skip_special_tokens=True)
    assert "".join(stream(detok, ids)) == "abcd"


def test_work_per_step_is_bounded(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode("The lighthouse keeper wrote in the log every morning. " * 40)
    detok = IncrementalDetokenizer(tok, [])
    longest = 0
    original = detok._decode

    def counting_decode(tokens: list[str]) -> str:
        nonlocal longest
        longest = max(longest, len(tokens))
        return original(tokens)

    detok._decode = counting_decode  # type: ignore[method-assign]
    stream(detok, ids)
    assert len(ids) > 300
    assert longest <= 8  # windows stay a few tokens long however long the output grows


# ---- apply_chat_template ------------------------------------------------------------------------


def test_apply_chat_template_returns_plain_ints(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋"},
    ]
    ids = apply_chat_template(tok, messages)
    assert type(ids) is list and all(type(i) is int for i in ids)
    header = tok.encode("<|im_start|>assistant\n")
    assert ids[-len(header) :] == header
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 👋<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert ids[: len(without)] == without
    assert tok.decode(without).endswith("<|im_end|>\n")


def test_apply_chat_template_override_and_kwargs(tok: PreTrainedTokenizerFast) -> None:
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ suffix }}"
    ids = apply_chat_template(
        tok, [{"role": "user", "content": "x"}], chat_template=template, suffix="!"
    )
    assert tok.decode(ids) == "[x]!"


def test_apply_chat_template_without_template_raises() -> None:
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        apply_chat_template(bare, [{"role": "user", "content": "hi"}])
    # A template given explicitly is enough.
    assert apply_chat_template(
        bare, [{"role": "user", "content": "hi"}], chat_template="{{ messages[0]['content'] }}"
    ) == bare.encode("hi")


class _StubTokenizer:
    """Returns a fixed object from apply_chat_template, as other transformers versions do."""

    chat_template = "stub"

    def __init__(self, result: object) -> None:
        self.result = result

    def apply_chat_template(self, *args: object, **kwargs: object) -> object:
        return self.result


@pytest.mark.parametrize(
    "result",
    [
        [5, 6, 7],
        BatchEncoding({"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}),
        {"input_ids": [[5, 6, 7]]},
        torch.tensor([[5, 6, 7]]),
        torch.tensor([5, 6, 7]),
    ],
    ids=["list", "batch-encoding", "dict-batch", "tensor-2d", "tensor-1d"],
)
def test_apply_chat_template_normalises_return_types(result: object) -> None:
    ids = apply_chat_template(_StubTokenizer(result), [])  # type: ignore[arg-type]
    assert ids == [5, 6, 7] and all(type(i) is int for i in ids)


def test_apply_chat_template_rejects_text() -> None:
    with pytest.raises(TypeError):
        apply_chat_template(_StubTokenizer("not ids"), [])  # type: ignore[arg-type]


# ---- load_tokenizer -----------------------------------------------------------------------------


def test_load_tokenizer_round_trips(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Hélène's café: 12 loaves, 日本語 🚲"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token == "<|im_end|>" and loaded.chat_template == tok.chat_template


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_load_tokenizer_errors_name_the_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nowhere"
    if kind == "empty":
        path.mkdir()
    with pytest.raises(ValueError, match="nowhere"):
        load_tokenizer(path)
