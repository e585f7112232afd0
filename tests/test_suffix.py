"""Suffix decoding: the counted suffix trie equals brute-force substring counts (also after
evictions), proposals follow the most frequent continuation under the documented limits, the
global trie carries one request's output to the next, and bad settings are named ValueErrors.
(Greedy output unchanged with suffix drafts: tests/property/test_engine_lockstep.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import EngineArgs
from engine.config import SpeculativeConfig
from engine.spec_decode.suffix import SuffixDecodingProposer, SuffixTrie


def brute_count(sequences: list[list[int]], pattern: list[int]) -> int:
    n = len(pattern)
    return sum(seq[i : i + n] == pattern for seq in sequences for i in range(len(seq) - n + 1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), max_size=20), min_size=1, max_size=4),
    st.integers(1, 6),
    st.data(),
)
def test_trie_counts_equal_brute_force(sequences, depth, data):
    incremental = SuffixTrie(depth)
    incremental.extend(sequences[0])
    whole = SuffixTrie(depth)
    for seq in sequences:
        whole.add_sequence(seq)
    # evict a random subset again: counts must equal those of the rest
    evicted = data.draw(st.sets(st.integers(0, len(sequences) - 1)))
    for i in evicted:
        whole.add_sequence(sequences[i], sign=-1)
    kept = [s for i, s in enumerate(sequences) if i not in evicted]
    for _ in range(20):
        pattern = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=depth))
        assert whole.count(pattern) == brute_count(kept, pattern)
        assert incremental.count(pattern) == brute_count(sequences[:1], pattern)
    if not kept:  # every node was dropped: nothing leaks after eviction
        assert whole.root.children == {}


def request(tokens, request_id="r", output=()):
    return SimpleNamespace(
        request_id=request_id,
        all_token_ids=list(tokens),
        output_token_ids=list(output),
        is_finished=False,
    )


def test_proposes_the_most_frequent_continuation():
    # The longest earlier tail is "0 1 2" (m = 3): followed once by 3 4 5 0 and once by 9, a
    # 1/2 tie that goes to the smaller id; then 4, 5, 0 each with probability 1.
    tokens = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 9, 0, 1, 2]
    # max_spec_factor 1.0: at most 1.0 x m = 3 tokens
    assert SuffixDecodingProposer(4, max_tree_depth=8).propose(request(tokens), 4) == [3, 4, 5]
    wide = SuffixDecodingProposer(4, max_tree_depth=8, max_spec_factor=2.0)
    assert wide.propose(request(tokens), 4) == [3, 4, 5, 0]
    assert wide.propose(request(tokens), 2) == [3, 4]  # max_tokens caps it
    # the trie depth caps it too: m + drafts <= max_tree_depth
    assert SuffixDecodingProposer(4, max_tree_depth=5, max_spec_factor=2.0).propose(
        request(tokens), 4
    ) == [3, 4]
    # a frequent continuation beats a rare one: "1 7" is new, and after "7" came 8 twice, 6 once
    assert SuffixDecodingProposer(1).propose(request([7, 8, 7, 6, 7, 8, 1, 7]), 1) == [8]


def test_min_token_prob_stops_unlikely_paths():
    tokens = [5, 1, 5, 2, 5, 3, 5, 4, 5]  # after 5: four different tokens, 1/4 each
    assert SuffixDecodingProposer(4, min_token_prob=0.3).propose(request(tokens), 4) == []
    assert SuffixDecodingProposer(4, min_token_prob=0.2).propose(request(tokens), 4) != []


def test_no_match_no_proposal_and_incremental_update():
    proposer = SuffixDecodingProposer(3, max_tree_depth=6)
    req = request([1, 2, 3])
    assert proposer.propose(req, 3) == []
    req.all_token_ids += [1, 2]  # the engine appends tokens between steps
    assert proposer.propose(req, 3) == [3, 1]  # match "1 2": at most 2 tokens
    assert proposer.num_tracked_requests == 1


def test_global_trie_carries_finished_outputs_to_other_requests():
    proposer = SuffixDecodingProposer(4, max_tree_depth=8, max_cached_requests=1)
    done = request([7, 7, 10, 11, 12, 13, 14], "a", output=[10, 11, 12, 13, 14])
    proposer.propose(done, 4)
    proposer.finish(done)
    assert proposer.num_tracked_requests == 0
    other = request([50, 60, 10, 11], "b")
    assert proposer.propose(other, 4) == [12, 13]  # factor 1.0 x match length 2
    # max_cached_requests=1: a second finished request evicts the first
    proposer.finish(request([1], "c", output=[20, 21, 22]))
    assert proposer.global_trie.count([10, 11]) == 0
    assert proposer.global_trie.count([20, 21]) == 1


def test_aborted_requests_are_swept(monkeypatch):
    from engine.spec_decode import suffix

    monkeypatch.setattr(suffix, "_SWEEP_EVERY", 2)
    proposer = SuffixDecodingProposer(2)
    gone = request([1, 2, 1], "gone")
    proposer.propose(gone, 2)
    gone.is_finished = True  # aborted: the speculator never sees it again
    proposer.propose(request([3], "live"), 2)
    assert proposer.num_tracked_requests == 1


def test_config_defaults_use_vllm_names():
    spec = SpeculativeConfig.from_value({"method": "suffix", "num_speculative_tokens": 3})
    assert spec.suffix_decoding_max_tree_depth == 24
    assert spec.suffix_decoding_max_cached_requests == 10000
    assert spec.suffix_decoding_max_spec_factor == 1.0
    assert spec.suffix_decoding_min_token_prob == 0.1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix_decoding_max_tree_depth", 0),
        ("suffix_decoding_max_tree_depth", 2.5),
        ("suffix_decoding_max_cached_requests", -1),
        ("suffix_decoding_max_spec_factor", -0.5),
        ("suffix_decoding_min_token_prob", 1.5),
        ("suffix_decoding_min_token_prob", True),
    ],
)
def test_bad_suffix_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"speculative_config.{field}"):
        EngineArgs(
            model="x",
            speculative_config={"method": "suffix", "num_speculative_tokens": 2, field: value},
        )


def test_long_copies_get_full_proposals():
    """Copying a long span (code rewriting): the match is capped at depth - k, so k drafts fit
    in the trie's depth (a match of depth - 1 would leave room for one)."""
    tokens = list(range(100, 140)) + list(range(100, 130))
    proposer = SuffixDecodingProposer(4, max_tree_depth=24)
    assert proposer.propose(request(tokens), 4) == [130, 131, 132, 133]
