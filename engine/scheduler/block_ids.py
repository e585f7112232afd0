"""A request's block ids as the scheduler hands them to the runner: persistent, not rebuilt.

The KV cache manager keeps, per request, a `BlockIdList`: the ids of its blocks in table order,
appended to as blocks are allocated and cut when blocks are freed (rejected speculative tokens).
Each scheduled step carries a `BlockIdsSnapshot` of it (the whole table, without copying it) and
how many of its leading ids are unchanged since the request's previous scheduled step, so the
model runner's persistent block table (engine/block_table.py) rewrites only what changed and
no per-step work grows with the length of the request.

Invariant that makes snapshots safe without a copy: the list a `BlockIdList` holds is only ever
appended to in place; cutting it replaces it with a new, shorter list. So the first `length` ids
of a list never change once a snapshot of that length exists, whatever happens to the request
afterwards (more blocks, a cut, its end).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import overload


class BlockIdsSnapshot(Sequence[int]):
    """The first `len(self)` ids of an append-only list: an immutable sequence of block ids that
    shares the list instead of copying it. Compares equal to any sequence of the same ids."""

    __slots__ = ("_ids", "_length")

    def __init__(self, ids: list[int], length: int) -> None:
        self._ids = ids  # 0 <= length <= len(ids), and ids[:length] never changes
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...

    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        if isinstance(index, slice):
            return tuple(self._ids[slice(*index.indices(self._length))])
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("block index out of range")
        return self._ids[index]

    def __iter__(self) -> Iterator[int]:
        return islice(self._ids, self._length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(other) == self._length and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"BlockIdsSnapshot({list(self)})"


class BlockIdList:
    """One request's block ids in table order, plus `num_synced`: how many leading ids the
    request's last scheduled step carried that have not changed since (a cut lowers it)."""

    __slots__ = ("_ids", "num_synced")

    def __init__(self) -> None:
        self._ids: list[int] = []
        self.num_synced = 0

    def __len__(self) -> int:
        return len(self._ids)

    def extend(self, block_ids: Iterable[int]) -> None:
        self._ids.extend(block_ids)

    def truncate(self, length: int) -> None:
        """Keeps the first `length` ids, in a new list: snapshots of the old one stay valid."""
        if length < len(self._ids):
            self._ids = self._ids[:length]
            self.num_synced = min(self.num_synced, length)

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def snapshot(self) -> BlockIdsSnapshot:
        return BlockIdsSnapshot(self._ids, len(self._ids))

    def take_for_step(self) -> tuple[BlockIdsSnapshot, int]:
        """The whole table for a scheduled step, and how many of its leading ids the previous
        scheduled step already carried unchanged; from now on all of them count as carried."""
        num_unchanged, self.num_synced = self.num_synced, len(self._ids)
        return self.snapshot(), num_unchanged
