"""Logprobs (sampled, top-N, prompt) equal log_softmax of HF transformers' logits.

HF runs one plain forward over prompt + generated tokens; the logits at position p give the
distribution of token p + 1, so one forward checks the prompt logprobs and the sampled ones.
float64: values to 1e-9, and the top-N ids and ranks exactly. float32: values to 1e-4 for the
same token ids (ids of near-ties may legitimately differ in float32).

Prompt logprobs are also checked to be the same when the prompt is computed in chunks (chunked
prefill), after preemption, beside prefix-cache hits of other requests, and in the runner's
pure input preparation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.request import Request
from engine.runner import prepare_inputs
from engine.scheduler.interface import ScheduledRequest

PROMPTS = [[5, 6, 7], [300 + i for i in range(19)], [900, 17]]
TOP = 5


def hf_logprobs(path, dtype, tokens: list[int]) -> torch.Tensor:  # [len(tokens), V] float64
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def hf_rank(row: torch.Tensor, token: int) -> int:
    return int((row >= row[token]).sum())


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-9), ("float32", 1e-4)])
def test_logprobs_equal_hf(llama_path, tokenizer, dtype, tol):
    llm = LLM(str(llama_path), dtype=dtype, block_size=4, kv_cache_memory_bytes=8 * 2**20)
    params = SamplingParams(
        temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP
    )
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    exact = dtype == "float64"
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        completion = out.outputs[0]
        tokens = prompt + completion.token_ids
        ref = hf_logprobs(llama_path, getattr(torch, dtype), tokens)

        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None  # nothing predicts the first prompt token
        positions = [(i, prompt[i], out.prompt_logprobs[i]) for i in range(1, len(prompt))]
        positions += [
            (len(prompt) + j, token, completion.logprobs[j])
            for j, token in enumerate(completion.token_ids)
        ]
        assert len(completion.logprobs) == len(completion.token_ids)
        for index, token, entry in positions:
            row = ref[index - 1]
            assert next(iter(entry)) == token  # the position's own token comes first
            for token_id, logprob in entry.items():
                assert logprob.logprob == pytest.approx(row[token_id].item(), abs=tol)
                assert logprob.decoded_token == tokenizer.decode([token_id])
            assert len(entry) in (TOP, TOP + 1)
            if exact:
                assert entry[token].rank == hf_rank(row, token)
                hf_top = row.topk(TOP).indices.tolist()
                # the own token, then HF's top-N in order, each ranked by its place
                assert list(entry) == [token] + [t for t in hf_top if t != token]
                for place, t in enumerate(hf_top, 1):
                    assert t == token or entry[t].rank == place
        total = sum(completion.logprobs[j][t].logprob for j, t in enumerate(completion.token_ids))
        assert completion.cumulative_logprob == pytest.approx(total, abs=tol)


def test_zero_top_n_gives_only_the_tokens_own_entries(llama_path):
    llm = LLM(str(llama_path), dtype="float64", block_size=4, kv_cache_memory_bytes=4 * 2**20)
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=0, prompt_logprobs=0)
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    assert [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in PROMPTS[1][1:]]
    assert [list(e) for e in out.outputs[0].logprobs] == [[t] for t in out.outputs[0].token_ids]
    no = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert no.prompt_logprobs is None and no.outputs[0].logprobs is None
    assert no.outputs[0].cumulative_logprob is None


def as_values(prompt_logprobs):
    return [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in prompt_logprobs]


def test_prompt_logprobs_under_chunking_preemption_and_prefix_caching(llama_path):
    prompt = [40 + i for i in range(37)]
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=3, ignore_eos=True)
    reference = LLM(
        str(llama_path),
        dtype="float64",
        scheduler="reference",
        block_size=4,
        kv_cache_memory_bytes=8 * 2**20,
    )
    expected = reference.generate([prompt], params, use_tqdm=False)[0]
    assert len(expected.prompt_logprobs) == len(prompt)

    # Chunks of at most 8 tokens, a pool too small for everything at once (preemption), and
    # other requests sharing the prompt's prefix (prefix-cache hits for them, not for ours).
    busy = LLM(
        str(llama_path),
        dtype="float64",
        block_size=4,
        max_model_len=64,
        num_gpu_blocks_override=20,
        max_num_batched_tokens=8,
        max_num_seqs=4,
    )
    others = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    busy.generate([[*prompt[:20], 7, 8]], others, use_tqdm=False)  # caches the prefix
    batch = [[*prompt[:24], 5], prompt, [*prompt[:16], 9, 9], prompt]
    outs = busy.generate(
        batch,
        [others, params, others, params.replace(n=2, temperature=1.0, seed=3)],
        use_tqdm=False,
    )
    stats = busy.llm_engine.get_stats().scheduler
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0
    for out in (outs[1], outs[3]):
        assert len(out.prompt_logprobs) == len(prompt)
        got, want = as_values(out.prompt_logprobs), as_values(expected.prompt_logprobs)
        assert got[0] is None
        for g, w in zip(got[1:], want[1:], strict=True):
            assert g.keys() == w.keys()
            assert all(abs(g[t] - w[t]) < 1e-9 for t in g)
    assert outs[1].outputs[0].token_ids == expected.outputs[0].token_ids
    assert len(outs[3].outputs) == 2  # n=2: one prompt_logprobs list for the prompt


def scheduled(request, start, end, sample=False):
    return ScheduledRequest(request, start, end - start, tuple(range(8)), sample)


def test_prepare_inputs_selects_prompt_logprob_rows():
    prompt = list(range(100, 111))  # 11 tokens
    params = SamplingParams(prompt_logprobs=2)
    request = Request("r", prompt, params, eos_token_ids=(), max_model_len=64, sampling_seed=0)
    other = Request(
        "o", [1, 2, 3], SamplingParams(), eos_token_ids=(), max_model_len=64, sampling_seed=0
    )
    # chunk [0, 4) of r after a 3-token request: rows 3..6; positions 0..3 -> tokens 1..4
    inputs = prepare_inputs([scheduled(other, 0, 3, True), scheduled(request, 0, 4)], 4, "cpu")
    assert inputs.prompt_logits_indices.tolist() == [3, 4, 5, 6]
    assert inputs.prompt_logprob_token_ids.tolist() == prompt[1:5]
    (span,) = inputs.prompt_logprob_spans
    assert (span.request_id, span.first_token_index, span.num_rows, span.num_top) == ("r", 1, 4, 2)
    request.add_prompt_logprobs(1, [{t: None} for t in prompt[1:5]])
    # the last chunk: positions 4..10; position 10 samples, so prompt rows are positions 4..9
    last = prepare_inputs([scheduled(request, 4, 11, True)], 4, "cpu")
    assert last.prompt_logits_indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert last.prompt_logprob_token_ids.tolist() == prompt[5:]
    assert last.logits_indices.tolist() == [6]
    request.add_prompt_logprobs(5, [{t: None} for t in prompt[5:]])
    assert not request.needs_prompt_logprobs
    # a recompute (preemption) of the whole prompt adds nothing
    again = prepare_inputs([scheduled(request, 0, 11, True)], 4, "cpu")
    assert again.prompt_logprob_spans == () and again.prompt_logits_indices.numel() == 0


def test_a_chunk_that_skips_prompt_positions_is_an_error():
    request = Request(
        "r", list(range(10)), SamplingParams(prompt_logprobs=1), (), 64, sampling_seed=0
    )
    inputs = prepare_inputs([scheduled(request, 4, 8)], 4, "cpu")  # as if 4 tokens were cached
    (span,) = inputs.prompt_logprob_spans
    with pytest.raises(RuntimeError, match="prefix cache"):
        request.add_prompt_logprobs(span.first_token_index, [{}] * span.num_rows)
