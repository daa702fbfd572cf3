"""A bounded, thread-safe LRU cache of image embeddings for the server.

Keys carry everything an embedding depends on: which image and which version of its content, which slice (and
intensity window) of a volume, which preprocessing, and which model version. Anything that changes one of those
gives a different key, so a stale embedding is never returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lib.common.lru import LruCache


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
    """Least-recently-used cache of embeddings bounded by the bytes of the tensors it holds; an entry larger than the
    whole cache is not stored."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._lru: LruCache[EmbeddingKey, CachedEmbedding] = LruCache(
            max_size=max_bytes, size_of=lambda entry: entry.nbytes, keep_newest=False
        )

    def get(self, key: EmbeddingKey) -> CachedEmbedding | None:
        return self._lru.get(key)

    def put(self, key: EmbeddingKey, entry: CachedEmbedding) -> None:
        """Insert (or replace) an entry, evicting the least recently used ones to stay within ``max_bytes``."""
        self._lru.put(key, entry)

    def invalidate(self, image: str | None = None) -> None:
        """Drop every entry (or those of one image)."""
        self._lru.remove_where(lambda key: image is None or key.image == image)

    @property
    def nbytes(self) -> int:
        return self._lru.size

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        lru = self._lru
        return {
            "entries": len(lru),
            "bytes": lru.size,
            "max_bytes": self.max_bytes,
            "hits": lru.hits,
            "misses": lru.misses,
        }
