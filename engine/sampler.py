"""The sampler: one row of logits per sampling request -> one token each (+ logprobs).

Order of operations, vectorised over the batch with each row's own parameters (vLLM's order):

1. logprobs = log_softmax(raw logits): the logprobs returned to callers are those of the model's
   own distribution, before any of the steps below (vLLM's default "raw_logprobs").
2. allowed_token_ids: every other token -> -inf.
3. bad_words: a word's last token -> -inf when the output so far ends with its other tokens.
4. min_tokens: end-of-sequence (unless ignore_eos) and stop_token_ids -> -inf while fewer than
   min_tokens tokens have been generated.
5. logit_bias: added to the listed tokens' logits.
5b. custom logits processors that are not argmax-invariant (engine/logits_process.py, vLLM's
   `--logits-processors`), in the order given, on the step's whole batch.
6. penalties: repetition_penalty (tokens in prompt or output: positive logits / p, negative
   logits * p), then frequency_penalty * count and presence_penalty * [count > 0] (counts over
   the output only) subtracted.
6b. structured outputs: rows with a grammar (`SamplingRow.grammar_bitmask`, the packed bitmask of
   the tokens the request's grammar allows next) -> every other token -inf. This is vLLM's place
   for the mask: after the logits processors, before temperature.
7. temperature: rows with temperature 0 are greedy: argmax of the logits after step 6b, and
   steps 8-10 do not apply to them.
8. min_p: tokens with probability below min_p * (the top probability) -> -inf.
8b. custom argmax-invariant logits processors, on the rows that sample only (vLLM's order: greedy
   rows take their argmax before them).
9. top-k, then top-p over what top-k kept (both keep every token tied with the last one kept).
10. the draw: argmax(probs / E) with E ~ Exponential(1) i.i.d. per token, which picks token i
    with probability probs[i] (the exponential race). `draw_tokens` finds the top-p set's winner
    without sorting the vocabulary (see there); `sampling_distribution` gives the probabilities.

If steps 2-5b leave a row with no token at all (e.g. allowed_token_ids that are all bad words),
that row falls back to its raw logits rather than sampling from nothing. The grammar outranks
them: if the grammar mask leaves nothing of the processed row (say min_tokens bans the end of
sequence that a complete JSON value requires), the row is the raw logits with the grammar mask
alone, so the output always matches the grammar. Only an empty grammar mask (a matcher in an
error state) leaves a row unconstrained.

Batch invariance: the noise E of a row comes from a generator seeded only by the request's
sampling seed and the output position being sampled, and every step above is row-wise, so a
seeded request draws the same token whatever else is in the batch, and again after a
preemption recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.logprobs import logprob_entries
from engine.penalties import PenaltyCounts, add_counts, penalties_enabled
from engine.sampling_params import SamplingParams
from engine.scheduler.interface import SampledToken
from engine.serial import on_one_thread
from engine.structured.grammar import bitmask_to_bool

if TYPE_CHECKING:
    from engine.logits_process import StepProcessors

# A step applied to a sub-batch of logits [b, V] -> [b, V] (custom argmax-invariant processors).
LogitsHook = Callable[[torch.Tensor], torch.Tensor]

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

    The output so far is output_token_ids followed by draft_token_ids (speculative tokens that
    a verification row treats as generated). The token sequences are read during the call only
    (the runner passes the request's own lists, not copies), and only their tails are read,
    except by the fallback penalty count when `penalty_counts` is None.
    """

    params: SamplingParams
    sampling_seed: int
    output_position: int  # index of the token being sampled among the request's outputs
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: tuple[int, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    draft_token_ids: Sequence[int] = ()
    # The request's incremental counts (penalties); None: counted here from the sequences.
    penalty_counts: PenaltyCounts | None = None
    # Structured outputs: [ceil(V / 32)] int32, bit t % 32 of word t // 32 set when token t may
    # come next (the request's grammar state after the output so far, drafts included).
    grammar_bitmask: torch.Tensor | None = None
    # The request this row samples for: custom logits processors track the batch by it.
    request_id: str | None = None

    def output_tail(self, n: int) -> list[int] | None:
        """The last n tokens of the output so far (drafts included); None if it is shorter."""
        drafts, output = self.draft_token_ids, self.output_token_ids
        from_output = n - len(drafts)
        if from_output > len(output):
            return None
        if from_output <= 0:
            return list(drafts[len(drafts) - n :]) if n else []
        return [*output[len(output) - from_output :], *drafts]


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
        for word in row.bad_words_token_ids:
            if row.output_tail(len(word) - 1) == list(word[:-1]):
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


def _penalty_tensors(
    row: SamplingRow, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output counts [V] int32, prompt mask [V] bool) of one row, drafts included."""
    if row.penalty_counts is not None:
        counts, prompt_mask = row.penalty_counts.tensors(row.output_token_ids, vocab, device)
    else:  # a row built without the request's counts: count the sequences (O(length))
        counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        add_counts(counts, row.output_token_ids)
        prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if row.prompt_token_ids:
            prompt_mask[torch.tensor(list(row.prompt_token_ids), device=device)] = True
    if row.draft_token_ids:
        counts = counts.clone()
        add_counts(counts, row.draft_token_ids)
    return counts, prompt_mask


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Dense over the vocabulary, for the rows that use a penalty: each row's output counts and
    prompt mask come from its request's incremental `PenaltyCounts`, so the work per step does
    not grow with the prompt or the output. Tokens in neither are left exactly as they are."""
    penalized = [i for i, r in enumerate(rows) if penalties_enabled(r.params)]
    if not penalized:
        return logits
    device, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    pairs = [_penalty_tensors(rows[i], vocab, device) for i in penalized]
    counts = torch.stack([c for c, _ in pairs]).to(dtype)  # [b, V]
    in_prompt = torch.stack([m for _, m in pairs])  # [b, V] bool

    def column(name: str) -> torch.Tensor:  # [b, 1]
        values = [getattr(rows[i].params, name) for i in penalized]
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    index = torch.tensor(penalized, device=device)
    values = logits.index_select(0, index)  # [b, V]
    present = counts > 0
    rep = column("repetition_penalty")
    repeated = torch.where(values > 0, values / rep, values * rep)
    values = torch.where(in_prompt | present, repeated, values)
    values = values - column("frequency_penalty") * counts
    values = values - column("presence_penalty") * present.to(dtype)
    return logits.index_copy(0, index, values)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (after temperature), min_p [B] (0 disables)."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


# Top-p first looks for its cut among this many most likely tokens (a top-k, much cheaper than
# sorting the vocabulary); only rows whose cut lies further out sort the whole row.
TOP_P_CANDIDATES = 512


def _top_k_top_p_by_sort(
    logits: torch.Tensor,  # [b, V]
    top_k: torch.Tensor,  # [b]
    top_p: torch.Tensor,  # [b]
) -> torch.Tensor:  # [b] the logit threshold: tokens >= it stay
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [b, V]
    threshold = sorted_logits.gather(1, (top_k - 1)[:, None])[:, 0]  # [b] k-th largest logit
    sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold[:, None], _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)  # [b, V]
    cum = probs.cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # [b, V]
    num_kept = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)  # [b]
    cut = sorted_logits.gather(1, (num_kept - 1)[:, None])[:, 0]
    return torch.where(top_p < 1.0, torch.maximum(threshold, cut), threshold)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V], after temperature
    top_k: torch.Tensor,  # [B] int64, V where disabled
    top_p: torch.Tensor,  # [B] float, 1.0 where disabled
    num_candidates: int = TOP_P_CANDIDATES,
) -> torch.Tensor:  # [B, V] with removed tokens at -inf
    """Top-k, then top-p over the renormalised top-k distribution.

    Both cut at a logit value and keep every token >= it, so tokens tied with the last one kept
    are kept too: the result does not depend on how ties are ordered. Top-p keeps the most
    likely tokens whose preceding (strictly more likely) mass is below top_p.

    The cut is searched among the row's top-k tokens, or, for a top-p-only row, among its
    `num_candidates` most likely tokens; a row whose top-p cut is not found there (a flat
    distribution) falls back to sorting its whole row.
    """
    vocab = logits.shape[-1]
    use_k = top_k < vocab  # [B]
    use_p = top_p < 1.0  # [B]
    width = int(torch.where(use_k, top_k, min(num_candidates, vocab)).max())
    candidates = logits.topk(width, dim=-1).values  # [B, width], descending
    threshold = torch.where(
        use_k, candidates.gather(1, (top_k.clamp(max=width) - 1)[:, None])[:, 0], _NEG_INF
    )  # [B]
    if bool(use_p.any()):
        # log of the mass top-p takes a fraction of: the top-k set's (ties with the k-th token
        # included, so over the whole row) or the whole row's
        log_total = logits.masked_fill(logits < threshold[:, None], _NEG_INF).logsumexp(dim=-1)
        kept = candidates.masked_fill(candidates < threshold[:, None], _NEG_INF)  # [B, width]
        probs = (kept - log_total[:, None]).exp()  # [B, width]
        cum = probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        num_kept = (mass_before < top_p[:, None]).sum(dim=-1).clamp(min=1)  # [B]
        cut = candidates.gather(1, (num_kept - 1)[:, None])[:, 0]
        threshold = torch.where(use_p, torch.maximum(threshold, cut), threshold)
        # All candidates kept and the row has more tokens: the cut may lie beyond them.
        unsure = use_p & ~use_k & (num_kept == width) & (width < vocab)
        if bool(unsure.any()):
            rows = unsure.nonzero()[:, 0]
            threshold[rows] = _top_k_top_p_by_sort(logits[rows], top_k[rows], top_p[rows])
    return logits.masked_fill(logits < threshold[:, None], _NEG_INF)


