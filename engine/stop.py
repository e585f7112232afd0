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
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: str | None = None  # the stop string that ended the text, once found
        self._text = ""
        # A match must end after this many characters (the text already searched).
        self._searched = 0

    @property
    def text(self) -> str:
        """All the text so far (cut at the stop string once one matched)."""
        return self._text

    def append(self, delta: str, check: bool = True) -> str | None:
        """Adds text; returns the stop string that this text completed, if any (only once)."""
        if self.matched is not None or not delta:
            return None
        self._text += delta
        if not check or not self.stop:
            self._searched = len(self._text)
            return None
        best: tuple[int, int, str] | None = None  # (end, -len, stop string)
        for stop in self.stop:
            start = self._text.find(stop, max(0, self._searched - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None or candidate < best else best
        self._searched = len(self._text)
        if best is None:
            return None
        end, _, stop = best
        self._text = self._text[: end if self.include_stop_str_in_output else end - len(stop)]
        self.matched = stop
        return stop

    def visible_text(self, finished: bool) -> str:
        """The text a caller may be shown now: all of it once finished or matched; otherwise
        without the tail that may still turn out to start a stop string."""
        if finished or self.matched is not None or not self.stop:
            return self._text
        if self.include_stop_str_in_output:
            return self._text  # a match only cuts text after its own end, never shown text
        return self._text[: len(self._text) - self._held_back()]

    def _held_back(self) -> int:
        longest = min(max(len(s) for s in self.stop) - 1, len(self._text))
        for size in range(longest, 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self.stop):
                return size
        return 0
