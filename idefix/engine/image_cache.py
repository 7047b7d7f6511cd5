"""Encoded image features keyed by image content, LRU bounded in bytes.

The same picture sent again (the next turn of a chat, another user) skips the vision tower.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageFeatureCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> torch.Tensor | None:
        features = self.entries.get(digest)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(digest)
        return features

    def put(self, digest: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or digest in self.entries:
            return
        self.entries[digest] = features
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
