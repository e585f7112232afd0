"""The research kit's test functions: check a new part against the engine's invariants.

    check_attention_backend(factory)          the backend equals the reference attention on the
                                              suite's hypothesis cases (engine/testing/attention.py)
    check_proposer_lockstep(model, spec)      a speculative proposer leaves greedy output unchanged
                                              (engine/testing/engines.py)
    check_batch_invariance(processor)         a logits processor gives a row the same result in
                                              any batch (engine/testing/processors.py)

Each raises `KitFailure` (an AssertionError) after hypothesis has shrunk the failing case; the
failure names a standalone reproducer script, written to $ENGINE_REPRO_DIR (default: the temp
dir's engine-repro/) and printed. The strategies themselves live in engine/testing/strategies.py
(attention), engines.py (workloads) and processors.py (sampling rows); the project's own tests
use them. Pytest fixtures: `-p engine.testing.pytest_plugin` (engine/testing/pytest_plugin.py).

Needs hypothesis (the dev extra).
"""

from engine.testing.attention import check_attention_backend, compare_with_reference
from engine.testing.engines import check_proposer_lockstep, run_workload, workloads
from engine.testing.processors import assert_batch_invariant, check_batch_invariance
from engine.testing.reproducer import KitFailure

__all__ = [
    "KitFailure",
    "assert_batch_invariant",
    "check_attention_backend",
    "check_batch_invariance",
    "check_proposer_lockstep",
    "compare_with_reference",
    "run_workload",
    "workloads",
]
