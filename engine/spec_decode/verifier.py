"""Verification: the target's logits at a request's draft positions -> the tokens it emits.

For a request verifying m drafts d_1..d_m, the runner computes logits at m + 1 rows: the last real
token (whose logits give the distribution of d_1) and each draft. Row j is processed with the
request's own sampling parameters as if d_1..d_j had already been generated (penalties and
min_tokens see them), so p_j is exactly the distribution the non-speculative sampler would use at
that output position. Then the rejection sampler keeps a prefix of the drafts and adds one token.

Structured outputs: row j of a request with a grammar carries the bitmask of its grammar after
d_1..d_j. The matcher is walked through the drafts to compute them and rolled back at once (the
engine's update path then consumes what was accepted). A draft the grammar forbids gets
probability 0 after the mask, so the rejection sampler rejects it (greedy or not); the rows after
it are never used and repeat its mask.

Custom logits processors (engine/logits_process.py) see the m + 1 rows as rows of their batch
(after the step's plain sampling rows), row j's output being the request's output followed by
d_1..d_j; a verification row is new to them in every step.

Randomness is seeded per (request seed, output position) like the sampler's: the bonus or
resampled token at output position t uses the same exponential noise a non-speculative step at t
would, and the accept test draws its uniform from a separate stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.logprobs import logprob_entries
from engine.request import Request
from engine.sampler import (
    SamplingRow,
    argmax_invariant_hook,
    exponential_noise,
    position_seed,
    process_logits,
    sampling_distribution,
    splitmix64,
)
from engine.scheduler.interface import SampledToken
from engine.spec_decode.rejection_sampler import rejection_sample
from engine.structured.grammar import bitmask_allows

if TYPE_CHECKING:
    from engine.logits_process import StepProcessors

_ACCEPT_SEED_SALT = 0xACC3_97ED


@dataclass(frozen=True, slots=True)
class VerifyItem:
    request: Request
    draft_token_ids: tuple[int, ...]  # m drafts; the runner supplies m + 1 logits rows
    draft_probs: torch.Tensor | None  # [m, V] from a draft model that sampled; else None


def grammar_bitmasks(item: VerifyItem) -> list[torch.Tensor | None]:
    """Per verify row j (0..m), the bitmask of the request's grammar after d_1..d_j (None for
    every row without a grammar). The matcher ends where it started."""
    matcher = item.request.grammar
    m = len(item.draft_token_ids)
    if matcher is None:
        return [None] * (m + 1)
    masks: list[torch.Tensor | None] = []
    consumed = 0
    try:
        for j in range(m + 1):
            masks.append(matcher.bitmask())
            if j == m:
                break
            draft = item.draft_token_ids[j]
            allowed = not matcher.terminated and bitmask_allows(masks[-1], draft)
            if not allowed or not matcher.accept([draft]):
                masks += [masks[-1]] * (m - j)  # d_{j+1} is forbidden: it will be rejected
                break
            consumed += 1
    finally:
        matcher.rollback(consumed)
    return masks


def verify_rows(item: VerifyItem) -> list[SamplingRow]:
    """The m + 1 sampling rows of one request, row j seeing drafts d_1..d_j as outputs."""
    request = item.request
    bitmasks = grammar_bitmasks(item)
    return [
        SamplingRow(
            params=request.sampling_params,
            sampling_seed=request.sampling_seed,
            output_position=request.num_output_tokens + j,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
            bad_words_token_ids=request.bad_words_token_ids,
            draft_token_ids=item.draft_token_ids[:j],
            penalty_counts=request.penalty_counts,
            grammar_bitmask=bitmasks[j],
            request_id=request.request_id,
        )
        for j in range(len(item.draft_token_ids) + 1)
    ]


def accept_uniforms(items: Sequence[VerifyItem], k: int, dtype: torch.dtype) -> torch.Tensor:
    uniforms = torch.ones(len(items), max(k, 1), dtype=dtype)  # 1.0 never accepts (padding)
    generator = torch.Generator(device="cpu")
    for b, item in enumerate(items):
        seed = splitmix64(item.request.sampling_seed ^ _ACCEPT_SEED_SALT)
        for j in range(len(item.draft_token_ids)):
            generator.manual_seed(position_seed(seed, item.request.num_output_tokens + j))
            uniforms[b, j] = torch.rand((), generator=generator, dtype=dtype)
    return uniforms[:, :k]


def verify(
    logits: torch.Tensor,
    items: Sequence[VerifyItem],
    processors: StepProcessors | None = None,
    offset: int = 0,
    rows: Sequence[SamplingRow] | None = None,
) -> list[list[SampledToken]]:
    """logits: [sum(m_i + 1), V], each item's m_i + 1 rows in order. Returns, per item, the
    tokens it emits (1 .. m_i + 1), each with its raw logprob (and top-N when asked).
    `rows`: the items' verify_rows when the caller built them already; they are rows offset ...
    of the step's batch of custom `processors`."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    device, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    if rows is None:
        rows = [row for item in items for row in verify_rows(item)]
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
    processed = process_logits(logits, rows, processors, offset)  # [R, V]
    probs = torch.nn.functional.one_hot(processed.argmax(dim=-1), vocab).to(dtype)  # greedy
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        probs[sampled] = sampling_distribution(
            processed[sampled],
            [rows[i] for i in sampled],
            after_min_p=argmax_invariant_hook(processors, offset, sampled),
        )
    noise_rows = exponential_noise(rows, vocab, dtype).to(device)  # [R, V]

    k = max(len(item.draft_token_ids) for item in items)
    batch = len(items)
    target = torch.zeros(batch, k + 1, vocab, dtype=dtype, device=device)
    noise = torch.ones(batch, k + 1, vocab, dtype=dtype, device=device)
    drafts = torch.zeros(batch, k, dtype=torch.int64, device=device)
    any_q = any(item.draft_probs is not None for item in items)
    draft_probs = torch.zeros(batch, k, vocab, dtype=dtype, device=device) if any_q else None
    starts = []
    row = 0
    for b, item in enumerate(items):
        m = len(item.draft_token_ids)
        starts.append(row)
        target[b, : m + 1] = probs[row : row + m + 1]
        noise[b, : m + 1] = noise_rows[row : row + m + 1]
        if m:
            drafts[b, :m] = torch.tensor(item.draft_token_ids, device=device)
            if draft_probs is not None:
                if item.draft_probs is not None:
                    draft_probs[b, :m] = item.draft_probs.to(device=device, dtype=dtype)
                else:  # greedy or n-gram drafts: a one-hot draft distribution
                    draft_probs[b, :m] = torch.nn.functional.one_hot(drafts[b, :m], vocab)
        row += m + 1

    emitted = rejection_sample(
        target_probs=target,
        draft_token_ids=drafts,
        num_drafts=torch.tensor([len(i.draft_token_ids) for i in items], device=device),
        draft_probs=draft_probs,
        greedy=torch.tensor([i.request.sampling_params.greedy for i in items], device=device),
        uniforms=accept_uniforms(items, k, dtype).to(device),
        noise=noise,
    )

    # Logprobs of each emitted token at its own row.
    emitted_rows = [starts[b] + j for b, tokens in enumerate(emitted) for j in range(len(tokens))]
    emitted_ids = torch.tensor([t for tokens in emitted for t in tokens], device=device)
    selected = raw_logprobs[emitted_rows]  # [E, V]
    token_logprobs = selected.gather(1, emitted_ids[:, None])[:, 0].tolist()
    want = [
        items[b].request.sampling_params.logprobs
        for b, tokens in enumerate(emitted)
        for _ in tokens
    ]
    entries: list[dict | None] = [None] * len(want)
    with_logprobs = [e for e, n in enumerate(want) if n is not None]
    if with_logprobs:
        built = logprob_entries(
            selected[with_logprobs],
            emitted_ids[with_logprobs],
            [want[e] or 0 for e in with_logprobs],
        )
        for e, entry in zip(with_logprobs, built, strict=True):
            entries[e] = entry

    out: list[list[SampledToken]] = []
    e = 0
    for tokens in emitted:
        out.append(
            [SampledToken(t, token_logprobs[e + j], entries[e + j]) for j, t in enumerate(tokens)]
        )
        e += len(tokens)
    return out
