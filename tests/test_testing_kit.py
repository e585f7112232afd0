"""The research kit (engine.testing): a broken backend and a batch-dependent processor fail it
with a printed, runnable reproducer; correct parts (the project's own) pass; the pytest plugin's
fixtures work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import sampler
from engine.fast.torch_native import TorchNativeAttention
from engine.testing import (
    KitFailure,
    check_attention_backend,
    check_batch_invariance,
    check_proposer_lockstep,
)
from tests.kit_plugins import BrokenBackend, RepeatLastProposer, batch_mean_processor

ROOT = Path(__file__).resolve().parents[1]


def run_script(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_broken_backend_fails_with_a_shrunk_reproducer(tmp_path, capsys):
    with pytest.raises(KitFailure) as info:
        check_attention_backend(BrokenBackend, max_examples=60, repro_dir=tmp_path)
    failure = info.value
    assert f"reproducer written to {failure.reproducer}" in capsys.readouterr().err
    assert failure.reproducer.parent == tmp_path and str(failure.reproducer) in str(failure)
    params, _, _ = failure.example
    # shrunk: one request whose context just exceeds 5 tokens
    assert len(params["requests"]) == 1 and params["requests"][0][0] == 6
    result = run_script(failure.reproducer)
    assert result.returncode != 0 and "max abs error" in result.stdout
    assert "Mismatched elements" in result.stderr or "AssertionError" in result.stderr


def test_correct_backend_passes(tmp_path):
    check_attention_backend(TorchNativeAttention, max_examples=15, repro_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_project_processors_are_batch_invariant(tmp_path):
    for processor in (
        sampler.apply_allowed_token_ids,
        sampler.apply_bad_words,
        sampler.apply_min_tokens,
        sampler.apply_logit_bias,
        sampler.apply_penalties,
        sampler.process_logits,
    ):
        check_batch_invariance(processor, max_examples=30, repro_dir=tmp_path)


def test_batch_dependent_processor_fails_with_a_reproducer(tmp_path):
    with pytest.raises(KitFailure) as info:
        check_batch_invariance(batch_mean_processor, max_examples=30, repro_dir=tmp_path)
    rows, _ = info.value.example
    assert len(rows) == 2  # shrunk to the smallest batch
    result = run_script(info.value.reproducer)
    assert result.returncode != 0 and "row 0 alone" in result.stderr


def test_plugin_proposer_passes_the_lockstep_check(llama_path, tmp_path):
    """A wrong-most-of-the-time proposer keeps greedy output: the target verifies every draft."""
    spec = {"method": "tests.kit_plugins:RepeatLastProposer", "num_speculative_tokens": 2}
    check_proposer_lockstep(str(llama_path), spec, max_examples=4, repro_dir=tmp_path)
    assert RepeatLastProposer  # imported by reference above, not by name


def test_lockstep_failure_writes_a_reproducer(llama_path, tmp_path, monkeypatch):
    """If greedy output did change (simulated by a proposer that corrupts the request's
    tokens), the kit says so with a reproducer."""
    from tests import kit_plugins

    class Corrupting(kit_plugins.RepeatLastProposer):
        def propose(self, request, max_tokens):
            if request.output_token_ids:
                request.output_token_ids[-1] = (request.output_token_ids[-1] + 1) % 50
            return []

    monkeypatch.setattr(kit_plugins, "Corrupting", Corrupting, raising=False)
    Corrupting.__module__, Corrupting.__qualname__ = "tests.kit_plugins", "Corrupting"
    spec = {"method": "tests.kit_plugins:Corrupting", "num_speculative_tokens": 2}
    with pytest.raises(KitFailure) as info:
        check_proposer_lockstep(str(llama_path), spec, max_examples=10, repro_dir=tmp_path)
    script = info.value.reproducer.read_text()
    assert "speculative_config = {'method': 'tests.kit_plugins:Corrupting'" in script


pytest_plugins = ["engine.testing.pytest_plugin"]


def test_pytest_plugin_fixtures(check_batch_invariance, engine_repro_dir):
    with pytest.raises(KitFailure) as info:
        check_batch_invariance(batch_mean_processor, max_examples=10)
    assert info.value.reproducer.parent == engine_repro_dir


def test_pytest_plugin_from_the_command_line(tmp_path):
    """`pytest -p engine.testing.pytest_plugin` on a user's test file: the fixture fails a
    broken backend, and the failure names the reproducer written to --engine-repro-dir."""
    test_file = tmp_path / "test_user_backend.py"
    test_file.write_text(
        "from tests.kit_plugins import BrokenBackend\n\n\n"
        "def test_backend(check_attention_backend):\n"
        "    check_attention_backend(BrokenBackend, max_examples=30)\n"
    )
    repro = tmp_path / "repro"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "engine.testing.pytest_plugin",
         "--engine-repro-dir", str(repro), "-p", "no:cacheprovider", str(test_file)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    scripts = list(repro.glob("attention-*.py"))
    assert len(scripts) == 1 and f"reproducer: {scripts[0]}" in result.stdout