def exponential_noise(
    rows: Sequence[SamplingRow], vocab: int, dtype: torch.dtype
) -> torch.Tensor:  # [B, V] on the CPU
    """E ~ Exponential(1) per token, from a generator seeded by (seed, output position) only."""
    noise = torch.empty(len(rows), vocab, dtype=dtype)
    generator = torch.Generator(device="cpu")
    for i, row in enumerate(rows):
        generator.manual_seed(position_seed(row.sampling_seed, row.output_position))
        noise[i].uniform_(generator=generator)  # [0, 1); uniform_ is ~3x faster than exponential_
    # -log(1 - U) ~ Exponential(1). An exact 0 would turn a masked token's 0 / E into NaN
    # (which argmax picks), so E is kept >= the smallest normal number.
    return noise.neg_().log1p_().neg_().clamp_(min=torch.finfo(dtype).tiny)


def apply_grammar(
    processed: torch.Tensor, raw: torch.Tensor, rows: Sequence[SamplingRow]
) -> torch.Tensor:
    """Step 6b: processed [B, V] -> the same with tokens the rows' grammars forbid at -inf. A row
    the mask would empty gets raw [B, V] logits under the grammar mask alone; an empty grammar
    mask leaves its row as it was."""
    constrained = [i for i, r in enumerate(rows) if r.grammar_bitmask is not None]
    if not constrained:
        return processed
    device = processed.device
    every_row = len(constrained) == len(rows)
    index = None if every_row else torch.tensor(constrained, device=device)
    bitmask = torch.stack([rows[i].grammar_bitmask for i in constrained])  # [b, W]
    allowed = bitmask_to_bool(bitmask.to(device, non_blocking=True), processed.shape[-1])
    sub = processed if index is None else processed.index_select(0, index)  # [b, V]
    values = sub.masked_fill(~allowed, _NEG_INF)  # [b, V]
    dead = values.amax(dim=-1) == _NEG_INF  # [b]
    if bool(dead.any()):
        raw_sub = raw if index is None else raw.index_select(0, index)
        grammar_only = raw_sub.masked_fill(~allowed, _NEG_INF)
        values = torch.where(dead[:, None], grammar_only, values)
        still_dead = values.amax(dim=-1) == _NEG_INF
        values = torch.where(still_dead[:, None], sub, values)
    return values if index is None else processed.index_copy(0, index, values)


