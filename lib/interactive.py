"""The interactive segmentation engine behind the server: click, see a mask, click again.

One :class:`InteractiveSegmenter` serves every client of a worker. Per image view it encodes once and keeps, with
the embedding, everything that does not depend on the prompt (geometry, dense positional encoding, the no-mask dense
embedding and its sum with the image embedding), so a click costs only the prompt encoder, the two-way decoder and
the upsampling of one mask. It also keeps each client's last low-resolution mask per image, view and label, which is
the next click's mask prompt, as in the paper's interactive protocol. Nothing here imports the server.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .decoding import ServedDecoding, decode_view, prompt_independent_inputs, view_mask
from .embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingKey
from .image_source import ImageSource, fingerprint, read_image
from .limits import Limits
from .model_store import ModelStore
from .modeling import SamMed2D
from .preprocessing import preprocess_image
from .prompt_inputs import ViewPrompts

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Segmentation:
    """The answer to one click.

    Attributes:
        mask: ``(H, W)`` bool mask of the view (row ``y``, column ``x``).
        iou: predicted IoU of the kept mask.
        low_res: ``(1, 1, s, s)`` logits of the kept mask (the next click's mask prompt).
        source: the image the view belongs to.
        slice_index: the volume slice (``None`` for 2D images).
        embedding_cached: the image embedding came from the cache.
        used_previous_mask: the previous mask of this client was the mask prompt.
        multimask_output: whether three candidates were decoded.
        timings_ms: where the time went.
        model_version: the served weights' version.
    """

    mask: np.ndarray
    iou: float
    low_res: torch.Tensor
    source: ImageSource
    slice_index: int | None
    embedding_cached: bool
    used_previous_mask: bool
    multimask_output: bool
    timings_ms: dict[str, float]
    model_version: str


def release_freed_memory(collect: bool = True) -> None:
    """Give freed memory (a checkpoint's tensors, a replaced model, encoder activations) back to the system.

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in its heap; ``malloc_trim`` returns
    them, which keeps the server's resident memory near the model's own size. No-op where glibc is absent.
    """
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (``None``: unchanged), then restore."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _LRU:
    """A small thread-safe LRU mapping bounded by entry count and, with ``size_of``, by total size.

    The most recent entry is always kept, whatever its size: it is the one being worked on.
    """

    def __init__(self, max_entries: int, max_size: int = 0, size_of: Callable[[Any], int] | None = None) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self.size_of = size_of
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _over(self) -> bool:
        if len(self._items) > self.max_entries:
            return True
        if self.size_of is None or self.max_size <= 0 or len(self._items) < 2:
            return False
        return self.size() > self.max_size

    def size(self) -> int:
        return sum(self.size_of(v) for v in self._items.values()) if self.size_of is not None else 0

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while self._over():
                self._items.popitem(last=False)

    def pop(self, key: Any) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class InteractiveSegmenter:
    """Serves clicks on images for many clients, with the served weights of a :class:`ModelStore`.

    Args:
        store: where the served weights come from; :meth:`ModelStore.version_key` is checked on every click and the
            model reloaded when it changes (a newly published model serves the next click).
        device: torch device.
        decoding: how prompts become masks (:class:`lib.decoding.ServedDecoding`: preprocessing policy, multimask
            default, mask prompt form, threshold), the same rule the trainer validates with.
        cache_bytes: bound of the embedding cache.
        max_sources: loaded images kept in memory (volumes are the large ones).
        max_source_bytes: bound of the loaded images' pixels (the image being clicked is kept even when larger):
            a 512x512x600 CT is 315 MB, so a count alone does not bound memory.
        max_states: remembered previous masks (client, image, view, label).
        limits: request bounds; here the pixels of an image (checked from its header before it is decoded) and the
            bytes of the remembered previous masks (``state_mb``).
        decode_threads: intra-op threads for the per-click decoder (``None``: torch's setting). The decoder's
            operations are small: one thread avoids the synchronisation that makes several threads slow, very slow
            when other processes (a training run) share the cores.
        encode_threads: intra-op threads for the image encoder (``None``: torch's setting). OpenMP threads that
            wait for a descheduled sibling spin: on a busy machine two threads can take several times as long as one.
    """

    def __init__(
        self,
        store: ModelStore,
        device: str | torch.device = "cpu",
        decoding: ServedDecoding | None = None,
        cache_bytes: int = 256 * 2**20,
        max_sources: int = 4,
        max_source_bytes: int = 1024 * 2**20,
        max_states: int = 512,
        decode_threads: int | None = 1,
        encode_threads: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.decode_threads = decode_threads
        self.encode_threads = encode_threads
        self.store = store
        self.device = torch.device(device)
        self.decoding = decoding or ServedDecoding()
        self.cache = EmbeddingCache(cache_bytes)
        self._sources = _LRU(max_sources, max_source_bytes, lambda source: source.nbytes)
        self._states = _LRU(max_states, self.limits.state_bytes, _tensor_bytes)
        self._model: SamMed2D | None = None
        self._image_pe: torch.Tensor | None = None
        self._model_key: str | None = None
        self._failed_key: str | None = None
        self._lock = threading.RLock()  # the model swap, and each click's decode and interaction state
        # One encode at a time (an encode uses every core); held apart from the click lock so that clicks on views
        # already encoded never wait for another user's new image.
        self._encode_lock = threading.Lock()
        self.last_load_error: str | None = None

    # ------------------------------------------------------------------ model
    def model(self) -> tuple[SamMed2D, str]:
        """The served model, reloaded when the store's version key changed since the last call."""
        key = self.store.version_key()
        with self._lock:
            if self._model is not None and (key == self._model_key or key == self._failed_key):
                return self._model, self._model_key  # type: ignore[return-value]
            start = time.perf_counter()
            try:
                model = self.store.load(self.device)
            except Exception as exc:
                if self._model is None:
                    raise
                self._failed_key = key
                self.last_load_error = f"{self.store.serving_path()}: {exc}"
                logger.error("Cannot load new weights (%s); still serving %s", exc, self._model_key)
                return self._model, self._model_key  # type: ignore[return-value]
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            old = self._model_key
            with torch.inference_mode():
                self._image_pe = model.prompt_encoder.get_dense_pe()
            self._model, self._model_key, self._failed_key = model, key, None
            self.last_load_error = None
            self.cache.invalidate()
            self._states.clear()
            release_freed_memory()
            logger.info(
                "Serving weights %s (%s) on %s; loaded in %.2f s%s",
                self.store.active_version(),
                key,
                self.device,
                time.perf_counter() - start,
                f"; replaced {old}" if old else "",
            )
            return model, key

    def warm_up(self) -> None:
        """Load the model and run one encode and decode on a blank picture, so that one-time costs (kernel set-up,
        lazy imports) are paid at start and not by the first click. Nothing is cached."""
        import PIL.PngImagePlugin  # noqa: F401 (the label writer's PNG encoder)

        model, _ = self.model()
        size = model.config.image_size
        blank = np.zeros((size // 2, size // 2, 3), dtype=np.uint8)
        with torch.inference_mode():
            tensor, geometry = preprocess_image(
                blank, size, model.config.pixel_mean, model.config.pixel_std, self.decoding.policy, device=self.device
            )
            with torch_threads(self.encode_threads):
                entry = CachedEmbedding(model.encode(tensor), geometry)
            entry.extras.update(prompt_independent_inputs(model, entry.features, self._image_pe))
        point = ViewPrompts(
            point_coords=np.array([[1.0, 1.0]]),
            point_labels=np.array([1]),
            box=None,
            slice_index=None,
            multimask_output=True,
            window=None,
        )
        with torch_threads(self.decode_threads), torch.inference_mode():
            low_res, _ = self._decode(model, entry, point, None)
            self._decode(model, entry, point, low_res)
            view_mask(geometry, low_res, self.decoding)
        del entry, low_res
        release_freed_memory()

    # ----------------------------------------------------------------- images
    def source(self, path: str) -> tuple[ImageSource, bool]:
        """The loaded image at ``path`` (reloaded when its content changed) and whether it came from memory."""
        content = fingerprint(path)
        cached = self._sources.get(path)
        if cached is not None and cached.content == content:
            return cached, True
        source = read_image(path, self.limits)
        self._sources.put(path, source)
        return source, False

    def embedding(
        self, model: SamMed2D, model_key: str, source: ImageSource, prompts: ViewPrompts
    ) -> tuple[CachedEmbedding, EmbeddingKey, bool]:
        """The view's embedding with its prompt-independent decoder inputs, from the cache or computed now."""
        key = self.embedding_key(source, prompts, model_key)
        entry = self.cache.get(key)
        if entry is not None:
            return entry, key, True
        with self._encode_lock:
            entry = self.cache.get(key)
            if entry is not None:  # encoded by another request while this one waited
                return entry, key, True
            return self._encode(model, source, prompts, key), key, False

    def _encode(self, model: SamMed2D, source: ImageSource, prompts: ViewPrompts, key: EmbeddingKey) -> CachedEmbedding:
        """Encode the view, cache it with its prompt-independent decoder inputs."""
        cfg = model.config
        view = source.view(prompts.slice_index, prompts.window)
        with torch.inference_mode():
            tensor, geometry = preprocess_image(
                view, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, self.decoding.policy, device=self.device
            )
            with torch_threads(self.encode_threads):
                features = model.encode(tensor)
            extras = prompt_independent_inputs(model, features, self._image_pe)
        entry = CachedEmbedding(features=features, geometry=geometry, extras=extras)
        self.cache.put(key, entry)
        release_freed_memory(collect=False)  # the encoder's activations, so resident memory does not creep up
        return entry

    def embedding_key(self, source: ImageSource, prompts: ViewPrompts, model_key: str) -> EmbeddingKey:
        view = ""
        if source.is_volume:
            view = f"axis=2,slice={prompts.slice_index}"
        if source.needs_mapping:
            window = prompts.window or source.value_range
            view += f",window={window[0]:g}:{window[1]:g}"
        return EmbeddingKey(
            image=source.path,
            content=source.content,
            view=view,
            preprocessing=f"{self.decoding.policy}:{self.store.config.image_size}",
            model_version=model_key,
        )

    # ------------------------------------------------------------------ click
    def segment(
        self,
        path: str,
        prompts_for: Callable[[ImageSource], ViewPrompts],
        client_id: str = "",
        label: str = "",
        reset: bool = False,
    ) -> Segmentation:
        """Load (or reuse) the image at ``path``, check the prompts against it and segment (see :meth:`segment_view`).

        ``prompts_for`` turns the loaded image into checked prompts (see :func:`lib.prompt_inputs.parse_prompts`); it
        runs before any model work, so bad prompts fail fast.
        """
        t0 = time.perf_counter()
        source, _ = self.source(path)
        prompts = prompts_for(source)
        result = self.segment_view(source, prompts, client_id, label, reset)
        result.timings_ms["image"] = round((time.perf_counter() - t0) * 1000 - sum(result.timings_ms.values()), 3)
        return result

    def segment_view(
        self,
        source: ImageSource,
        prompts: ViewPrompts,
        client_id: str = "",
        label: str = "",
        reset: bool = False,
    ) -> Segmentation:
        """Segment the view of ``source`` that ``prompts`` are on.

        Args:
            source: a loaded image (from :meth:`source`).
            prompts: checked prompts in the view's pixels.
            client_id, label: whose interaction this is; the previous mask of the same client, image, view and label
                is the mask prompt unless ``reset``.
        """
        times: dict[str, float] = {}
        t = time.perf_counter()
        model, model_key = self.model()
        times["model"] = time.perf_counter() - t
        t = time.perf_counter()
        entry, key, cached = self.embedding(model, model_key, source, prompts)
        times["embed"] = time.perf_counter() - t
        with self._lock:
            state_key = (client_id, key, label)
            previous = None if reset else self._states.get(state_key)
            t = time.perf_counter()
            with torch_threads(self.decode_threads):
                low_res, iou = self._decode(model, entry, prompts, previous)
            times["decode"] = time.perf_counter() - t
            self._states.put(state_key, low_res)
        t = time.perf_counter()
        with torch.inference_mode(), torch_threads(self.decode_threads):
            mask = view_mask(entry.geometry, low_res, self.decoding)[0].cpu().numpy()
        times["upsample"] = time.perf_counter() - t
        return Segmentation(
            mask=mask,
            iou=float(iou),
            low_res=low_res,
            source=source,
            slice_index=prompts.slice_index,
            embedding_cached=cached,
            used_previous_mask=previous is not None,
            multimask_output=prompts.multimask_output,
            timings_ms={k: round(v * 1000, 3) for k, v in times.items()},
            model_version=self.store.active_version(),
        )

    def _decode(
        self, model: SamMed2D, entry: CachedEmbedding, prompts: ViewPrompts, previous: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (+ the previous logits) -> kept low-res logits ``(1, 1, s, s)`` and predicted IoU (scalar)."""
        with torch.inference_mode():
            low_res, iou = decode_view(
                model,
                entry,
                self.decoding,
                prompts.point_coords,
                prompts.point_labels,
                prompts.box,
                previous,
                prompts.multimask_output,
            )
        return low_res, iou[0]

    def stats(self) -> dict[str, Any]:
        return {
            "embedding_cache": self.cache.stats(),
            "images_in_memory": len(self._sources),
            "image_bytes_in_memory": self._sources.size(),
            "interaction_states": len(self._states),
            "device": str(self.device),
        }
