"""Keep the vision tower's output per stored image, so a picture seen again is not encoded again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

Encoded = tuple[torch.Tensor, tuple[torch.Tensor, ...]]  # one image's embeddings and its deepstack features


class VisionCache:
    """An LRU of per-image vision outputs, bounded in bytes, keyed by the stored image's id and patch grid.

    Stored image ids are derived from (tenant, sha256), so one tenant's entry never answers another's image.
    Images without a key (none arrive that way from jobs) are always encoded.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[Encoded, int]] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, model: Any, pixel_values: torch.Tensor, grids: torch.Tensor,
               keys: Sequence[str | None]) -> Any:
        """Return the vision outputs of these images (in order) in the shape the model takes as
        ``mm_encoder_outputs["image"]``, running the tower only on the images not cached."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        pieces = torch.split(pixel_values, grids.prod(-1).tolist())
        wanted = [None if k is None else (k, tuple(g.tolist())) for k, g in zip(keys, grids, strict=True)]
        found: list[Encoded | None] = [self._get(key) for key in wanted]
        # One run of the tower per distinct missing image: a batch asking several questions of one picture
        # encodes it once, even when those questions are prefilled together.
        group = [key if key is not None and self.max_bytes > 0 else i for i, key in enumerate(wanted)]
        first: dict[tuple | int, int] = {}
        for i, hit in enumerate(found):
            if hit is None:
                first.setdefault(group[i], i)
        self.misses += len(first)
        self.hits += len(found) - len(first)
        if first:
            todo = sorted(first.values())
            out = model.model.get_image_features(torch.cat([pieces[i] for i in todo]), grids[todo],
                                                 return_dict=True)
            computed = {i: (out.pooler_output[j], tuple(layer[j] for layer in out.deepstack_features))
                        for j, i in enumerate(todo)}
            for i in todo:
                self._put(wanted[i], computed[i])
            for i, hit in enumerate(found):
                if hit is None:
                    found[i] = computed[first[group[i]]]
        done = [hit for hit in found if hit is not None]
        embeds = tuple(e for e, _ in done)
        deepstack = [tuple(features[n] for _, features in done) for n in range(len(done[0][1]) if done else 0)]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=embeds, deepstack_features=deepstack)

    def clear(self) -> None:
        """Forget every entry (after a device fault the tensors may be unusable)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _get(self, key: tuple | None) -> Encoded | None:
        """Return a cached entry and mark it recently used."""
        if key is None or self.max_bytes <= 0:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def _put(self, key: tuple | None, encoded: Encoded) -> None:
        """Store an entry, evicting the least recently used ones beyond the byte budget."""
        size = sum(t.numel() * t.element_size() for t in (encoded[0], *encoded[1]))
        if key is None or size > self.max_bytes:
            return
        # The tower's outputs are views of one tensor per call: keep copies, or an entry would hold every image
        # of its call (and the byte count would lie).
        encoded = (encoded[0].clone(), tuple(t.clone() for t in encoded[1]))
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (encoded, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
