"""Custom logits processors: vLLM v1's batch-level interface.

A processor is a class, named `package.module:Class` (or vLLM's `package.module.Class`; modules
in $ENGINE_PLUGINS are imported first) or given as the class itself, built once per engine as
`Class(config, device, is_pin_memory)` (vLLM's constructor signature; `config` is an
`EngineConfigView` with `model_config`, `scheduler_config` and `engine_args`). Every step it
is told how the batch changed (`update_state(BatchUpdate | None)`, None when nothing changed) and
then transforms the batch's logits (`apply(logits [B, V]) -> [B, V]`), row i belonging to the
request it was told sits at index i. Per-request arguments
come in `SamplingParams.extra_args` (the server fills it from the request's `vllm_xargs`).

Where they run (engine/sampler.py, vLLM's order): a processor that is not argmax-invariant runs
after allowed_token_ids, bad_words, min_tokens and logit_bias and before the penalties; an
argmax-invariant one (`is_argmax_invariant()` True: it never changes a row's argmax, e.g. it
only lowers tokens other than the top one) runs after temperature and min_p, before top-k/top-p,
and only the rows that sample see it: greedy rows take their argmax before it, and a step with
only greedy rows does not call it (as vLLM's sampler does).

The batch (`BatchUpdateBuilder`): the rows of one step, in order: the plain sampling rows, then
the speculative verification rows. A request's plain row carries over from the previous step
(keeping or changing its index) while it has the same request id, the same SamplingParams
object and the same output list; its `added` entry hands the processor the request's live
output list (it grows as tokens are sampled, as in vLLM). A verification row sees the drafts
before it as generated tokens; its output is a snapshot, so it is new in every step. A request
that finishes, is aborted or preempted, or does not sample in a step (a prefill chunk, a step
it is not scheduled in) has no row: it is removed, and added again when it samples again.

BatchUpdate semantics (what a processor's `update_state` may rely on):
- `added` (index, params, prompt token ids, output token ids): the row now at `index` is a new
  request; whatever the processor held for `index` is replaced. Apply these first.
- `removed`: indices left empty (never an index also in `added`).
- `moved` (a, b, direction), applied in order after those: UNIDIRECTIONAL moves the row at a to
  b (b was empty; a is empty afterwards); SWAP exchanges the rows at a and b.
- afterwards indices 0 .. batch_size - 1 hold exactly this step's rows, in the sampler's order,
  and nothing is held at batch_size or beyond.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.plugins import is_reference, load_plugin_modules, load_reference
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.sampler import SamplingRow

FIELD = "logits_processors"


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()  # a -> b, a left empty
    SWAP = enum.auto()  # a <-> b


RemovedRequest = int
# (index, params, prompt token ids, output token ids)
AddedRequest = tuple[int, SamplingParams, Sequence[int], Sequence[int]]
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass(frozen=True, slots=True)
class BatchUpdate:
    """How the batch changed since the previous step (see the module docstring)."""

    batch_size: int
    removed: Sequence[RemovedRequest] = ()
    added: Sequence[AddedRequest] = ()
    moved: Sequence[MovedRequest] = ()


@dataclass(frozen=True, slots=True)
class EngineConfigView:
    """What a processor's constructor gets in place of vLLM's VllmConfig."""

    model_config: Any
    scheduler_config: Any
    engine_args: Any


class LogitsProcessor(ABC):
    """The base class of custom logits processors (vLLM v1's `LogitsProcessor`)."""

    @abstractmethod
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Called when a request is added; raise ValueError for extra_args this processor
        cannot use (the request is then refused). The default accepts every request."""
        return None

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the current batch -> [B, V] (may work in place)."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if apply never changes a row's argmax (then greedy rows skip it)."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called once per step before apply; None when the batch did not change."""
        raise NotImplementedError


# ---- loading ----------------------------------------------------------------------------------


def validate_logits_processors(value: Any) -> tuple[str | type, ...] | None:
    """EngineArgs.logits_processors -> a tuple of `module:Class` strings and classes (or None),
    each checked to load as a class; ValueError naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, (str, type)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{FIELD} must be a list of 'package.module:Class' or classes")
    entries = tuple(value)
    for entry in entries:
        resolve_processor_class(entry)
    return entries or None


def resolve_processor_class(entry: str | type) -> type:
    if isinstance(entry, str):
        load_plugin_modules()
        if not is_reference(entry) and "." in entry:  # vLLM's form: package.module.Class
            module, _, attr = entry.rpartition(".")
            entry = f"{module}:{attr}"
        if not is_reference(entry):
            raise ValueError(f"{FIELD}: {entry!r} is not of the form 'package.module:Class'")
        entry = load_reference(entry, FIELD)
    if not isinstance(entry, type):
        raise ValueError(f"{FIELD}: {entry!r} is not a class")
    for method in ("apply", "is_argmax_invariant", "update_state"):
        if not callable(getattr(entry, method, None)):
            raise ValueError(f"{FIELD}: {entry.__qualname__} has no method {method}()")
    return entry


# ---- the persistent batch ---------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    request_id: str | None
    params: SamplingParams
    output: Sequence[int]  # the request's live output list, or a snapshot (fresh each step)
    fresh: bool  # a snapshot (or a row without a request id): never carried over


def _key(slot: _Slot) -> tuple[str | None, int, int]:
    """Equal keys <=> the same row (the previous step's slots keep their objects alive)."""
    return slot.request_id, id(slot.params), id(slot.output)


def _slot(row: SamplingRow) -> tuple[_Slot, Sequence[int]]:
    """The row's identity and the output list its `added` entry hands over."""
    if row.draft_token_ids:
        output: Sequence[int] = [*row.output_token_ids, *row.draft_token_ids]
        return _Slot(row.request_id, row.params, output, fresh=True), output
    fresh = row.request_id is None
    return _Slot(row.request_id, row.params, row.output_token_ids, fresh), row.output_token_ids


@dataclass(slots=True)
class BatchUpdateBuilder:
    """Diffs consecutive steps' row lists into BatchUpdates (vLLM's persistent batch)."""

    slots: list[_Slot] = field(default_factory=list)

    def update(self, rows: Sequence[SamplingRow]) -> BatchUpdate | None:
        new = [_slot(r) for r in rows]
        n = len(new)
        layout: list[_Slot | None] = list(self.slots)
        # Match each new row to a previous index holding the same row.
        by_key: dict[tuple[str | None, int, int], list[int]] = {}
        for i, s in enumerate(layout):
            if s is not None and not s.fresh:
                by_key.setdefault(_key(s), []).append(i)
        survivors: set[int] = set()
        unmatched: list[int] = []  # positions in `new` that need an `added` entry
        for p, (s, output) in enumerate(new):
            candidates = [] if s.fresh else by_key.get(_key(s), [])
            if candidates:  # the same request, params and live output list: carried over
                i = candidates.pop(0)
                survivors.add(i)
                new[p] = (layout[i], output)  # type: ignore[assignment]
            else:
                unmatched.append(p)
        vacated = [i for i in range(len(layout)) if i not in survivors]
        for i in vacated:
            layout[i] = None
        # Added rows go to their final index if empty, else to the lowest empty one, else last.
        added: list[AddedRequest] = []
        refilled: set[int] = set()
        for p in unmatched:
            slot, output = new[p]
            if p < len(layout) and layout[p] is None:
                index = p
            else:
                empty = [i for i in range(len(layout)) if layout[i] is None]
                index = empty[0] if empty else len(layout)
            if index == len(layout):
                layout.append(None)
            layout[index] = slot
            refilled.add(index)
            added.append((index, slot.params, rows[p].prompt_token_ids, output))
        removed = [i for i in vacated if i not in refilled]
        # Moves: bring each final position's row there, in order.
        where = {id(s): i for i, s in enumerate(layout) if s is not None}
        moved: list[MovedRequest] = []
        for p, (slot, _) in enumerate(new):
            q = where[id(slot)]
            if q == p:
                continue
            if layout[p] is None:
                moved.append((q, p, MoveDirectionality.UNIDIRECTIONAL))
                layout[p], layout[q] = slot, None
            else:
                moved.append((q, p, MoveDirectionality.SWAP))
                other = layout[p]
                layout[p], layout[q] = slot, other
                where[id(other)] = q
            where[id(slot)] = p
        assert all(s is None for s in layout[n:]), "rows left beyond the batch"
        self.slots = [s for s in layout[:n] if s is not None]
        assert len(self.slots) == n
        if not (removed or added or moved):
            return None
        return BatchUpdate(batch_size=n, removed=removed, added=added, moved=moved)


# ---- the engine's processors ------------------------------------------------------------------


class LogitsProcessors:
    """The engine's custom processors and their batch: `begin_step` once per step with all of
    the step's rows (plain sampling rows, then verification rows), then the sampler and the
    verifier apply them to their slices through `StepProcessors`."""

    def __init__(self, processors: Sequence[Any]) -> None:
        self.processors = list(processors)
        self.non_argmax_invariant = [p for p in self.processors if not p.is_argmax_invariant()]
        self.argmax_invariant = [p for p in self.processors if p.is_argmax_invariant()]
        self.builder = BatchUpdateBuilder()

    @classmethod
    def build(
        cls,
        entries: Sequence[str | type] | None,
        config: EngineConfigView,
        device: torch.device,
    ) -> LogitsProcessors | None:
        if not entries:
            return None
        is_pin_memory = device.type == "cuda" and torch.cuda.is_available()
        return cls([resolve_processor_class(e)(config, device, is_pin_memory) for e in entries])

    def validate_params(self, params: SamplingParams) -> None:
        for processor in self.processors:
            validate = getattr(type(processor), "validate_params", None)
            if validate is not None:
                validate(params)

    def begin_step(self, rows: Sequence[SamplingRow]) -> StepProcessors:
        update = self.builder.update(rows)
        for processor in self.processors:
            processor.update_state(update)
        return StepProcessors(self, len(rows))


@dataclass(frozen=True, slots=True)
class StepProcessors:
    """One step's processors. A caller holding rows [offset, offset + n) of the step's batch
    applies them with `apply_*(logits [n', V], offset, rows)` (rows: which of its n rows the
    tensor holds; None: all). The processors see a [batch_size, V] tensor in which the rows
    this call does not hold are zeros (processors are row-wise, so those rows do not matter)."""

    owner: LogitsProcessors
    batch_size: int

    def apply_non_argmax_invariant(
        self, logits: torch.Tensor, offset: int, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        return self._apply(self.owner.non_argmax_invariant, logits, offset, rows)

    def apply_argmax_invariant(
        self, logits: torch.Tensor, offset: int, rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        return self._apply(self.owner.argmax_invariant, logits, offset, rows)

    def _apply(
        self,
        processors: Sequence[Any],
        logits: torch.Tensor,  # [n', V]
        offset: int,
        rows: Sequence[int] | None,
    ) -> torch.Tensor:
        if not processors or logits.shape[0] == 0:
            return logits
        index = list(range(logits.shape[0])) if rows is None else list(rows)
        positions = [offset + i for i in index]
        whole = positions == list(range(self.batch_size))
        if whole:
            full = logits.clone()  # processors may work in place
        else:
            full = logits.new_zeros(self.batch_size, logits.shape[-1])  # [B, V]
            full[positions] = logits
        for processor in processors:
            full = processor.apply(full)
            if full.shape != (self.batch_size, logits.shape[-1]):
                raise RuntimeError(
                    f"logits processor {type(processor).__qualname__} returned shape "
                    f"{tuple(full.shape)}, expected {(self.batch_size, logits.shape[-1])}"
                )
        return full if whole else full[positions]