def process_logits(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    processors: StepProcessors | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Steps 2-6b of the module docstring: [B, V] raw logits -> [B, V] processed logits. The rows
    are rows offset .. offset + B - 1 of the step's batch of custom `processors`."""
    processed = apply_allowed_token_ids(logits, rows)
    processed = apply_bad_words(processed, rows)
    processed = apply_min_tokens(processed, rows)
    processed = apply_logit_bias(processed, rows)
    if processors is not None:
        processed = processors.apply_non_argmax_invariant(processed, offset)
    if processed is not logits:  # something was excluded: is anything left?
        dead = torch.isneginf(processed).all(dim=-1)  # [B]
        if bool(dead.any()):
            processed = torch.where(dead[:, None], logits, processed)
    return apply_grammar(apply_penalties(processed, rows), logits, rows)


def truncated_logits(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    with_top_p: bool = True,
    after_min_p: LogitsHook | None = None,
) -> torch.Tensor:
    """Steps 7-9 for non-greedy rows: processed logits [B, V] -> temperature-scaled logits [B, V]
    with the tokens min-p, top-k and (if with_top_p) top-p exclude at -inf. `after_min_p` is
    step 8b (the custom argmax-invariant processors of these rows)."""
    device, dtype, vocab = logits.device, logits.dtype, logits.shape[-1]
    temperatures = [r.params.temperature for r in rows]
    scaled = logits
    if any(t != 1.0 for t in temperatures):
        scaled = logits / torch.tensor(temperatures, dtype=dtype, device=device)[:, None]
    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        scaled = apply_min_p(scaled, torch.tensor(min_p, dtype=dtype, device=device))
    if after_min_p is not None:
        scaled = after_min_p(scaled)
    top_k = [vocab if r.params.top_k == -1 else min(r.params.top_k, vocab) for r in rows]
    top_p = [r.params.top_p if with_top_p else 1.0 for r in rows]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        scaled = apply_top_k_top_p(
            scaled,
            torch.tensor(top_k, dtype=torch.int64, device=device),
            torch.tensor(top_p, dtype=dtype, device=device),
        )
    return scaled


def sampling_distribution(
    logits: torch.Tensor, rows: Sequence[SamplingRow], after_min_p: LogitsHook | None = None
) -> torch.Tensor:
    """Steps 7-9 for non-greedy rows: processed logits [B, V] -> probabilities [B, V]."""
    return truncated_logits(logits, rows, after_min_p=after_min_p).softmax(dim=-1)


# Rounds of the top-p race in draw_tokens before a row falls back to sorting.
TOP_P_RACE_ROUNDS = 4


def draw_tokens(
    logits: torch.Tensor,  # [B, V] processed logits of non-greedy rows
    rows: Sequence[SamplingRow],
    noise: torch.Tensor,  # [B, V] exponential_noise of the rows
    race_rounds: int = TOP_P_RACE_ROUNDS,
    after_min_p: LogitsHook | None = None,
) -> torch.Tensor:  # [B] int64
    """Steps 7-10: the token argmax(probs / noise) over the min-p / top-k / top-p set.

    Top-p is resolved without sorting the vocabulary: the race winner of the min-p / top-k set is
    accepted when the tokens strictly more likely than it hold less than top_p of the mass (then
    it is inside the top-p set, and it beats every token there); otherwise it and every token at
    most as likely are outside the set, so they are struck out and the race rerun with the same
    noise. That picks the very token masking first would pick, usually in one round; a row still
    unresolved after `race_rounds` rounds is masked by apply_top_k_top_p.
    """
    scaled = truncated_logits(logits, rows, with_top_p=False, after_min_p=after_min_p)  # [B, V]
    probs = scaled.softmax(dim=-1)
    score = probs / noise  # [B, V]
    tokens = score.argmax(dim=-1)  # [B]
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype, device=probs.device)
    pending = (top_p < 1.0).nonzero()[:, 0]  # rows whose winner is not yet known to be inside
    for _ in range(race_rounds):
        if pending.numel() == 0:
            break
        row_logits = scaled[pending]  # [n, V]
        winner_logit = row_logits.gather(1, tokens[pending, None])  # [n, 1]
        mass_above = probs[pending].masked_fill(row_logits <= winner_logit, 0.0).sum(dim=-1)
        outside = mass_above >= top_p[pending]  # [n]
        pending, row_logits, winner_logit = (
            pending[outside],
            row_logits[outside],
            winner_logit[outside],
        )
        if pending.numel():
            score[pending] = score[pending].masked_fill(row_logits <= winner_logit, 0.0)
            tokens[pending] = score[pending].argmax(dim=-1)
    if pending.numel():
        vocab = torch.full_like(pending, logits.shape[-1])
        cut = apply_top_k_top_p(scaled[pending], vocab, top_p[pending])
        tokens[pending] = (cut.softmax(dim=-1) / noise[pending]).argmax(dim=-1)
    return tokens


