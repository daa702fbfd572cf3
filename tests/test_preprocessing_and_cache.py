"""Frame geometry of both policies and the embedding cache's bounds and keys."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lib.common.lru import LruCache
from lib.serving.embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingKey
from lib.serving.preprocessing import frame_geometry, preprocess_image


def test_small_image_is_padded_only_under_the_evaluation_policy():
    geometry = frame_geometry((155, 225), 256, "evaluation")
    assert geometry.padded and (geometry.top, geometry.left) == (50, 15)
    np.testing.assert_allclose(geometry.points_to_input(np.array([[10.0, 20.0]])), [[25.0, 70.0]])
    resized = frame_geometry((155, 225), 256, "predictor")
    assert not resized.padded
    np.testing.assert_allclose(resized.points_to_input(np.array([[225.0, 155.0]])), [[256.0, 256.0]])
    assert not frame_geometry((155, 300), 256, "evaluation").padded


def test_masks_return_to_the_original_frame():
    for policy in ("evaluation", "predictor"):
        geometry = frame_geometry((100, 140), 256, policy)
        masks = geometry.masks_to_original(torch.zeros(2, 1, 64, 64))
        assert masks.shape == (2, 1, 100, 140)


def test_grey_and_rgba_inputs_are_accepted():
    grey = np.full((40, 50), 100, np.uint8)
    a, _ = preprocess_image(grey, 256, (0, 0, 0), (1, 1, 1))
    b, _ = preprocess_image(np.dstack([grey] * 3 + [np.zeros_like(grey)]), 256, (0, 0, 0), (1, 1, 1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected an"):
        preprocess_image(np.zeros((4, 4, 2), np.uint8), 256, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="unknown preprocessing policy"):
        preprocess_image(grey, 256, (0, 0, 0), (1, 1, 1), policy="other")


def _entry(n_floats: int) -> CachedEmbedding:
    return CachedEmbedding(features=torch.zeros(n_floats), geometry=None)


def _key(image: str, **changes) -> EmbeddingKey:
    fields = dict(image=image, content="c1", view="", preprocessing="evaluation", model_version="v1")
    fields.update(changes)
    return EmbeddingKey(**fields)


def test_cache_is_bounded_by_bytes_and_least_recently_used():
    cache = EmbeddingCache(max_bytes=3 * 400)
    for name in "abc":
        cache.put(_key(name), _entry(100))
    assert cache.get(_key("a")) is not None  # a becomes most recent
    cache.put(_key("d"), _entry(100))
    assert cache.get(_key("b")) is None and cache.get(_key("a")) is not None
    assert cache.nbytes == 1200 and len(cache) == 3
    cache.put(_key("huge"), _entry(1000))
    assert cache.get(_key("huge")) is None and len(cache) == 3


@pytest.mark.parametrize("field", ["content", "view", "preprocessing", "model_version"])
def test_any_change_of_what_an_embedding_depends_on_misses(field):
    cache = EmbeddingCache(max_bytes=10_000)
    cache.put(_key("a"), _entry(10))
    assert cache.get(_key("a", **{field: "changed"})) is None
    assert cache.get(_key("a")) is not None


def test_cache_is_thread_safe():
    cache = EmbeddingCache(max_bytes=50 * 40)

    def worker(offset: int) -> None:
        for i in range(500):
            cache.put(_key(f"{offset}-{i % 70}"), _entry(10))
            cache.get(_key(f"{offset}-{(i * 7) % 70}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == len(cache) * _entry(10).nbytes <= cache.max_bytes  # all entries are the same size
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 2000


def test_lru_bounds_count_and_size_and_keeps_what_is_used():
    lru: LruCache[str, bytes] = LruCache(max_entries=3, max_size=10, size_of=len)
    for key in "abc":
        lru.put(key, b"xx")
    assert lru.get("a") == b"xx"  # now the most recent: "b" is the oldest
    lru.put("d", b"xx")
    assert lru.get("b") is None and len(lru) == 3 and lru.size == 6
    lru.put("e", b"x" * 8)  # over the size bound: evicts from the oldest until it fits
    assert [k for k in "acde" if lru.get(k) is not None] == ["d", "e"] and lru.size == 10
    lru.put("f", b"x" * 20)  # the newest stays even alone over the bound (it is the one being worked on)
    assert lru.get("f") is not None and len(lru) == 1
    strict: LruCache[str, bytes] = LruCache(max_size=10, size_of=len, keep_newest=False)
    strict.put("g", b"x" * 20)
    assert len(strict) == 0 and strict.size == 0
