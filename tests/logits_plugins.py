"""Custom logits processors written outside the engine package (vLLM v1's interface), loaded by
name in tests/test_logits_processors.py: `--logits-processors tests.logits_plugins:BanToken`.

Each keeps a model of the batch from its BatchUpdates (index -> the row's extra_args) and checks
it on every update: indices 0 .. batch_size - 1 held, nothing beyond."""

from __future__ import annotations

from typing import Any

import torch

from engine.logits_process import BatchUpdate, LogitsProcessor, MoveDirectionality
from engine.sampling_params import SamplingParams

# Every processor built, so a test can look at what the engine told it.
INSTANCES: list[Any] = []


class BatchModel(LogitsProcessor):
    """The batch as BatchUpdates describe it: index -> (extra_args, output token ids)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[dict, Any]] = {}
        self.batch_size = 0
        self.updates: list[BatchUpdate | None] = []
        self.applied: list[list[Any]] = []  # per apply: each row's extra_args "tag"
        assert vllm_config.model_config is not None and isinstance(is_pin_memory, bool)
        INSTANCES.append(self)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.updates.append(batch_update)
        if batch_update is None:
            return
        removed = set(batch_update.removed)
        for index, params, _prompt, output in batch_update.added:
            assert index not in removed, "an index both added and removed"
            self.rows[index] = (dict(params.extra_args or {}), output)
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction is MoveDirectionality.UNIDIRECTIONAL:
                assert row_a is not None and row_b is None, f"bad move {a} -> {b}"
                self.rows[b] = row_a
            else:
                assert row_a is not None and row_b is not None, f"bad swap {a} <-> {b}"
                self.rows[a], self.rows[b] = row_b, row_a
        self.batch_size = batch_update.batch_size
        assert sorted(self.rows) == list(range(self.batch_size)), sorted(self.rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape[0] == self.batch_size, (logits.shape, self.batch_size)
        self.applied.append([self.rows[i][0].get("tag") for i in range(self.batch_size)])
        return logits

    def is_argmax_invariant(self) -> bool:
        return False


class BanToken(BatchModel):
    """Bans token extra_args["ban"] (-inf) in the rows of the requests that ask."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        ban = (sampling_params.extra_args or {}).get("ban")
        if ban is not None and (isinstance(ban, bool) or not isinstance(ban, int) or ban < 0):
            raise ValueError(f"extra_args.ban must be a token id, got {ban!r}")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = super().apply(logits)
        rows = [i for i, (args, _) in self.rows.items() if args.get("ban") is not None]
        if rows:
            cols = [self.rows[i][0]["ban"] for i in rows]
            logits[rows, cols] = float("-inf")
        return logits


class NoRepeat(BatchModel):
    """For requests with extra_args {"no_repeat": true}: the last output token cannot come
    again at once. Reads the output list it was handed (live for plain rows, with the drafts
    for verification rows)."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = super().apply(logits)
        for i, (args, output) in self.rows.items():
            if args.get("no_repeat") and len(output):
                logits[i, output[-1]] = float("-inf")
        return logits


class KeepTopK(BatchModel):
    """Argmax-invariant: keeps the extra_args["keep"] largest logits of a row (others -inf)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.calls = 0

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = super().apply(logits)
        self.calls += 1
        for i, (args, _) in self.rows.items():
            keep = args.get("keep")
            if keep is not None and keep < logits.shape[-1]:
                kth = logits[i].topk(keep).values[-1]
                logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
        return logits


class NotAProcessor:
    """Lacks the interface: loading it is a ValueError naming logits_processors."""

    def __init__(self, *args: Any) -> None:
        pass
