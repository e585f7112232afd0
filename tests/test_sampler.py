"""The sampler's draw follows the exact target distribution, and each knob works in the engine.

Distribution tests: with fixed seeds, 20 000 draws from one row of logits (one draw per output
position, so each uses fresh noise) are compared with the closed-form target distribution by a
chi-square test. The seeds are fixed, so the outcome is deterministic, not flaky; a negative
control shows the test rejects a slightly wrong distribution. The p-value is computed with
torch.special.gammaincc (the chi-square survival function), so scipy is not needed.

Engine tests check the wiring (token histories, eos ids, tokenized bad words) end to end, against
HF transformers' own logits processors where HF has the same one.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.sampler import Sampler, SamplingRow, exponential_noise

PROBS = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005]
NUM_DRAWS = 20_000


def draw_counts(params: SamplingParams, probs=PROBS, seed: int = 1234) -> list[int]:
    logits = torch.tensor(probs, dtype=torch.float64).log().expand(NUM_DRAWS, -1)
    rows = [SamplingRow(params, seed, position) for position in range(NUM_DRAWS)]
    counts = [0] * len(probs)
    for sample in Sampler()(logits, rows):
        counts[sample.token_id] += 1
    return counts


def normalized(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def chi_square_p_value(counts: list[int], target: list[float]) -> float:
    """p-value of the counts under the target; tokens the target excludes must never appear.

    Bins expected to hold fewer than 5 draws are pooled (the chi-square approximation's rule).
    """
    assert all(c == 0 for c, p in zip(counts, target, strict=True) if p == 0)
    n = sum(counts)
    bins = sorted((p * n, c) for c, p in zip(counts, target, strict=True) if p > 0)
    while len(bins) > 1 and bins[0][0] < 5:
        (e0, c0), (e1, c1) = bins[0], bins[1]
        bins = sorted([(e0 + e1, c0 + c1), *bins[2:]])
    assert len(bins) >= 2
    statistic = sum((c - e) ** 2 / e for e, c in bins)
    dof = torch.tensor((len(bins) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)).item()


def target_temperature(t: float) -> list[float]:
    return normalized([p ** (1 / t) for p in PROBS])


def keep_top_k(probs: list[float], k: int) -> list[float]:
    kth = sorted(probs, reverse=True)[k - 1]
    return normalized([p if p >= kth else 0.0 for p in probs])


def keep_top_p(probs: list[float], top_p: float) -> list[float]:
    return normalized([p if sum(q for q in probs if q > p) < top_p else 0.0 for p in probs])


def keep_min_p(probs: list[float], min_p: float) -> list[float]:
    return normalized([p if p >= min_p * max(probs) else 0.0 for p in probs])


@pytest.mark.parametrize(
    ("params", "target"),
    [
        (SamplingParams(temperature=1.0), PROBS),
        (SamplingParams(temperature=0.5), target_temperature(0.5)),
        (SamplingParams(temperature=1.7), target_temperature(1.7)),
        (SamplingParams(top_k=3), keep_top_k(PROBS, 3)),
        # masses before each token: 0, .3, .5, .65, .75 -> the first four stay
        (SamplingParams(top_p=0.7), keep_top_p(PROBS, 0.7)),
        (SamplingParams(min_p=0.25), keep_min_p(PROBS, 0.25)),
        (
            SamplingParams(temperature=2.0, top_k=6, top_p=0.8),
            keep_top_p(keep_top_k(target_temperature(2.0), 6), 0.8),
        ),
        (
            SamplingParams(temperature=0.8, min_p=0.1, top_k=7),
            keep_top_k(keep_min_p(target_temperature(0.8), 0.1), 7),
        ),
    ],
    ids=["t1", "t0.5", "t1.7", "top_k", "top_p", "min_p", "t_k_p", "t_minp_k"],
)
def test_empirical_frequencies_match_the_target(params, target):
    counts = draw_counts(params)
    assert chi_square_p_value(counts, target) > 1e-3


def test_chi_square_rejects_a_slightly_wrong_distribution():
    counts = draw_counts(SamplingParams(temperature=0.5))
    assert chi_square_p_value(counts, target_temperature(0.5)) > 1e-3
    assert chi_square_p_value(counts, target_temperature(0.6)) < 1e-6


def test_greedy_ignores_truncation_and_takes_the_processed_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    greedy = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9)
    assert Sampler()(logits, [SamplingRow(greedy, 0, 0)])[0].token_id == 1
    biased = greedy.replace(logit_bias={2: 0.5})
    assert Sampler()(logits, [SamplingRow(biased, 0, 0)])[0].token_id == 2
    # token 1 was in the prompt: 3.0 / 2 < 2.9
    penalized = greedy.replace(repetition_penalty=2.0)
    row = SamplingRow(penalized, 0, 0, prompt_token_ids=[1])
    assert Sampler()(logits, [row])[0].token_id == 2


def test_logprobs_are_raw_with_ranks_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.0]], dtype=torch.float64)
    raw = torch.log_softmax(logits, dim=-1)[0]
    params = SamplingParams(temperature=0.3, logit_bias={0: 100.0}, logprobs=2)
    sample = Sampler()(logits, [SamplingRow(params, 7, 0)])[0]
    assert sample.token_id == 0  # the bias decides the token ...
    # ... but the logprobs are those of the raw logits
    assert sample.logprob == pytest.approx(raw[0].item())
    entry = sample.top_logprobs
    assert list(entry) == [0, 1, 2] or list(entry) == [0, 1, 4]  # sampled first, then top-2
    assert entry[0].rank == 4  # four tokens are at least as likely as token 0
    assert entry[1].rank == 1 and entry[1].logprob == pytest.approx(raw[1].item())
    assert entry[list(entry)[2]].rank == 2
    only = Sampler()(logits, [SamplingRow(params.replace(logprobs=0), 7, 0)])[0]
    assert list(only.top_logprobs) == [0]
    none = Sampler()(logits, [SamplingRow(params.replace(logprobs=None), 7, 0)])[0]
    assert none.top_logprobs is None


def test_tied_logprob_ranks():
    logits = torch.tensor([[2.0, 2.0, 1.0]])
    sample = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0, logprobs=0), 0, 0)])[0]
    assert sample.token_id == 0 and sample.top_logprobs[0].rank == 2


def test_a_row_with_every_token_excluded_falls_back_to_raw_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    params = SamplingParams(temperature=0, allowed_token_ids=[2], bad_words=["x"])
    row = SamplingRow(params, 0, 0, bad_words_token_ids=((2,),))
    assert Sampler()(logits, [row])[0].token_id == 1


def test_noise_is_seeded_by_seed_and_position_and_never_zero():
    rows = [SamplingRow(SamplingParams(), seed, pos) for seed in (1, 2) for pos in (0, 1)]
    a = exponential_noise(rows, 50_000, torch.float32)
    b = exponential_noise(rows, 50_000, torch.float32)
    assert torch.equal(a, b)
    assert len({tuple(r[:8].tolist()) for r in a}) == 4
    assert bool((a > 0).all())


def test_half_precision_logits_are_sampled_in_float32():
    logits = torch.tensor([[0.0, 1.0, 4.0]], dtype=torch.bfloat16)
    sample = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0, logprobs=1), 0, 0)])[0]
    assert sample.token_id == 2 and math.isfinite(sample.logprob)


# ---- the knobs in the engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm64(llama_path):
    return LLM(
        str(llama_path),
        dtype="float64",
        block_size=4,
        kv_cache_memory_bytes=16 * 2**20,
        max_logprobs=2048,
    )


PROMPTS = [[20, 21, 22, 23], [400, 401, 7, 9, 11, 13, 500], [88]]


def completions(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_allowed_token_ids_and_logit_bias(llm64):
    allowed = [100, 200, 300, 301]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, allowed_token_ids=allowed)
    for out in completions(llm64, PROMPTS, params):
        assert set(out.token_ids) <= set(allowed)
    biased = SamplingParams(temperature=1.0, seed=3, max_tokens=8, logit_bias={"123": 100})
    for out in completions(llm64, PROMPTS, biased):
        assert out.token_ids == [123] * 8


def test_min_tokens_holds_back_eos(llm64):
    eos = llm64.llm_engine.model_config.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100})
    assert all(o.token_ids == [eos] for o in completions(llm64, PROMPTS, params))
    held = completions(llm64, PROMPTS, params.replace(min_tokens=5))
    for out in held:
        assert len(out.token_ids) == 6 and out.token_ids[-1] == eos
        assert eos not in out.token_ids[:5] and out.finish_reason == "stop"
    # stop_token_ids too
    stop = SamplingParams(temperature=0, max_tokens=20, logit_bias={77: 100}, stop_token_ids=[77])
    for out in completions(llm64, PROMPTS, stop.replace(min_tokens=3)):
        assert out.token_ids[-1] == 77 and len(out.token_ids) == 4 and out.stop_reason == 77


def test_frequency_and_presence_penalties_use_the_output_history(llm64):
    """With every raw logprob returned, the penalised greedy choice is recomputed step by step:
    frequency/presence penalties shift logits by constants, so logprobs work as well."""
    vocab = llm64.llm_engine.model_config.vocab_size
    params = SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        frequency_penalty=1.5,
        presence_penalty=0.7,
        logprobs=vocab,
    )
    for prompt, out in zip(PROMPTS, completions(llm64, PROMPTS, params), strict=True):
        for step, entry in enumerate(out.logprobs):
            history = out.token_ids[:step]
            scores = {
                t: lp.logprob - 1.5 * history.count(t) - 0.7 * (t in history)
                for t, lp in entry.items()
            }
            assert len(scores) == vocab
            assert out.token_ids[step] == max(scores, key=scores.get)
        # the penalties changed something
        plain = completions(
            llm64, [prompt], params.replace(frequency_penalty=0, presence_penalty=0)
        )
        assert len(set(out.token_ids)) >= len(set(plain[0].token_ids))


def spellings(tokenizer, word: str) -> list[list[int]]:
    return [
        tokenizer.encode(text, add_special_tokens=False)
        for text in (word.lstrip(), " " + word.lstrip())
    ]


def test_repetition_penalty_bad_words_min_tokens_equal_hf(llm64, llama_path):
    """HF's RepetitionPenalty (over prompt + output), NoBadWords and MinNewTokens processors,
    greedy, float64: the same tokens."""
    hf = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float64).eval()
    tokenizer = llm64.get_tokenizer()
    eos = list(llm64.llm_engine.model_config.eos_token_ids)
    free = completions(llm64, PROMPTS[:2], SamplingParams(temperature=0, max_tokens=10))
    # Words the free run produces: single-token ones, and one of two tokens (HF matches a bad
    # word's prefix against prompt + output, vLLM and this engine against the output only, so
    # the two-token word is taken from the middle of an output).
    candidates = [tokenizer.decode([t]) for t in free[0].token_ids[:3] + free[1].token_ids[:3]]
    words = [w for w in candidates if all(len(ids) == 1 for ids in spellings(tokenizer, w))][:3]
    for k in range(2, 8):
        word = tokenizer.decode(free[0].token_ids[k : k + 2])
        if all(len(ids) == 2 for ids in spellings(tokenizer, word)):
            words.append(word)
            break
    assert len(words) >= 2 and any(len(spellings(tokenizer, w)[0]) == 2 for w in words)
    bad_ids = [ids for w in words for ids in spellings(tokenizer, w)]
    params = SamplingParams(
        temperature=0, max_tokens=14, repetition_penalty=1.8, bad_words=words, min_tokens=4
    )
    ours = completions(llm64, PROMPTS[:2], params)
    for prompt, out in zip(PROMPTS[:2], ours, strict=True):
        with torch.no_grad():
            result = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=14,
                min_new_tokens=4,
                repetition_penalty=1.8,
                bad_words_ids=bad_ids,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        theirs = result[0, len(prompt) :].tolist()
        assert out.token_ids == theirs
        assert not {ids[0] for ids in bad_ids if len(ids) == 1} & set(out.token_ids)


def test_multi_token_bad_word_bans_its_last_token_only_after_its_prefix():
    logits = torch.zeros(2, 10)
    logits[:, 7] = 5.0
    params = SamplingParams(temperature=0)
    words = ((3, 4, 7),)
    after = SamplingRow(params, 0, 3, output_token_ids=[9, 3, 4], bad_words_token_ids=words)
    elsewhere = SamplingRow(params, 0, 3, output_token_ids=[3, 9, 4], bad_words_token_ids=words)
    tokens = Sampler()(logits, [after, elsewhere])
    assert tokens[0].token_id != 7 and tokens[1].token_id == 7


class _RecordingList(list):
    """A token list that records which positions each slice read started at."""

    def __init__(self, *args):
        super().__init__(*args)
        self.slice_starts: list[int] = []

    def __iter__(self):
        self.slice_starts.append(0)  # a whole read
        return super().__iter__()

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.slice_starts.append(key.start or 0)
        return super().__getitem__(key)


def test_penalty_counts_are_incremental_and_match_a_recount():
    """The request's counts are updated with the new tokens only (never rebuilt from the whole
    output) and penalise exactly as counting the whole prompt and output would, drafts too."""
    from engine.penalties import PenaltyCounts
    from engine.sampler import apply_penalties

    generator = torch.Generator().manual_seed(0)
    vocab = 50
    prompt = torch.randint(0, vocab, (30,), generator=generator).tolist()
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.7)
    counts = PenaltyCounts(prompt)
    output = _RecordingList()
    for step in range(40):
        output += torch.randint(0, vocab, (step % 3,), generator=generator).tolist()
        drafts = torch.randint(0, vocab, (step % 4,), generator=generator).tolist()
        logits = torch.randn(1, vocab, dtype=torch.float64, generator=generator)
        logits[0, 3] = float("-inf")
        incremental = SamplingRow(
            params, 0, len(output), prompt, output, draft_token_ids=drafts, penalty_counts=counts
        )
        recounted = SamplingRow(params, 0, len(output), prompt, list(output) + drafts)
        output.slice_starts.clear()
        got = apply_penalties(logits, [incremental])
        assert torch.equal(got, apply_penalties(logits, [recounted]))
        assert not torch.equal(got, logits)
        # only the tokens appended since the last step were read
        assert all(start >= len(output) - step % 3 for start in output.slice_starts)
        assert bool(output.slice_starts) == (step % 3 != 0)  # the new tokens, and only once
    # a cut output (a stop string inside the step's tokens) is recounted
    del output[5:]
    cut = apply_penalties(
        logits[:1], [SamplingRow(params, 0, 5, prompt, output, penalty_counts=counts)]
    )
    fresh = apply_penalties(logits[:1], [SamplingRow(params, 0, 5, prompt, list(output))])
    assert torch.equal(cut, fresh)


def test_dense_penalties_equal_the_pairwise_formula():
    """Only tokens in the prompt or output change, by the documented formula, bit for bit."""
    from engine.sampler import apply_penalties

    logits = torch.tensor([[2.0, -1.0, 0.5, float("-inf"), 3.0, -2.0]], dtype=torch.float64)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    row = SamplingRow(params, 0, 3, prompt_token_ids=[0, 1], output_token_ids=[2, 2, 3])
    got = apply_penalties(logits, [row])[0].tolist()
    want = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 * 2 - 0.25, float("-inf"), 3.0, -2.0]
    assert got == want


class _Recorder:
    """A custom logits processor that records the logits it is given."""

    def __init__(self, argmax_invariant: bool) -> None:
        self.invariant = argmax_invariant
        self.seen: list[torch.Tensor] = []

    def is_argmax_invariant(self) -> bool:
        return self.invariant

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(logits.clone())
        return logits


def test_custom_processors_run_where_vllm_runs_them():
    """Not argmax-invariant: after allowed_token_ids / logit_bias, before the penalties.
    Argmax-invariant: after temperature, on sampled rows only (the greedy row is not given)."""
    from engine.logits_process import LogitsProcessors

    logits = torch.arange(6, dtype=torch.float64).repeat(2, 1)  # [2, V=6]
    sampled = SamplingParams(
        temperature=0.5, allowed_token_ids=[0, 1, 2], logit_bias={1: 5.0}, repetition_penalty=2.0
    )
    rows = [
        SamplingRow(sampled, 0, 1, (4,), (1,), request_id="s"),
        SamplingRow(SamplingParams(temperature=0), 0, 0, (4,), (), request_id="g"),
    ]
    early, late = _Recorder(False), _Recorder(True)
    processors = LogitsProcessors([early, late])
    sampler = Sampler()
    sampler.step_processors = processors.begin_step(rows)
    sampler(logits.clone(), rows)
    inf = float("inf")
    assert torch.equal(early.seen[0][0], torch.tensor([0.0, 6.0, 2.0, -inf, -inf, -inf]))
    assert torch.equal(early.seen[0][1], logits[1])
    # penalty (6 / 2 = 3 for the repeated token 1), then temperature 0.5
    assert torch.equal(late.seen[0][0], torch.tensor([0.0, 6.0, 4.0, -inf, -inf, -inf]))
    assert torch.equal(late.seen[0][1], torch.zeros(6, dtype=torch.float64))
    sampler.step_processors = processors.begin_step(rows[1:])
    sampler(logits[1:].clone(), rows[1:])
    assert len(early.seen) == 2 and len(late.seen) == 1  # all greedy: not called
