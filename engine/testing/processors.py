"""Batch invariance of logits processors: a row's result must not depend on its batch.

A logits-processor-like callable is `fn(logits [B, V], rows: Sequence[SamplingRow]) -> [B, V]`
(the shape of the sampler's steps in engine/sampler.py, e.g. `apply_penalties`,
`process_logits`). `check_batch_invariance(fn)` draws batches of rows (penalties, logit bias,
allowed tokens, min_tokens, temperature, top-k/p, min-p, prompt and output ids) and float64
logits, and requires that each row processed alone, and the batch processed in reverse order,
give exactly the rows of the whole batch's result. A failure is shrunk and raised with a
reproducer script.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from engine.sampler import SamplingRow
from engine.sampling_params import SamplingParams
from engine.testing.reproducer import factory_line, fail, find_failure

VOCAB = 16
Processor = Callable[[torch.Tensor, Sequence[SamplingRow]], torch.Tensor]


@st.composite
def sampling_rows(draw, vocab_size: int = VOCAB):
    """One row as plain data: {"params": SamplingParams kwargs, "prompt", "output", "eos"}."""
    token = st.integers(0, vocab_size - 1)
    output = draw(st.lists(token, max_size=6))
    params: dict[str, Any] = {"max_tokens": 16}
    optional = {
        "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.7]),
        "presence_penalty": st.sampled_from([-1.0, 0.5, 2.0]),
        "frequency_penalty": st.sampled_from([-0.5, 0.3, 1.5]),
        "repetition_penalty": st.sampled_from([0.8, 1.3, 2.0]),
        "logit_bias": st.dictionaries(token, st.sampled_from([-100.0, -2.5, 3.0]), max_size=3),
        "min_tokens": st.integers(0, 8),
        "allowed_token_ids": st.lists(token, min_size=1, max_size=5, unique=True),
        "top_k": st.sampled_from([-1, 1, 3]),
        "top_p": st.sampled_from([1.0, 0.5, 0.9]),
        "min_p": st.sampled_from([0.0, 0.1]),
    }
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        params[name] = draw(optional[name])
    return {
        "params": params,
        "prompt": draw(st.lists(token, min_size=1, max_size=6)),
        "output": output,
        "eos": draw(st.lists(token, max_size=1)),
    }


def processor_cases(vocab_size: int = VOCAB) -> st.SearchStrategy:
    """(rows as data, logits seed)."""
    return st.tuples(
        st.lists(sampling_rows(vocab_size), min_size=2, max_size=5), st.integers(0, 2**31 - 1)
    )


def build_rows(rows: list[dict], seed: int, vocab_size: int = VOCAB):
    """(logits [B, V] float64, SamplingRows) from the data a case holds."""
    built = [
        SamplingRow(
            params=SamplingParams(**row["params"]),
            sampling_seed=0,
            output_position=len(row["output"]),
            prompt_token_ids=row["prompt"],
            output_token_ids=row["output"],
            eos_token_ids=tuple(row["eos"]),
        )
        for row in rows
    ]
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(rows), vocab_size, generator=gen, dtype=torch.float64) * 3
    return logits, built


def assert_batch_invariant(processor: Processor, rows: list[dict], seed: int) -> None:
    logits, built = build_rows(rows, seed)
    whole = processor(logits.clone(), built)
    assert whole.shape == logits.shape, f"shape {tuple(whole.shape)}, expected {logits.shape}"
    for i, row in enumerate(built):
        alone = processor(logits[i : i + 1].clone(), [row])
        torch.testing.assert_close(
            alone[0], whole[i], rtol=0, atol=0, msg=lambda m, i=i: f"row {i} alone: {m}"
        )
    order = list(reversed(range(len(built))))
    reordered = processor(logits[order].clone(), [built[i] for i in order])
    torch.testing.assert_close(
        reordered, whole[order], rtol=0, atol=0, msg=lambda m: f"batch reversed: {m}"
    )


def check_batch_invariance(
    processor: Processor,
    *,
    max_examples: int = 100,
    derandomize: bool = False,
    repro_dir: str | os.PathLike | None = None,
) -> None:
    """Raises KitFailure with a reproducer if a row's result depends on its batch."""

    def body(case: tuple) -> None:
        assert_batch_invariant(processor, *case)

    found = find_failure(body, processor_cases(), max_examples, derandomize)
    if found is None:
        return
    (rows, seed), cause = found
    script = (
        '"""Reproducer written by engine.testing.check_batch_invariance: the processor gives a\n'
        'row a different result in this batch than alone or reordered."""\n\n'
        "from engine.plugins import load_reference\n"
        "from engine.testing.processors import assert_batch_invariant\n\n"
        + _processor_line(processor)
        + f"rows = {rows!r}\n"
        f"assert_batch_invariant(processor, rows, {seed!r})\n"
        'print("batch invariant")\n'
    )
    raise fail(
        f"logits processor {processor!r} is not batch invariant",
        found[0],
        cause,
        script,
        "processor",
        repro_dir,
    )


def _processor_line(processor: Processor) -> str:
    # A function is the processor itself; load_reference(...)() would call it.
    line = factory_line("processor", processor, "logits processor")
    return line.replace('"logits processor")()', '"logits processor")')