def _log_normaliser(logits: torch.Tensor) -> torch.Tensor:  # [b, V] -> [b]
    """logsumexp over the vocabulary. One row runs on one thread (`engine.serial`): torch sums a
    lone row in per-thread parts, so its last bit would depend on the thread count; more rows
    are split over the threads by row."""
    if logits.shape[0] == 1:
        return on_one_thread(torch.logsumexp, logits, dim=-1)
    return logits.logsumexp(dim=-1)


def _take(tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
    """tensor[index] without a copy when index is every row in order."""
    return tensor if index == list(range(tensor.shape[0])) else tensor[index]


def argmax_invariant_hook(
    processors: StepProcessors | None, offset: int, rows: list[int]
) -> LogitsHook | None:
    """Step 8b for the sub-batch `rows` (indices among the caller's rows, which are rows
    offset ... of the processors' batch)."""
    if processors is None or not processors.owner.argmax_invariant:
        return None
    return lambda scaled: processors.apply_argmax_invariant(scaled, offset, rows)


class Sampler:
    # The step's custom logits processors (engine/logits_process.py), set by the runner before
    # a call; the sampler's rows are the first rows of their batch.
    step_processors: StepProcessors | None = None

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """logits: [B, V], one row per entry of rows."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        vocab, device = logits.shape[-1], logits.device
        # Raw logprobs (step 1) are logits - logsumexp, computed only for the rows that asked for
        # logprobs (a logsumexp over [B, V] costs as much as the greedy argmax several times).
        with_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        log_total = torch.full((len(rows),), float("nan"), dtype=logits.dtype, device=device)
        if with_logprobs:
            log_total[with_logprobs] = _log_normaliser(_take(logits, with_logprobs))  # [b]

        processors = self.step_processors
        processed = process_logits(logits, rows, processors)
        tokens = torch.zeros(len(rows), dtype=torch.int64, device=device)  # [B]
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            tokens[greedy] = _take(processed, greedy).argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            sub_rows = [rows[i] for i in sampled]
            noise = exponential_noise(sub_rows, vocab, logits.dtype).to(device)  # [b, V]
            hook = argmax_invariant_hook(processors, 0, sampled)
            tokens[sampled] = draw_tokens(
                _take(processed, sampled), sub_rows, noise, after_min_p=hook
            )

        token_logprobs = (logits.gather(1, tokens[:, None])[:, 0] - log_total).tolist()  # [B]
        tokens_list = tokens.tolist()
        entries = {}
        if with_logprobs:
            built = logprob_entries(
                _take(logits, with_logprobs) - log_total[with_logprobs, None],  # [b, V]
                tokens[with_logprobs],
                [rows[i].params.logprobs or 0 for i in with_logprobs],
            )
            entries = dict(zip(with_logprobs, built, strict=True))
        return [
            SampledToken(tokens_list[i], token_logprobs[i], entries.get(i))
            for i in range(len(rows))
        ]
