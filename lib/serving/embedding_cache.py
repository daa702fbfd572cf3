"""A bounded, thread-safe LRU cache of image embeddings for the server.

Keys carry everything an embedding depends on: which image and which version of its content, which slice (and
intensity window) of a volume, which preprocessing, and which model version. Anything that changes one of those
gives a different key, so a stale embedding is never returned.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class EmbeddingKey:
    """Identity of one embedding.

    Attributes:
        image: the image id (datastore id or path).
        content: fingerprint of the image content (for files: size and mtime in ns, or a digest).
        view: which 2D view of the image (``""`` for 2D images; e.g. ``"axis=2,slice=14,window=-160:240"``).
        preprocessing: preprocessing policy and model input size.
        model_version: identity of the weights (e.g. the checkpoint's path, mtime and adapter switch).
    """

    image: str
    content: str
    view: str
    preprocessing: str
    model_version: str


@dataclasses.dataclass
class CachedEmbedding:
    """An encoder output and what the decoder needs with it; ``extras`` may hold prompt-independent tensors."""

    features: torch.Tensor
    geometry: Any
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [self.features, *(v for v in self.extras.values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)


class EmbeddingCache:
    """Least-recently-used cache bounded by the bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[EmbeddingKey, CachedEmbedding] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: EmbeddingKey) -> CachedEmbedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: EmbeddingKey, entry: CachedEmbedding) -> None:
        """Insert (or replace) an entry, evicting the least recently used ones to stay within ``max_bytes``.

        An entry larger than the whole cache is not stored.
        """
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[key] = entry
            self._bytes += size

    def invalidate(self, image: str | None = None) -> None:
        """Drop every entry (or those of one image)."""
        with self._lock:
            for key in [k for k in self._entries if image is None or k.image == image]:
                self._bytes -= self._entries.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
