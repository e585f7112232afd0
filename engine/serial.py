"""Running an op on one torch thread, so that its result does not depend on the thread count.

torch splits some CPU ops over its threads when there is little else to split, and their float
sums then round differently at 1 and at 2 threads. Two sit on the batch-1 decode path: the
sampler's logprob normaliser, a logsumexp over one row of logits (one output element: torch sums
the row in per-thread parts; measured on random rows of 49,152, 1 in 50 differed in the last
bit), and the CPU SDPA kernel of a lone decode query, which splits the keys over the threads at
some lengths (differences at 40 and 100 cached keys, none at 170 and 190). The adaptive CPU
reservation (engine/cpu_contention.py) moves the engine between 1 and all threads mid-request,
so the same request could come out in other bits under load. `on_one_thread` runs such an op on
the calling thread only: the same bits at any thread count, for about the same time (both ops
are small; measured in the README's "Numerics" of the adaptive reservation).

Invariant: the thread count is back to its value at entry when the call returns or raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["on_one_thread"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def on_one_thread(fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """fn(*args, **kwargs) with torch's intra-op threads set to 1 for the call."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
