"""Speculative proposers by name: `speculative_config={"method": NAME, ...}`.

Built in: `ngram` (prompt lookup, ngram.py), `suffix` (suffix decoding, suffix.py) and
`draft_model` (a smaller model, draft_model.py; it owns a KV cache and runs batched, so the
Speculator drives it itself and it is not a factory here). Plug-ins add names with
`register_proposer(name, factory)`, or are named by reference, `"method": "pkg.module:Factory"`
(loaded on first use; modules listed in `$ENGINE_PLUGINS` are imported first, see
engine/plugins.py).

A factory is called as `factory(spec_config, model_config)` and returns a `Proposer`. The
config's own keys of a plug-in method (anything vLLM's schema does not name) arrive in
`spec_config.extra` as sorted (key, value) pairs.

Invariant a proposer must keep (tests: `engine.testing.check_proposer_lockstep`): whatever it
proposes, greedy output is unchanged, because the target verifies every draft. Drafts only
change speed. A proposal is truncated to `max_tokens`; token ids outside the vocabulary are a
ValueError naming the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from engine.plugins import is_reference, load_plugin_modules, load_reference, register_factory

if TYPE_CHECKING:
    from engine.config import ModelConfig, SpeculativeConfig
    from engine.request import Request


@runtime_checkable
class Proposer(Protocol):
    """Proposes drafts for one request at a time, after each step that advanced it."""

    def propose(self, request: Request, max_tokens: int) -> list[int]:
        """Up to `max_tokens` draft token ids continuing `request.all_token_ids` (may be
        fewer, or none). Called only for running requests that just sampled."""
        ...


class FinishAware(Protocol):
    """Optional: `finish(request)` is called once a request that the proposer saw finishes
    (stop, length or abort), so per-request state can be dropped or learned from."""

    def finish(self, request: Request) -> None: ...


ProposerFactory = Callable[["SpeculativeConfig", "ModelConfig"], Proposer]
BUILTIN_METHODS = ("ngram", "suffix", "draft_model")
_PROPOSERS: dict[str, ProposerFactory] = {}


def register_proposer(name: str, factory: ProposerFactory, *, override: bool = False) -> None:
    """Makes `speculative_config={"method": name}` use `factory(spec_config, model_config)`."""
    register_factory("proposer", _PROPOSERS, BUILTIN_METHODS, name, factory, override)


def unregister_proposer(name: str) -> None:
    _PROPOSERS.pop(name, None)


def available_proposers() -> tuple[str, ...]:
    load_plugin_modules()
    return BUILTIN_METHODS + tuple(sorted(_PROPOSERS))


def check_proposer_method(method: Any) -> None:
    """ValueError naming `speculative_config.method` unless `method` can be built."""
    if method in BUILTIN_METHODS:
        return
    if isinstance(method, str):
        load_plugin_modules()
        if method in _PROPOSERS:
            return
        if is_reference(method):
            _PROPOSERS[method] = load_reference(method, "speculative_config.method")
            return
    raise ValueError(
        f"speculative_config.method must be one of {', '.join(available_proposers())} "
        f"(or 'package.module:Factory'), got {method!r}"
    )


def build_proposer(spec: SpeculativeConfig, model_config: ModelConfig) -> Proposer:
    """The proposer of a registered (or built-in ngram / suffix) method."""
    if spec.method == "ngram":
        from engine.spec_decode.ngram import NgramRequestProposer

        return NgramRequestProposer(spec)
    if spec.method == "suffix":
        from engine.spec_decode.suffix import SuffixDecodingProposer

        return SuffixDecodingProposer.from_config(spec)
    check_proposer_method(spec.method)
    proposer = _PROPOSERS[spec.method](spec, model_config)
    if not callable(getattr(proposer, "propose", None)):
        raise ValueError(
            f"speculative_config.method {spec.method!r}: the factory returned "
            f"{type(proposer).__name__}, which has no propose(request, max_tokens)"
        )
    return proposer
