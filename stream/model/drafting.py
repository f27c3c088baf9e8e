"""Drafts for speculative greedy decoding: an n-gram table of the token sequences seen so far.

Explanations repeat their phrasing ("interactions in the last week, down from", "the previous 7 days",
"likely"), so the token that followed the same last 3 (else 2) tokens before is a good guess of the next one
(a single token is too weak a context: its guesses cost more compute than they save). `stream.model.onnx_models.Generator` feeds such guesses after each chosen token and keeps the
ones the model's own greedy choice confirms, so a decoder pass can advance a row by several free tokens;
the text is the greedy text whatever the drafts are (a wrong draft only costs the compute it was fed with).
The table learns every prompt and every accepted token of the process (most recent continuation wins) and
is cleared when it reaches `capacity` entries, so its memory stays bounded in a long-running stream.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramDrafter:
    """Next-token guesses from the n-grams (n = 1 .. order) of the sequences it has learnt."""

    def __init__(self, order: int = 3, min_order: int = 2, min_seen: int = 2, capacity: int = 500_000) -> None:
        if not 1 <= min_order <= order:
            raise ValueError(f"order {order}, min_order {min_order}: use 1 <= min_order <= order")
        self.order, self.min_order, self.min_seen = order, min_order, min_seen
        self.capacity = capacity
        self.table: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (next token, times in a row)

    def learn(self, tokens: Sequence[int], start: int = 0) -> None:
        """Record the continuation of every n-gram ending before tokens[p], for p >= max(start, 1)."""
        if len(self.table) > self.capacity:
            self.table.clear()
        for p in range(max(start, 1), len(tokens)):
            nxt = int(tokens[p])
            for n in range(self.min_order, min(self.order, p) + 1):
                key = tuple(tokens[p - n : p])
                last = self.table.get(key)
                self.table[key] = (nxt, last[1] + 1 if last is not None and last[0] == nxt else 1)

    def propose(self, tail: Sequence[int]) -> int | None:
        """The token that last followed the longest known suffix of `tail` (None: no n-gram known)."""
        for n in range(min(self.order, len(tail)), self.min_order - 1, -1):
            t = self.table.get(tuple(tail[-n:]))
            if t is not None:
                return t[0] if t[1] >= self.min_seen else None
        return None
