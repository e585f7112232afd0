"""The n-gram proposer's packed-bytes search finds exactly what a plain scan finds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spec_decode.ngram import NgramProposer


def reference_propose(tokens, k, min_n, max_n, max_tokens=None):
    """The obvious scan: for n from max_n down, the latest earlier occurrence of the tail."""
    limit = k if max_tokens is None else min(k, max_tokens)
    if limit <= 0:
        return []
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                follow = tokens[start + n : start + n + limit]
                if follow:
                    return follow
    return []


# Ids whose 8-byte encodings share bytes (0, 255, 256, ...) make misaligned byte matches likely.
TOKEN = st.one_of(st.integers(0, 3), st.sampled_from([0, 255, 256, 65535, 65536, 2**40]))


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(TOKEN, max_size=40),
    k=st.integers(1, 5),
    min_n=st.integers(1, 3),
    extra=st.integers(0, 3),
    max_tokens=st.one_of(st.none(), st.integers(0, 6)),
)
def test_matches_the_plain_scan(tokens, k, min_n, extra, max_tokens):
    proposer = NgramProposer(k, min_n, min_n + extra)
    want = reference_propose(tokens, k, min_n, min_n + extra, max_tokens)
    assert proposer.propose(tokens, max_tokens) == want


def test_a_match_straddling_token_boundaries_is_not_taken():
    # Little-endian, 256 then 0 reads 00 01 00 .. 00: the bytes of token 1 from offset 1.
    assert NgramProposer(2, 1, 1).propose([256, 0, 5, 1]) == []
    # ... and the search goes on to the aligned occurrence further left
    assert NgramProposer(2, 1, 1).propose([1, 7, 256, 0, 5, 1]) == [7, 256]


def test_registry_ngram_proposer_reads_the_request():
    """The registry's `ngram` method: the config's limits, over request.all_token_ids."""
    from types import SimpleNamespace

    from engine.config import SpeculativeConfig
    from engine.spec_decode.registry import build_proposer

    spec = SpeculativeConfig.from_value(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    )
    proposer = build_proposer(spec, model_config=None)
    request = SimpleNamespace(all_token_ids=[4, 5, 6, 7, 8, 4, 5])
    assert proposer.propose(request, 3) == [6, 7, 8]
    assert proposer.propose(request, 1) == [6]
