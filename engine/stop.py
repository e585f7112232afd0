"""Stop strings: one sequence's output text, searched incrementally as it grows.

The engine feeds a `StopStringChecker` the text deltas of the incremental detokenizer (which
never splits a character), so a stop string is found whether it arrives in one token, is split
across several, or contains a character whose bytes span tokens.

Which stop matches: the one that *ends* first in the text (if several end at the same place, the
longest). That is what a character-by-character scan finds, so the result does not depend on
how the text was cut into deltas, i.e. on how the model tokenized it.

Invariants:
* After a match the text ends right before the stop string (or right after it, with
  `include_stop_str_in_output`) and no later delta changes it.
* `visible_text(finished=False)` never shrinks from one call to the next, because it holds back
  the longest tail of the text that could still grow into a stop string (vLLM holds back
  `max(len(stop)) - 1` characters; holding back only a real prefix is enough). Streaming clients
  therefore never see text that a later match would cut off.
* Text appended with `check=False` (before `min_tokens`) is never matched on its own: a match
  must end in text appended with `check=True`.

Cost: each stop string is a Knuth-Morris-Pratt automaton whose state is the length of the
longest suffix of the text that is a prefix of that stop string. Appending a delta advances the
states over the delta's characters only (amortised O(len(delta) x number of stops), whatever
the length of the text or of the stop strings), and the held-back tail is the largest state, so
neither the search nor the hold-back ever rescans earlier text. The failure tables are built
once per distinct stop list and shared by the checkers of a request's samples.

The text is kept as the list of appended deltas (joined only when the whole text is asked for,
and then kept joined), so appending never copies the text so far: `text_since(start)` and
`visible_text_since(start, ...)` give what a streaming output needs in time proportional to the
new text, and `visible_length` is O(1). `visible_text` / `text` build the whole string (O(text)
once per call after new deltas: what a cumulative output needs anyway).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence


@functools.lru_cache(maxsize=256)
def _failure_tables(stops: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """KMP prefix function per stop string: table[i] = length of the longest proper border of
    stop[: i + 1]."""
    tables = []
    for stop in stops:
        table = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = table[k - 1]
            if stop[i] == stop[k]:
                k += 1
            table[i] = k
        tables.append(tuple(table))
    return tuple(tables)


@functools.lru_cache(maxsize=256)
def _alphabet(stops: tuple[str, ...]) -> frozenset[str]:
    return frozenset("".join(stops))


class StopStringChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: str | None = None  # the stop string that ended the text, once found
        # The text, as chunks (each a delta, or several joined): _ends[i] is the length of the
        # text up to the end of _chunks[i]; _length the whole text's.
        self._chunks: list[str] = []
        self._ends: list[int] = []
        self._length = 0
        self._tables = _failure_tables(self.stop)
        self._alphabet = _alphabet(self.stop)
        # Per stop: the length of the longest suffix of the text that is a prefix of it.
        self._states = [0] * len(self.stop)

    @property
    def text(self) -> str:
        """All the text so far (cut at the stop string once one matched)."""
        if len(self._chunks) > 1:  # join once; later calls reuse the joined chunk
            self._chunks = ["".join(self._chunks)]
            self._ends = [self._length]
        return self._chunks[0] if self._chunks else ""

    def text_since(self, start: int, end: int | None = None) -> str:
        """text[start:end], in time proportional to its length (not to the text's)."""
        end = self._length if end is None else min(end, self._length)
        if start >= end:
            return ""
        first = bisect.bisect_right(self._ends, start)  # the chunk holding character `start`
        last = bisect.bisect_left(self._ends, end)  # the chunk holding character `end - 1`
        offset = self._ends[first] - len(self._chunks[first])  # where chunk `first` starts
        if first == last:
            return self._chunks[first][start - offset : end - offset]
        tail_offset = self._ends[last] - len(self._chunks[last])
        return "".join(
            [
                self._chunks[first][start - offset :],
                *self._chunks[first + 1 : last],
                self._chunks[last][: end - tail_offset],
            ]
        )

    def _cut(self, length: int) -> None:
        """Keeps the first `length` characters of the text."""
        last = bisect.bisect_left(self._ends, length)  # the chunk holding character length - 1
        del self._chunks[last + 1 :], self._ends[last + 1 :]
        if self._chunks:
            offset = self._ends[last] - len(self._chunks[last])
            self._chunks[last] = self._chunks[last][: length - offset]
            self._ends[last] = length
        self._length = length

    def append(self, delta: str, check: bool = True) -> str | None:
        """Adds text; returns the stop string that this text completed, if any (only once)."""
        if self.matched is not None or not delta:
            return None
        start = self._length
        self._chunks.append(delta)
        self._length += len(delta)
        self._ends.append(self._length)
        if not self.stop:
            return None
        stops, tables, states, alphabet = self.stop, self._tables, self._states, self._alphabet
        for offset, char in enumerate(delta):
            if char not in alphabet:  # no stop string has it: every partial match breaks
                for j in range(len(states)):
                    states[j] = 0
                continue
            best: str | None = None  # the longest stop string ending at this character
            for j, stop in enumerate(stops):
                state = states[j]
                while state and stop[state] != char:
                    state = tables[j][state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    if check and (best is None or len(stop) > len(best)):
                        best = stop
                    state = tables[j][state - 1]
                states[j] = state
            if best is not None:
                end = start + offset + 1
                self._cut(end if self.include_stop_str_in_output else end - len(best))
                self.matched = best
                return best
        return None

    def visible_length(self, finished: bool) -> int:
        """How much of the text a caller may be shown now: all of it once finished or matched;
        otherwise without the tail that may still turn out to start a stop string."""
        if finished or self.matched is not None or not self.stop:
            return self._length
        if self.include_stop_str_in_output:
            return self._length  # a match only cuts text after its own end, never shown text
        return self._length - self._held_back()

    def visible_text(self, finished: bool) -> str:
        """The text a caller may be shown now (see `visible_length`)."""
        return self.text[: self.visible_length(finished)]

    def visible_text_since(self, start: int, finished: bool) -> str:
        """visible_text(finished)[start:] in time proportional to its length: what a streamed
        (DELTA) output adds after having shown `start` characters."""
        return self.text_since(start, self.visible_length(finished))

    def _held_back(self) -> int:
        return max(self._states, default=0)
