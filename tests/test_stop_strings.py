"""Stop strings: found incrementally, wherever token boundaries and split characters fall.

The checker is compared with a plain character-by-character scan (hypothesis over texts, stop
strings and the ways the text is cut into deltas). In the engine, a free run's text is the
oracle: with a stop string taken from that text, generation ends at its first occurrence, the
text is cut before it (or after it with include_stop_str_in_output), finish_reason is "stop",
stop_reason the string, and the token ids end with the token that completed it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.stop import StopStringChecker


def scan(text: str, stops: list[str], include: bool, unchecked: int = 0) -> tuple[str, str | None]:
    """Character by character: the first place some stop string ends (past `unchecked`
    characters); of those ending there, the longest."""
    for end in range(unchecked + 1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab¡é ", max_size=30),
    stops=st.lists(st.text(alphabet="ab¡é ", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include=st.booleans(),
    unchecked_deltas=st.integers(0, 3),
)
def test_checker_equals_a_character_scan_however_the_text_is_cut(
    text, stops, cuts, include, unchecked_deltas
):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    checker = StopStringChecker(stops, include_stop_str_in_output=include)
    shown = ""
    found = []
    for i, delta in enumerate(deltas):
        result = checker.append(delta, check=i >= unchecked_deltas)
        if result is not None:
            found.append(result)
        # What a DELTA output adds, read without the whole text, is the whole text's new part.
        added = checker.visible_text_since(len(shown), finished=False)
        assert checker.visible_length(finished=False) == len(shown) + len(added)
        visible = checker.visible_text(finished=False)
        assert visible.startswith(shown)  # streamed text is never taken back
        assert visible == shown + added
        shown = visible
    unchecked = sum(len(d) for d in deltas[:unchecked_deltas])
    expected_text, expected_stop = scan(text, stops, include, unchecked)
    assert checker.matched == expected_stop
    assert found == ([expected_stop] if expected_stop else [])
    assert checker.visible_text(finished=True) == expected_text
    assert expected_text.startswith(shown)


def test_checker_examples():
    checker = StopStringChecker(["STOP"])
    assert checker.append("hello ST") is None
    assert checker.visible_text(finished=False) == "hello "  # "ST" may start the stop string
    assert checker.append("OP and more") == "STOP"
    assert checker.text == "hello " and checker.visible_text(finished=False) == "hello "
    assert checker.append("ignored") is None and checker.text == "hello "

    both = StopStringChecker(["abc", "b"])  # "b" ends first
    assert both.append("xabc") == "b" and both.text == "xa"
    longest = StopStringChecker(["bc", "abc"], include_stop_str_in_output=True)
    assert longest.append("xabcd") == "abc" and longest.text == "xabc"
    none = StopStringChecker([])
    assert none.append("text") is None and none.visible_text(finished=False) == "text"


# ---- in the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=8 * 2**20)


def token_id(tokenizer, text: str) -> int:
    (tid,) = tokenizer.encode(text, add_special_tokens=False)
    return tid


@pytest.fixture(scope="module")
def free_run(llm):
    """A greedy run over a few tokens, among them the two halves of '¡' (0xC2 0xA1)."""
    tokenizer = llm.get_tokenizer()
    halves = tokenizer.encode("¡", add_special_tokens=False)
    if len(halves) != 2:
        pytest.skip("the demo tokenizer spells '¡' as one token")
    allowed = [*halves, *(token_id(tokenizer, c) for c in "ab c")]
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=40, ignore_eos=True, allowed_token_ids=allowed
    )
    prompt = [10, 11, 12]
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.text == tokenizer.decode(out.token_ids)
    assert "¡" in out.text, "the free run should contain the split character"
    return prompt, params, out


def tokens_until(tokenizer, token_ids: list[int], needle: str) -> list[int]:
    """The shortest prefix of token_ids whose text contains needle."""
    for n in range(1, len(token_ids) + 1):
        if needle in tokenizer.decode(token_ids[:n]):
            return token_ids[:n]
    raise AssertionError(f"{needle!r} not in the text")


def stop_candidates(text: str) -> list[str]:
    """Substrings of the free run's text: the split character, and others at several places."""
    candidates = ["¡"]
    i = text.index("¡")
    candidates.append(text[max(0, i - 2) : i + 1])
    for start in (3, len(text) // 2, len(text) - 4):
        candidates.append(text[start : start + 3])
    return [c for c in dict.fromkeys(candidates) if c.strip()]


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_end_generation_at_their_first_occurrence(llm, free_run, include):
    tokenizer = llm.get_tokenizer()
    prompt, params, free = free_run
    for stop in stop_candidates(free.text):
        out = llm.generate(
            [prompt],
            params.replace(stop=[stop], include_stop_str_in_output=include),
            use_tqdm=False,
        )[0].outputs[0]
        index = free.text.index(stop)
        assert out.text == free.text[: index + (len(stop) if include else 0)]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.token_ids == tokens_until(tokenizer, free.token_ids, stop)


def test_several_stop_strings_the_first_to_end_wins(llm, free_run):
    prompt, params, free = free_run
    early, late = free.text[2:5], free.text[len(free.text) - 5 :]
    out = llm.generate([prompt], params.replace(stop=[late, early]), use_tqdm=False)[0].outputs[0]
    expected, stop = scan(free.text, [late, early], include=False)
    assert (out.text, out.stop_reason) == (expected, stop)


def test_stop_string_on_the_last_allowed_token_finishes_with_stop(llm, free_run):
    tokenizer = llm.get_tokenizer()
    prompt, params, free = free_run
    stop = free.text[4:7]
    tokens = tokens_until(tokenizer, free.token_ids, stop)
    out = llm.generate(
        [prompt], params.replace(stop=[stop], max_tokens=len(tokens)), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == tokens
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_min_tokens_defers_stop_strings(llm, free_run):
    tokenizer = llm.get_tokenizer()
    prompt, params, free = free_run
    stop = free.text[1:3]
    min_tokens = len(tokens_until(tokenizer, free.token_ids, stop)) + 2
    out = llm.generate(
        [prompt], params.replace(stop=[stop], min_tokens=min_tokens), use_tqdm=False
    )[0].outputs[0]
    # Matches must end in the text of tokens past min_tokens.
    unchecked = len(tokenizer.decode(free.token_ids[:min_tokens]).rstrip("\ufffd"))
    expected, expected_stop = scan(free.text, [stop], include=False, unchecked=unchecked)
    assert out.text == expected and out.stop_reason == expected_stop
    assert len(out.token_ids) > min_tokens


def test_streamed_text_never_shows_a_stop_string(llama_path, free_run):
    prompt, params, free = free_run
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    engine = LLMEngine(
        EngineArgs(
            model=str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=8 * 2**20
        )
    )
    engine.add_request("s", prompt, params.replace(stop=[stop], n=2))
    shown = ["", ""]
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            for completion in out.outputs:
                assert completion.text.startswith(shown[completion.index])
                assert stop not in completion.text
                shown[completion.index] = completion.text
            final = out
    assert final is not None and final.finished
    first = final.outputs[0]
    assert first.text == free.text[: free.text.index(stop)] and first.stop_reason == stop
    assert engine.scheduler.num_running == 0 and engine.scheduler.kv_cache_usage == 0.0


def test_check_cost_does_not_grow_with_text_or_stop_length():
    """Issue 12: 64 stop strings of 1,024 characters, text fed one character at a time. The
    check advances over the new characters only; the old one re-tested every tail length up to
    the longest stop string against every stop string on each append (about 100x slower here;
    1,000 stops of 4,000 characters made a request 35x slower in the issue)."""
    import time

    stops = [f"{i:02d}" + "a" * 1022 for i in range(64)]
    checker = StopStringChecker(stops)
    start = time.perf_counter()
    for _ in range(2000):
        assert checker.append("a") is None
        assert len(checker.visible_text(finished=False)) == len(checker.text)  # nothing held
    elapsed = time.perf_counter() - start
    assert checker.append("x07" + "a" * 1000) is None
    assert len(checker.visible_text(finished=False)) == 2001  # "07a..." may become a stop
    assert checker.append("a" * 22 + "tail") == stops[7]
    assert checker.text == "a" * 2000 + "x"
    assert elapsed < 2.0, elapsed


@settings(max_examples=200, deadline=None)
@given(
    deltas=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), max_size=12),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=2),
    reads=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), max_size=6),
    join_every=st.integers(1, 4),
)
def test_text_since_equals_slicing_the_whole_text(deltas, stops, reads, join_every):
    """The text is kept as chunks (joined now and then, cut at a match): any slice read from
    them equals the slice of the whole text."""
    checker = StopStringChecker(stops)
    whole = ""
    for i, delta in enumerate(deltas):
        checker.append(delta)
        if checker.matched is None:
            whole += delta
        else:
            whole = checker.visible_text(finished=True)  # cut at the match (scan-tested above)
        if i % join_every == 0:
            assert checker.text == whole  # joins the chunks into one
        for start, end in reads:
            assert checker.text_since(start, end) == whole[start:end]
            assert checker.text_since(start) == whole[start:]
    assert checker.text == whole


def test_appending_never_copies_the_text_so_far():
    """Issue 11 (output cost): each append used to build a new string of the whole text (text
    += delta), so a long output cost O(length) per token. Now an append allocates about its
    delta, and a streamed read allocates about what it returns."""
    import tracemalloc

    checker = StopStringChecker(["STOP"])
    for _ in range(1000):
        checker.append("x" * 200)  # 200,000 characters
    assert len(checker.visible_text(finished=False)) == 200_000
    tracemalloc.start()
    try:
        for _ in range(50):
            checker.append("y")
            assert checker.visible_text_since(200_000, finished=False).startswith("y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000, peak  # one copy of the text would be 200 KB
    assert checker.text == "x" * 200_000 + "y" * 50
