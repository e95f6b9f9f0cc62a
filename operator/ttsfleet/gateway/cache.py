"""Replies already spoken, kept to be streamed again at once. Not thread-safe: the
gateway's event loop owns it.

Keyed on what makes the audio: the fleet, its model (image and precision, as the
operator writes them into the config) and voice, the text with its whitespace
normalised, the speed, the format and whether it is framed as server-sent events. A
reply is stored only when it streamed to its end, as the bytes the client received,
and replayed in one write: the same bytes as the live stream, at once (one write
rather than one per chunk: see benchmarks/results/gateway.json `cached`).
Bounded by bytes, least recently used out first; a reply bigger than an eighth of the
bound is not kept. A new gateway config empties it (routes may point elsewhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

Key = tuple[Hashable, ...]


def normalise(text: str) -> str:
    return " ".join(text.split())


class ReplyCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Key, bytes] = OrderedDict()

    def get(self, key: Key) -> bytes | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: Key, chunks: list[bytes]) -> bool:
        """Keep a whole reply; False when it is too big to be worth a place."""
        size = sum(len(c) for c in chunks)
        if size > self.max_bytes // 8 or key in self._entries:
            return False
        self._entries[key] = b"".join(chunks)
        self.size += size
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)
