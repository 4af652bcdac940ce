"""Keep the KV cache of a session's last turn, so its next turn prefills only what is new."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    """What one session's last turn left: its tokens, the images among them, and their keys and values."""

    ids: list[int]
    image_keys: list[str | None]  # the stored image ids behind the image runs of ``ids``, in order
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, heads, len(ids), dim)
    nbytes: int


class PrefixCache:
    """An LRU of session prefixes on this worker's device, bounded in bytes.

    Keys are conversation keys (common/affinity.py); a turn's entry replaces the one it started from.
    Matching is by token ids and image identity, so a stale or foreign entry can only shorten the reused
    prefix, never change an answer.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str | None) -> PrefixEntry | None:
        """Return the session's entry (marking it recently used), or None."""
        if key is None or self.max_bytes <= 0:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def fits(self, nbytes: int) -> bool:
        """Tell whether an entry of this size could be kept at all (checked before copying it)."""
        return 0 < nbytes <= self.max_bytes

    def discard(self, key: str | None) -> None:
        """Drop a conversation's older prefix once a longer one of it is kept (each turn would otherwise leave one)."""
        if key is None:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes

    def put(self, key: str, ids: list[int], image_keys: list[str | None],
            layers: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Store a session's prefix (replacing its older one); return whether it fit the budget."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if self.max_bytes <= 0 or nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = PrefixEntry(ids, image_keys, layers, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
        return True

    def clear(self) -> None:
        """Forget every entry (after a device fault the tensors may be unusable)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def reusable(entry: PrefixEntry, ids: Sequence[int], image_keys: Sequence[str | None], image_token: int | None) -> int:
    """Return how many leading tokens of ``ids`` the entry's cache can stand for.

    The longest common prefix of the token ids, cut back to the start of the first image that differs
    (same-size images have the same placeholder tokens) or that the prefix would split, and leaving at
    least one token to run, since the next token's distribution comes from the last prompt token.
    """
    limit = min(len(entry.ids), len(ids) - 1)
    n = 0
    while n < limit and entry.ids[n] == ids[n]:
        n += 1
    if image_token is None:
        return n
    image = 0
    i = 0
    while i < n:
        if ids[i] != image_token:
            i += 1
            continue
        end = i
        while end < len(ids) and ids[end] == image_token:
            end += 1
        same = image < len(entry.image_keys) and image < len(image_keys) and image_keys[image] is not None \
            and entry.image_keys[image] == image_keys[image]
        if end > n or not same:
            return i  # the prefix would split this image, or it is another picture of the same size
        image += 1
        i = end
    return n
