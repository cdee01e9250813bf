"""Image-feature cache: vision-tower outputs keyed by the image content hash, LRU under a byte budget.

A hit returns the very tensor the miss stored (never recomputed, never copied), so a hit is
bit-identical to a miss and skips the vision tower entirely. Multi-turn chats about one image
(same resized pixels, same hash) pay for the tower once. The features live where the model
put them (the embedding device, model dtype); their bytes count against the budget.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageFeatureCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_queries = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_hash: str) -> bool:
        return image_hash in self._entries

    def get(self, image_hash: str) -> torch.Tensor | None:
        """Look up (and count) a query; a hit becomes the most recently used entry."""
        self.num_queries += 1
        features = self._entries.get(image_hash)
        if features is not None:
            self.num_hits += 1
            self._entries.move_to_end(image_hash)
        return features

    def put(self, image_hash: str, features: torch.Tensor) -> None:
        """Store features, evicting least recently used entries; too-large entries are not stored."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(image_hash, None)
        if old is not None:
            self.num_bytes -= old.numel() * old.element_size()
        while self._entries and self.num_bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.numel() * evicted.element_size()
        self._entries[image_hash] = features
        self.num_bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0
