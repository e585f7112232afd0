"""The fast path (the grammar engine's packed bitmask) allows exactly the tokens the reference
(asking the matcher about each token id in turn) allows, on random JSON schemas, regexes and
choices, at random states reached by walking random allowed tokens.

Also: the sampler's bitmask step equals masking by the reference's allowed set, and a rolled back
matcher allows what it allowed before.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarCompiler, bitmask_to_bool
from engine.structured.params import StructuredOutputsParams

VOCAB = 1030  # the demo tokenizer's 1024 tokens and a padded tail, as models often have


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB, [tokenizer.eos_token_id])


# ---- random grammars ----------------------------------------------------------------------------

_WORDS = st.sampled_from(["a", "b", "ab", "x", "yes", "no", " ", "0", "12", "é", "{", '"'])


def _leaf_schemas() -> st.SearchStrategy[dict]:
    bounded_int = st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    )
    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        bounded_int,
        st.just({"type": "number"}),
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
        st.lists(_WORDS, min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
    )


def _extend(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    array = st.tuples(children, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}
    )
    obj = st.dictionaries(st.sampled_from(["a", "bb", "c d"]), children, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props)) if props else st.nothing()).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": sorted(req),
                "additionalProperties": False,
            }
        )
    )
    any_of = st.lists(children, min_size=2, max_size=3).map(lambda s: {"anyOf": s})
    return st.one_of(array, obj, any_of)


SCHEMAS = st.recursive(_leaf_schemas(), _extend, max_leaves=6)

_ATOMS = st.sampled_from(["a", "b", "x", "[0-9]", "[a-c]", r"\.", " ", "é", "(ab|c)", "."])


def _regex_extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda p: "(" + "|".join(p) + ")"),
        st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,3}", "{2}"])).map(
            lambda t: f"({t[0]}){t[1]}"
        ),
    )


REGEXES = st.recursive(_ATOMS, _regex_extend, max_leaves=6)
CHOICES = st.lists(
    st.text(alphabet="abxyz {}\"'0é", min_size=1, max_size=6), min_size=1, max_size=4
)
STRUCTURED = st.one_of(
    SCHEMAS.map(lambda s: StructuredOutputsParams(json=s)),
    SCHEMAS.map(lambda s: StructuredOutputsParams(json=s, disable_any_whitespace=True)),
    REGEXES.map(lambda r: StructuredOutputsParams(regex=r)),
    CHOICES.map(lambda c: StructuredOutputsParams(choice=c)),
)


def fast_allowed(matcher) -> list[int]:
    return bitmask_to_bool(matcher.bitmask()[None], VOCAB)[0].nonzero()[:, 0].tolist()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structured=STRUCTURED, walk=st.lists(st.integers(0, 10**6), max_size=8))
def test_bitmask_equals_token_by_token_reference(compiler, structured, walk):
    matcher = compiler.matcher(structured)
    history: list[list[int]] = []
    for choice in [*walk, None]:
        reference = matcher.allowed_token_ids_reference()
        assert fast_allowed(matcher) == reference
        assert all(t < VOCAB - 6 or t not in reference for t in range(VOCAB - 6, VOCAB))  # pad
        history.append(reference)
        if choice is None or not reference or matcher.terminated:
            break
        assert matcher.accept([reference[choice % len(reference)]]) == 1
    # Rolling back walks the same states backwards.
    for reference in reversed(history[:-1]):
        matcher.rollback(1)
        assert fast_allowed(matcher) == reference


@settings(max_examples=25, deadline=None)
@given(
    structured=st.one_of(
        REGEXES.map(lambda r: StructuredOutputsParams(regex=r)),
        SCHEMAS.map(lambda s: StructuredOutputsParams(json=s)),
    ),
    seed=st.integers(0, 2**32),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_p=st.sampled_from([1.0, 0.5]),
)
def test_sampler_draws_only_reference_allowed_tokens(
    compiler, structured, seed, temperature, top_p
):
    """Sampling with the bitmask draws from exactly the reference's allowed set: the draw equals
    the same draw with every disallowed token's logit set to -inf by hand."""
    matcher = compiler.matcher(structured)
    allowed = matcher.allowed_token_ids_reference()
    logits = torch.randn(
        1, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, logprobs=0)
    masked = torch.full_like(logits, float("-inf"))
    masked[0, allowed] = logits[0, allowed]
    fast = Sampler()(logits, [SamplingRow(params, seed, 3, grammar_bitmask=matcher.bitmask())])
    by_hand = Sampler()(masked, [SamplingRow(params, seed, 3)])
    assert fast[0].token_id == by_hand[0].token_id
    assert fast[0].token_id in allowed
    assert fast[0].logprob == pytest.approx(logits.log_softmax(-1)[0, fast[0].token_id].item())


@settings(max_examples=20, deadline=None)
@given(pattern=REGEXES, seed=st.integers(0, 2**16))
def test_walks_of_allowed_tokens_spell_matching_text(compiler, tokenizer, pattern, seed):
    """Random walks over allowed tokens that end at end-of-sequence spell a full match."""
    matcher = compiler.matcher(StructuredOutputsParams(regex=pattern))
    rng = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(40):
        allowed = fast_allowed(matcher)
        token = allowed[int(torch.randint(len(allowed), (1,), generator=rng))]
        matcher.accept([token])
        if matcher.terminated:
            break
        tokens.append(token)
    if matcher.terminated:
        assert re.fullmatch(pattern, tokenizer.decode(tokens)), (pattern, tokens)
    json.dumps(pattern)  # the pattern is plain text: hypothesis prints it on failure
