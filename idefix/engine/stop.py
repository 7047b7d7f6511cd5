"""Stop strings on streamed text: emit what is safe now, hold back what may become a stop string.

The detokenizer yields text deltas; `StopStrings.feed` returns the part that can be shown now. A suffix that
is the beginning of some stop string is held back until the next delta settles it; when a stop string
completes, the text before its earliest occurrence is released and the stop string and everything after it
are dropped. Matching is on Python strings (code points), so multibyte characters are never split.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Incremental matcher for one sequence's stop strings; `feed` each delta, `flush` at the end."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self.matched: str | None = None
        """The stop string that ended the text, once one did."""
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string completed (later feeds then return ("", True))."""
        if self.stopped:
            return "", True
        text = self._held + delta
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            at, self.matched = min(found, key=lambda hit: hit[0])
            self._held = ""
            return text[:at], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Held-back text at the end of generation (none after a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
