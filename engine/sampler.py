"""The sampler: one row of logits per sampling request -> one token each (+ logprobs).

Order of operations, vectorised over the batch with each row's own parameters (vLLM's order):

1. logprobs = log_softmax(raw logits): the logprobs returned to callers are those of the model's
   own distribution, before any of the steps below (vLLM's default "raw_logprobs").
2. allowed_token_ids: every other token -> -inf.
3. bad_words: a word's last token -> -inf when the output so far ends with its other tokens.
4. min_tokens: end-of-sequence (unless ignore_eos) and stop_token_ids -> -inf while fewer than
   min_tokens tokens have been generated.
5. logit_bias: added to the listed tokens' logits.
6. penalties: repetition_penalty (tokens in prompt or output: positive logits / p, negative
   logits * p), then frequency_penalty * count and presence_penalty * [count > 0] (counts over
   the output only) subtracted.
7. temperature: rows with temperature 0 are greedy: argmax of the logits after step 6, and
   steps 8-10 do not apply to them.
8. min_p: tokens with probability below min_p * (the top probability) -> -inf.
9. top-k, then top-p over what top-k kept (both keep every token tied with the last one kept).
10. the draw: argmax(probs / E) with E ~ Exponential(1) i.i.d. per token, which picks token i
    with probability probs[i] (the exponential race).

If steps 2-5 leave a row with no token at all (e.g. allowed_token_ids that are all bad words),
that row falls back to its raw logits rather than sampling from nothing.

Batch invariance: the noise E of a row comes from a generator seeded only by the request's
sampling seed and the output position being sampled, and every step above is row-wise, so a
seeded request draws the same token whatever else is in the batch, and again after a
preemption recomputes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.logprobs import logprob_entries
from engine.sampling_params import SamplingParams
from engine.scheduler.interface import SampledToken

_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


def splitmix64(x: int) -> int:
    """A bijective 64-bit mixer: nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(sampling_seed: int, output_position: int) -> int:
    """The generator seed for drawing output token number `output_position` of a request."""
    return splitmix64(splitmix64(sampling_seed & _MASK64) ^ output_position) & ((1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs to know about one row.

    The token sequences are read during the call only (the runner passes the request's own
    lists, not copies).
    """

    params: SamplingParams
    sampling_seed: int
    output_position: int  # index of the token being sampled among the request's outputs
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: tuple[int, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()


# ---- logits processors: each [B, V] -> [B, V], each row by its own parameters ------------------


def _ban(logits: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    if rows:
        logits = logits.index_put(
            (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
            torch.tensor(_NEG_INF, dtype=logits.dtype, device=logits.device),
        )
    return logits


def apply_allowed_token_ids(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    restricted = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    if not restricted:
        return logits
    allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)  # [B, V]
    allowed[restricted] = False
    row_idx = [i for i in restricted for _ in rows[i].params.allowed_token_ids or ()]
    col_idx = [t for i in restricted for t in rows[i].params.allowed_token_ids or ()]
    allowed[row_idx, col_idx] = True
    return logits.masked_fill(~allowed, _NEG_INF)


def apply_bad_words(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, row in enumerate(rows):
        output = row.output_token_ids
        for word in row.bad_words_token_ids:
            prefix = word[:-1]
            if len(prefix) <= len(output) and (
                not prefix or list(output[len(output) - len(prefix) :]) == list(prefix)
            ):
                ban_rows.append(i)
                ban_cols.append(word[-1])
    return _ban(logits, ban_rows, ban_cols)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for i, row in enumerate(rows):
        params = row.params
        if row.output_position >= params.min_tokens:
            continue
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(row.eos_token_ids)
        ban_rows += [i] * len(stops)
        ban_cols += sorted(stops)
    return _ban(logits, ban_rows, ban_cols)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    row_idx: list[int] = []
    col_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in (row.params.logit_bias or {}).items():
            row_idx.append(i)
            col_idx.append(token_id)
            values.append(bias)
    if not row_idx:
        return logits
    device = logits.device
    return logits.index_put(
        (torch.tensor(row_idx, device=device), torch.tensor(col_idx, device=device)),
        torch.tensor(values, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def _padded(sequences: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), pad, dtype=torch.int64)  # [b, L]
    for i, seq in enumerate(sequences):
        if len(seq):
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return out.to(device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    penalized = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        or r.params.frequency_penalty != 0.0
        or r.params.presence_penalty != 0.0
    ]
    if not penalized:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    sub = logits[penalized]  # [b, V]
    # Column `vocab` takes the padding and is dropped.
    outputs = _padded([rows[i].output_token_ids for i in penalized], vocab, device)  # [b, L]
    counts = torch.zeros(len(penalized), vocab + 1, dtype=sub.dtype, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=sub.dtype))
    counts = counts[:, :vocab]  # [b, V] occurrences in the output
    prompts = _padded([rows[i].prompt_token_ids for i in penalized], vocab, device)
    seen = torch.zeros(len(penalized), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, prompts, True)
    seen = seen[:, :vocab] | (counts > 0)  # [b, V] in prompt or output

    def column(values: list[float]) -> torch.Tensor:  # [b, 1]
        return torch.tensor(values, dtype=sub.dtype, device=device)[:, None]

    repetition = column([rows[i].params.repetition_penalty for i in penalized])
    frequency = column([rows[i].params.frequency_penalty for i in penalized])
    presence = column([rows[i].params.presence_penalty for i in penalized])
    penalized_logits = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, penalized_logits, sub)
    sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
    out = logits.clone()
    out[penalized] = sub
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (after temperature), min_p [B] (0 disables)."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V], after temperature
    top_k: torch.Tensor,  # [B] int64, V where disabled
    top_p: torch.Tensor,  # [B] float, 1.0 where disabled
) -> torch.Tensor:  # [B, V] with removed tokens at -inf
    """Top-k, then top-p over the renormalised top-k distribution, with one sort.

    Both cut at a logit value and keep every token >= it, so tokens tied with the last one kept
    are kept too: the result does not depend on how the sort orders ties. Top-p keeps the most
    likely tokens whose preceding (strictly more likely) mass is below top_p.
    """
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [B, V]
    threshold = sorted_logits.gather(1, (top_k - 1)[:, None])  # [B, 1] k-th largest logit
    if bool((top_p < 1.0).any()):
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, _NEG_INF)
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        cum = probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # [B, V]
        num_kept = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)  # [B]
        threshold = torch.maximum(threshold, sorted_logits.gather(1, (num_kept - 1)[:, None]))
    return logits.masked_fill(logits < threshold, _NEG_INF)


def exponential_noise(
    rows: Sequence[SamplingRow], vocab: int, dtype: torch.dtype
) -> torch.Tensor:  # [B, V] on the CPU
    noise = torch.empty(len(rows), vocab, dtype=dtype)
    generator = torch.Generator(device="cpu")
    for i, row in enumerate(rows):
        generator.manual_seed(position_seed(row.sampling_seed, row.output_position))
        noise[i].exponential_(generator=generator)
    # An exact 0 would turn a masked token's 0 / E into NaN, which argmax would pick.
    return noise.clamp_(min=torch.finfo(dtype).tiny)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 2-6 of the module docstring: [B, V] raw logits -> [B, V] processed logits."""
    processed = apply_allowed_token_ids(logits, rows)
    processed = apply_bad_words(processed, rows)
    processed = apply_min_tokens(processed, rows)
    processed = apply_logit_bias(processed, rows)
    dead = torch.isneginf(processed).all(dim=-1)  # [B]: nothing left to sample
    if bool(dead.any()):
        processed = torch.where(dead[:, None], logits, processed)
    return apply_penalties(processed, rows)


def sampling_distribution(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 7-9 for non-greedy rows: processed logits [B, V] -> probabilities [B, V]."""
    device, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=dtype, device=device)
    scaled = logits / temperature[:, None]
    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        scaled = apply_min_p(scaled, torch.tensor(min_p, dtype=dtype, device=device))
    top_k = [vocab if r.params.top_k == -1 else min(r.params.top_k, vocab) for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        scaled = apply_top_k_top_p(
            scaled,
            torch.tensor(top_k, dtype=torch.int64, device=device),
            torch.tensor(top_p, dtype=dtype, device=device),
        )
    return scaled.softmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """logits: [B, V], one row per entry of rows."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        vocab, device = logits.shape[-1], logits.device
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]

        processed = process_logits(logits, rows)
        tokens = processed.argmax(dim=-1)  # [B]: the greedy rows' answer
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            sub_rows = [rows[i] for i in sampled]
            probs = sampling_distribution(processed[sampled], sub_rows)  # [b, V]
            noise = exponential_noise(sub_rows, vocab, logits.dtype).to(device)
            tokens[sampled] = (probs / noise).argmax(dim=-1)

        token_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()  # [B]
        tokens_list = tokens.tolist()
        with_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        entries = {}
        if with_logprobs:
            built = logprob_entries(
                raw_logprobs[with_logprobs],
                tokens[with_logprobs],
                [rows[i].params.logprobs or 0 for i in with_logprobs],
            )
            entries = dict(zip(with_logprobs, built, strict=True))
        return [
            SampledToken(tokens_list[i], token_logprobs[i], entries.get(i))
            for i in range(len(rows))
        ]
