"""Checking an attention backend against the reference on the suite's hypothesis cases.

`check_attention_backend(factory)` draws mixed batches (decodes, prompts and chunks on cached
prefixes, GQA, block sizes, shuffled block tables with garbage in spare blocks), sliding windows
and (unless `softcap=False`) soft-caps, and requires the backend built by `factory()` to write
exactly the reference's K/V and to attend to within `rtol`/`atol` of `ReferenceAttention`
(defaults: 1e-12 in float64, 1e-5 in float32). A failure is shrunk and raised as a
`KitFailure` whose reproducer script rebuilds the minimal batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from engine.reference.attention import ReferenceAttention
from engine.testing.reproducer import factory_line, fail, find_failure
from engine.testing.strategies import make_batch, mixed_batches, run_backend, sliding_windows
from engine.testing.strategies import softcaps as softcap_values

DEFAULT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def compare_with_reference(
    backend: Any,
    params: dict,
    sliding_window: int | None,
    softcap: float | None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    reference: Any = None,
) -> None:
    """Asserts that `backend` writes the reference's K/V and attends within tolerance on the
    batch `make_batch(**params, dtype=dtype)`."""
    tol = DEFAULT_TOLERANCE.get(dtype, 1e-2)
    rtol, atol = (tol if rtol is None else rtol), (tol if atol is None else atol)
    batch = make_batch(**params, dtype=dtype)
    reference = reference or ReferenceAttention()
    expected, ref_k, ref_v = run_backend(reference, batch, sliding_window, softcap)
    out, k_cache, v_cache = run_backend(backend, batch, sliding_window, softcap)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), (
        "the backend wrote K/V differently from the reference"
    )
    assert out.dtype == expected.dtype, f"output dtype {out.dtype}, expected {expected.dtype}"
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


def backend_cases(softcap: bool = True) -> st.SearchStrategy:
    """(make_batch params, sliding window, softcap) triples."""
    return st.tuples(mixed_batches(), sliding_windows, softcap_values if softcap else st.none())


def check_attention_backend(
    factory: Callable[[], Any],
    *,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
    softcap: bool = True,
    max_examples: int = 100,
    derandomize: bool = False,
    repro_dir: str | os.PathLike | None = None,
) -> None:
    """Raises KitFailure (an AssertionError) with a reproducer if the backend disagrees with
    the reference on any drawn case. One backend instance serves every example, as in an
    engine (per-step caches must notice each new metadata object)."""
    backend = factory()

    def body(case: tuple) -> None:
        params, window, cap = case
        compare_with_reference(backend, params, window, cap, dtype, rtol, atol)

    found = find_failure(body, backend_cases(softcap), max_examples, derandomize)
    if found is None:
        return
    (params, window, cap), cause = found
    raise fail(
        f"attention backend {factory!r} disagrees with the reference",
        found[0],
        cause,
        _script(factory, params, window, cap, dtype, rtol, atol),
        "attention",
        repro_dir,
    )


def _script(factory, params, window, cap, dtype, rtol, atol) -> str:
    return (
        '"""Reproducer written by engine.testing.check_attention_backend: the minimal batch on\n'
        'which the backend disagrees with the reference attention."""\n\n'
        "import torch\n\n"
        "from engine.plugins import load_reference\n"
        "from engine.testing.attention import compare_with_reference\n"
        "from engine.testing.strategies import make_batch, run_backend\n"
        "from engine.reference.attention import ReferenceAttention\n\n"
        + factory_line("backend", factory, "attention backend")
        + f"params = {params!r}\n"
        f"window, softcap, dtype = {window!r}, {cap!r}, {dtype!r}\n"
        "batch = make_batch(**params, dtype=dtype)\n"
        "expected, _, _ = run_backend(ReferenceAttention(), batch, window, softcap)\n"
        "out, _, _ = run_backend(backend, batch, window, softcap)\n"
        'print("max abs error:", (out - expected).abs().max().item())\n'
        f"compare_with_reference(backend, params, window, softcap, dtype, {rtol!r}, {atol!r})\n"
        'print("agrees")\n'
    )
