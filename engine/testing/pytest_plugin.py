"""Pytest fixtures of the research kit. Enable with `pytest -p engine.testing.pytest_plugin`,
or `pytest_plugins = ["engine.testing.pytest_plugin"]` in a conftest.py.

Fixtures (each a function; reproducers go to the test's own tmp_path unless
`--engine-repro-dir DIR` or $ENGINE_REPRO_DIR is set):

    check_attention_backend(factory, **kw)     engine.testing.check_attention_backend
    check_proposer_lockstep(model, spec, **kw) engine.testing.check_proposer_lockstep
    check_batch_invariance(processor, **kw)    engine.testing.check_batch_invariance
    engine_repro_dir                           where this test's reproducers go

    def test_my_backend(check_attention_backend):
        check_attention_backend(MyBackend, max_examples=200)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from engine import testing
from engine.testing.reproducer import REPRO_DIR_ENV


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine-repro-dir",
        default=None,
        help="directory for engine.testing reproducer scripts (default: each test's tmp_path)",
    )


@pytest.fixture
def engine_repro_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    chosen = request.config.getoption("--engine-repro-dir") or os.environ.get(REPRO_DIR_ENV)
    return Path(chosen) if chosen else tmp_path


def _with_dir(check, directory: Path):
    @functools.wraps(check)
    def run(*args, **kwargs):
        kwargs.setdefault("repro_dir", directory)
        return check(*args, **kwargs)

    return run


@pytest.fixture
def check_attention_backend(engine_repro_dir: Path):
    return _with_dir(testing.check_attention_backend, engine_repro_dir)


@pytest.fixture
def check_proposer_lockstep(engine_repro_dir: Path):
    return _with_dir(testing.check_proposer_lockstep, engine_repro_dir)


@pytest.fixture
def check_batch_invariance(engine_repro_dir: Path):
    return _with_dir(testing.check_batch_invariance, engine_repro_dir)
