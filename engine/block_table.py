"""The model runner's persistent block table: one row of block ids per live request, kept across
steps and rewritten only where a request's table changed (the block table of vLLM v1's
persistent input batch).

    table [R, C] int32, on the host: row r holds its request's block ids in columns
                  0 .. n_r - 1 and 0 in every later column (AttentionMetadata's padding)

Rows and columns grow (doubling) when a step needs more, so no max_num_seqs / max_model_len is
needed up front. Each step the runner:

1. `remove`s the rows of requests that ended (`SchedulerOutput.finished_request_ids`, and the
   preempted ones: they come back with a whole new table);
2. `update`s the scheduled requests' rows: each writes only its ids past `num_unchanged_blocks`
   and zeros where its table got shorter, all of the step's writes in one indexed assignment
   (a decode step writes nothing, except when a request starts a new block);
3. `gather`s the step's rows into the metadata's [B, M] block table, M = the longest table.

So the Python-level work on block ids per step is proportional to the ids that changed, not to
the length of the requests (`num_ids_written` counts them, for tests).

Invariant (checked by tests/property/test_block_table_properties.py): after `update`, row r
equals the block ids last given for its request, followed by zeros. A row a request gets for the
first time (or again after `remove`) is written whole, whatever `num_unchanged_blocks` says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat

import torch


class PersistentBlockTable:
    def __init__(self, num_rows: int = 16, num_cols: int = 16) -> None:
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32)  # [R, C]
        self._num_blocks = [0] * num_rows  # ids held per row (the rest of the row is 0)
        self._rows: dict[str, int] = {}  # request id -> row
        self._free_rows = list(range(num_rows - 1, -1, -1))  # pop() hands out row 0 first
        self.num_ids_written = 0  # block ids (and padding zeros) written from Python, in all

    @property
    def num_requests(self) -> int:
        return len(self._rows)

    @property
    def request_ids(self) -> list[str]:
        """The requests that hold a row."""
        return list(self._rows)

    def row_of(self, request_id: str) -> int | None:
        return self._rows.get(request_id)

    def block_ids(self, request_id: str) -> list[int]:
        """The ids the table holds for the request (for tests and checks)."""
        row = self._rows.get(request_id)
        return [] if row is None else self.table[row, : self._num_blocks[row]].tolist()

    def remove(self, request_ids: Iterable[str]) -> None:
        """Frees the rows of these requests (unknown ids are ignored); a freed row is all 0."""
        for request_id in request_ids:
            row = self._rows.pop(request_id, None)
            if row is None:
                continue
            self.table[row, : self._num_blocks[row]] = 0
            self._num_blocks[row] = 0
            self._free_rows.append(row)

    def update(self, tables: Iterable[tuple[str, Sequence[int], int]]) -> list[int]:
        """Applies one step's block tables, (request id, whole table, number of leading ids
        unchanged since the request's previous update) each, at most one per request; returns
        their rows in order. Nothing is committed if it raises midway."""
        rows: list[int] = []
        new_lengths: list[int] = []
        write_rows: list[int] = []  # the cells to write, and their values
        write_cols: list[int] = []
        values: list[int] = []
        for request_id, block_ids, num_unchanged in tables:
            row = self._rows.get(request_id)
            if row is None:
                row, num_unchanged = self._new_row(request_id), 0
            old, new = self._num_blocks[row], len(block_ids)
            start = min(num_unchanged, old, new)
            if new > start:
                write_rows.extend(repeat(row, new - start))
                write_cols.extend(range(start, new))
                values.extend(block_ids[start:new])
            if old > new:  # the table got shorter: back to padding
                write_rows.extend(repeat(row, old - new))
                write_cols.extend(range(new, old))
                values.extend(repeat(0, old - new))
            rows.append(row)
            new_lengths.append(new)
        width = max(new_lengths, default=0)
        if width > self.table.shape[1]:
            self._grow(self.table.shape[0], max(width, 2 * self.table.shape[1]))
        if values:
            index = (torch.tensor(write_rows), torch.tensor(write_cols))
            self.table.index_put_(index, torch.tensor(values, dtype=torch.int32))
            self.num_ids_written += len(values)
        for row, new in zip(rows, new_lengths, strict=True):
            self._num_blocks[row] = new
        return rows

    def gather(self, rows: list[int]) -> torch.Tensor:  # [len(rows), max(M, 1)] int32
        """The rows, in this order, as far as the longest of them reaches (M ids): the step's
        block table (a new tensor)."""
        width = max(map(self._num_blocks.__getitem__, rows), default=0)
        index = torch.tensor(rows, dtype=torch.int64)
        return self.table[:, : max(width, 1)].index_select(0, index)

    def _new_row(self, request_id: str) -> int:
        if not self._free_rows:
            num_rows = self.table.shape[0]
            self._grow(2 * num_rows, self.table.shape[1])
            self._free_rows = list(range(2 * num_rows - 1, num_rows - 1, -1))
        row = self._free_rows.pop()
        self._rows[request_id] = row
        return row

    def _grow(self, num_rows: int, num_cols: int) -> None:
        old = self.table
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32)
        self.table[: old.shape[0], : old.shape[1]] = old
        self._num_blocks += [0] * (num_rows - len(self._num_blocks))
