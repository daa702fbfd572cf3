"""The interactive segmentation engine behind the server: click, see a mask, click again.

One :class:`InteractiveSegmenter` serves every client of a worker. Per image view it encodes once and keeps, with
the embedding, everything that does not depend on the prompt (geometry, dense positional encoding, the no-mask dense
embedding and its sum with the image embedding), so a click costs only the prompt encoder, the two-way decoder and
the upsampling of one mask. It also keeps each client's last low-resolution mask per image, view and label, which is
the next click's mask prompt, as in the paper's interactive protocol. Nothing here imports the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from lib.common.lru import LruCache
from lib.common.memory import release_freed_memory
from lib.guard.limits import Limits
from lib.io.image_source import ImageSource, fingerprint, mapped_from_disk, read_image
from lib.modeling import SamMed2D
from lib.modeling.reduced_precision import PRECISIONS, cpu_has_native, set_encoder_precision
from lib.serving.decoder_graphs import DecoderGraphs
from lib.serving.decoding import ServedDecoding, decode_view, prompt_independent_inputs, view_mask
from lib.serving.embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingKey
from lib.serving.model_store import ModelStore
from lib.serving.onnx_backend import OnnxDecoder
from lib.serving.preprocessing import preprocess_image
from lib.serving.prompt_inputs import PropagationRequest, ViewPrompts
from lib.serving.propagation import SliceMask, Stop, VolumeLabel, propagate_direction

logger = logging.getLogger(__name__)
BACKENDS = ("torch", "onnxruntime")


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


@dataclasses.dataclass
class VolumeSegmentation:
    """The answer to a click with ``propagate``: the prompted slice's answer and the client's whole label.

    Attributes:
        first: the prompted slice's :class:`Segmentation`.
        label: ``(K, H, W)`` bool, every slice of the client's label of this volume (earlier corrections included).
        slices: one entry per non-empty slice of ``label``, by index: ``slice``, ``iou``, ``area``, ``source``
            (``user``: prompted by the annotator; ``propagated``) and ``updated`` (changed by this request).
        stops: why each direction walked stopped (:class:`lib.serving.propagation.Stop`).
        review_first: the propagated slice with the lowest predicted IoU, or ``None``.
        seconds_per_slice: wall time of the walk (encoding included) per propagated slice, or ``None``.
    """

    first: Segmentation
    label: np.ndarray
    slices: list[dict[str, Any]]
    stops: list[Stop]
    review_first: int | None
    seconds_per_slice: float | None


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


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class InteractiveSegmenter:
    """Serves clicks on images for many clients, with the served weights of a :class:`ModelStore`.

    Args:
        store: where the served weights come from; :meth:`ModelStore.version_key` is checked on every click and the
            model reloaded when it changes (a newly published model serves the next click).
        device: torch device.
        decoding: how prompts become masks (:class:`lib.serving.decoding.ServedDecoding`: preprocessing policy,
            multimask default, mask prompt form, threshold), the same rule the trainer validates with.
        cache_bytes: bound of the embedding cache.
        max_sources: loaded images kept for further clicks (volumes are the large ones: they are kept in unnamed
            temporary files, mapped, :func:`lib.io.image_source.mapped_from_disk`).
        max_source_bytes: bound of the loaded images' pixels (the image being clicked is kept even when larger):
            a 512x512x600 CT is 315 MB, so a count alone does not bound the memory and the disk they take.
        max_states: remembered previous masks (client, image, view, label).
        max_volume_labels: remembered propagated labels (client, image, window, label), also bounded by
            ``max_volume_bytes`` (bit-packed: a 512x512x300 label is 10 MB).
        limits: request bounds; here the pixels of an image (checked from its header before it is decoded) and the
            bytes of the remembered previous masks (``state_mb``).
        decode_threads: intra-op threads for the per-click decoder (``None``: torch's setting). The decoder's
            operations are small: one thread avoids the synchronisation that makes several threads slow, very slow
            when other processes (a training run) share the cores.
        encode_threads: intra-op threads for the image encoder (``None``: torch's setting). OpenMP threads that
            wait for a descheduled sibling spin: on a busy machine two threads can take several times as long as one.
        backend: ``torch``, or ``onnxruntime`` to run the prompt encoder + mask decoder with ONNX Runtime (CPU
            only; exported from the served weights when they load, :class:`lib.serving.onnx_backend.OnnxDecoder`). The
            decoding rule is the same (:mod:`lib.serving.decoding`) and the logits equal to about 1e-7; ONNX Runtime
            decodes a click in about two thirds of torch's time on one thread and holds about 0.1 GB more
            (``docs/benchmarks.md``).
        encoder_precision: ``fp32``, or the opt-in ``int8`` / ``bf16`` encoder of :mod:`lib.modeling.reduced_precision`.
        decoder_graphs: with the torch backend, replay each click's prompt encoder and decoder from graphs recorded
            per prompt kind (:class:`lib.serving.decoder_graphs.DecoderGraphs`: the eager logits bit for bit, 15-20%
            faster per click, for about 2 MB a prompt kind); ``False``: the eager modules.
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
        max_volume_labels: int = 32,
        max_volume_bytes: int = 256 * 2**20,
        decode_threads: int | None = 1,
        encode_threads: int | None = None,
        backend: str = "torch",
        encoder_precision: str = "fp32",
        limits: Limits | None = None,
        decoder_graphs: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        if encoder_precision not in PRECISIONS:
            raise ValueError(f"encoder precision must be one of {PRECISIONS}, got {encoder_precision!r}")
        if encoder_precision == "int8" and torch.device(device).type != "cpu":
            raise ValueError("encoder precision int8 runs on the CPU: use bf16 on a GPU")
        if encoder_precision != "fp32" and torch.device(device).type == "cpu" and not cpu_has_native(encoder_precision):
            # on an AVX2 EPYC: bf16 without AVX512-BF16/AMX was 22x slower than fp32, int8 without VNNI 1.29x faster
            logger.warning(
                f"encoder precision {encoder_precision}: this CPU has no native {encoder_precision} matrix products, "
                "so it can be slower than fp32 (bf16 is); `python -m benchmarks.bench_model` measures both"
            )
        self.encoder_precision = encoder_precision
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnxruntime" and torch.device(device).type != "cpu":
            raise ValueError("backend onnxruntime runs on the CPU: use device cpu, or backend torch on a GPU")
        self.backend = backend
        self._onnx_decoder: OnnxDecoder | None = None
        self.decoder_graphs = decoder_graphs and backend == "torch"
        self._graphs: DecoderGraphs | None = None
        self.decode_threads = decode_threads
        self.encode_threads = encode_threads
        self.store = store
        self.device = torch.device(device)
        self.decoding = decoding or ServedDecoding()
        self.cache = EmbeddingCache(cache_bytes)
        self._sources = LruCache(max_sources, max_source_bytes, lambda source: source.nbytes)
        self._states = LruCache(max_states, self.limits.state_bytes, _tensor_bytes)
        self._volumes = LruCache(max_volume_labels, max_volume_bytes, lambda label: label.nbytes)
        self._model: SamMed2D | None = None
        self._image_pe: torch.Tensor | None = None
        self._model_key: str | None = None
        self._failed_key: str | None = None
        self._lock = threading.RLock()  # the model swap, and each click's decode and interaction state
        # One encode at a time (an encode uses every core); held apart from the click lock so that clicks on views
        # already encoded never wait for another user's new image.
        self._encode_lock = threading.Lock()
        # The warm-up's and every click's encodes run on this one thread (started on the first): a thread that runs the
        # encoder keeps buffers of its own (MKL's, its OpenMP team's, a malloc arena) of about 20 MB for its whole life,
        # and the warm-up's thread and each request thread would each keep theirs.
        self._encoder_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self.last_load_error: str | None = None
        self._last_click = time.monotonic()

    # ------------------------------------------------------------------ model
    def model(self) -> tuple[SamMed2D, str]:
        """The served model, reloaded when the store's version key changed since the last call."""
        key = self.store.version_key()
        with self._lock:
            if self._model is not None and (key == self._model_key or key == self._failed_key):
                return self._model, self._model_key  # type: ignore[return-value]
            start = time.perf_counter()
            try:
                model = self._load_weights()
            except Exception as exc:
                if self._model is None:
                    raise
                self._failed_key = key
                self.last_load_error = f"{self.store.serving_path()}: {exc}"
                logger.error("Cannot load new weights (%s); still serving %s", exc, self._model_key)
                return self._model, self._model_key  # type: ignore[return-value]
            old = self._model_key
            with torch.inference_mode():
                self._image_pe = model.prompt_encoder.get_dense_pe()
            if self.backend == "onnxruntime":
                self._onnx_decoder = OnnxDecoder.from_model(model, threads=self.decode_threads or 1)
            if self.decoder_graphs and (self._graphs is None or self._graphs.model is not model):
                # Weights copied in place keep the recorded graphs (they read the parameters where they are); a new
                # model's graphs replace the old ones, which are freed with them.
                self._graphs = DecoderGraphs(model)
            self._model, self._model_key, self._failed_key = model, key, None
            self.last_load_error = None
            self.cache.invalidate()
            self._states.clear()
            self._volumes.clear()
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

    def _load_weights(self) -> SamMed2D:
        """The served weights, copied into the model already serving (fp32 or bf16 encoder: the copy rounds to the
        bf16 weights) or in a newly built model (int8: its quantised weights are made from an fp32 model).

        Copied in place (:meth:`ModelStore.load_into`), a swap holds the served model and one tensor of the new
        file: building a second model beside the first held up to three copies of the weights (3.3 GB for ViT-B).
        The encode lock keeps encodes from reading half-copied weights; a click that encoded its view before the
        copy decodes again (:meth:`segment_view`). Keys and shapes are checked before anything is copied, so a
        version that does not fit leaves the served weights as they were.
        """
        if self._model is not None and self.encoder_precision in ("fp32", "bf16"):
            with self._encode_lock:
                if self.store.load_into(self._model):
                    return self._model
        model = self.store.load(self.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        set_encoder_precision(model, self.encoder_precision)
        return model

    def encode(self, model: SamMed2D, images: torch.Tensor) -> torch.Tensor:
        """``model.encode(images)`` ``(B, 3, S, S) -> (B, C, h, w)`` on the segmenter's encoder thread, with
        ``encode_threads``; the caller holds the encode lock (an encode, :meth:`served_model`)."""

        def run() -> torch.Tensor:
            with torch.inference_mode(), torch_threads(self.encode_threads):
                return model.encode(images)

        return self._encoder_thread.submit(run).result()

    @contextlib.contextmanager
    def served_model(self) -> Iterator[SamMed2D]:
        """The served model, its weights unchanged for the block: for background work in the server process (scoring)
        that must not hold a second copy of the weights. The block waits for an encode in progress and holds encodes
        and swaps off until it ends, so keep it to one image; clicks on encoded views go on meanwhile. The block's
        own thread encodes (a long-lived one: see ``_encoder_thread``), at its own priority."""
        self.model()
        with self._encode_lock:
            yield self._model  # type: ignore[misc]

    def warm_up(self) -> None:
        """Load the model and run one encode and decode on a blank picture, so that one-time costs (kernel set-up,
        lazy imports) are paid at start and not by the first click. Nothing is cached."""
        model, _ = self.model()
        size = model.config.image_size
        blank = np.zeros((size // 2, size // 2, 3), dtype=np.uint8)
        with torch.inference_mode():
            tensor, geometry = preprocess_image(
                blank, size, model.config.pixel_mean, model.config.pixel_std, self.decoding.policy, device=self.device
            )
            with self._encode_lock:
                entry = CachedEmbedding(self.encode(model, tensor), geometry)
            entry.extras.update(self._decoder_inputs(model, entry.features))
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

    def _decoder_inputs(self, model: SamMed2D, features: torch.Tensor) -> dict[str, Any]:
        """What the decoder needs with ``features`` ``(1, C, h, w)`` whatever the prompt (a cache entry's extras)."""
        extras: dict[str, Any] = prompt_independent_inputs(model, features, self._image_pe)
        if self._onnx_decoder is not None:
            extras["onnx_decoder"] = self._onnx_decoder
        if self._graphs is not None:
            extras["decoder_graphs"] = self._graphs
        return extras

    # ----------------------------------------------------------------- images
    def source(self, path: str) -> tuple[ImageSource, bool]:
        """The loaded image at ``path`` (reloaded when its content changed) and whether it came from memory."""
        content = fingerprint(path)
        cached = self._sources.get(path)
        if cached is not None and cached.content == content:
            return cached, True
        source = mapped_from_disk(read_image(path, self.limits))
        self._sources.put(path, source)
        return source, False

    def embedding(
        self, model: SamMed2D, model_key: str, source: ImageSource, prompts: ViewPrompts
    ) -> tuple[CachedEmbedding, EmbeddingKey, bool]:
        """The view's embedding with its prompt-independent decoder inputs, from the cache or computed now."""
        return self.embed_views(model, model_key, source, [prompts.slice_index], prompts.window)[0]

    def embed_views(
        self,
        model: SamMed2D,
        model_key: str,
        source: ImageSource,
        slices: Sequence[int | None],
        window: tuple[float, float] | None,
    ) -> list[tuple[CachedEmbedding, EmbeddingKey, bool]]:
        """The embeddings of several views of ``source`` (slices of a volume; ``[None]`` for a 2D image), in order,
        with whether each came from the cache. The missing ones are encoded in one batch: on 2 CPU cores a batch of
        four ViT-B views takes about 0.6 of the time of four single ones."""
        keys = [self._view_key(source, k, window, model_key) for k in slices]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            with self._encode_lock:  # one encode at a time; clicks on encoded views do not wait for it
                found = [entry or self.cache.get(key) for entry, key in zip(found, keys, strict=True)]
                missing = [i for i, entry in enumerate(found) if entry is None]  # some encoded while this one waited
                if missing:
                    self._encode_views(model, source, slices, window, keys, found, missing)
        return [(entry, key, i not in missing) for i, (entry, key) in enumerate(zip(found, keys, strict=True))]

    def _encode_views(
        self,
        model: SamMed2D,
        source: ImageSource,
        slices: Sequence[int | None],
        window: tuple[float, float] | None,
        keys: list[EmbeddingKey],
        found: list[CachedEmbedding | None],
        missing: list[int],
    ) -> None:
        """Encode the ``missing`` views in one batch, cache them and fill them into ``found``."""
        cfg = model.config
        with torch.inference_mode():
            inputs = [
                preprocess_image(
                    source.view(slices[i], window),
                    cfg.image_size,
                    cfg.pixel_mean,
                    cfg.pixel_std,
                    self.decoding.policy,
                    device=self.device,
                )
                for i in missing
            ]
            features = self.encode(model, torch.cat([tensor for tensor, _ in inputs]))
            for row, (i, (_, geometry)) in enumerate(zip(missing, inputs, strict=True)):
                view_features = features[row : row + 1].clone()  # its own storage, so the cache sizes it alone
                extras = self._decoder_inputs(model, view_features)
                found[i] = CachedEmbedding(features=view_features, geometry=geometry, extras=extras)
                self.cache.put(keys[i], found[i])
        del features
        release_freed_memory(collect=False)  # the encoder's activations, so resident memory does not creep up

    def embedding_key(self, source: ImageSource, prompts: ViewPrompts, model_key: str) -> EmbeddingKey:
        return self._view_key(source, prompts.slice_index, prompts.window, model_key)

    def _view_key(
        self, source: ImageSource, slice_index: int | None, window: tuple[float, float] | None, model_key: str
    ) -> EmbeddingKey:
        view = ""
        if source.is_volume:
            view = f"axis=2,slice={slice_index}"
        if source.needs_mapping:
            window = window or source.value_range
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

        ``prompts_for`` turns the loaded image into checked prompts (see
        :func:`lib.serving.prompt_inputs.parse_prompts`); it runs before any model work, so bad prompts fail fast.
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
        self._last_click = time.monotonic()
        times: dict[str, float] = {}
        t = time.perf_counter()
        model, model_key = self.model()
        times["model"] = time.perf_counter() - t
        t = time.perf_counter()
        entry, key, cached = self.embedding(model, model_key, source, prompts)
        times["embed"] = time.perf_counter() - t
        with self._lock:
            if model_key != self._model_key:  # new weights were copied into the model while this view was encoded
                return self.segment_view(source, prompts, client_id, label, reset)
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

    def segment_volume(
        self,
        source: ImageSource,
        prompts: ViewPrompts,
        propagation: PropagationRequest,
        client_id: str = "",
        label: str = "",
        reset: bool = False,
    ) -> VolumeSegmentation:
        """Segment the prompted slice of a volume (as :meth:`segment_view`), then carry the mask outward.

        The client's label of this volume (per ``client_id``, image, window and ``label``) remembers every slice the
        annotator prompted with ``propagate``; a new prompt on slice ``k`` replaces ``k`` and re-propagates from it
        outward in the asked directions, each walk stopping before a slice prompted earlier, so earlier corrections
        stay. ``reset`` starts a new label. Each propagated slice's logits become that slice's previous mask, so a
        correcting click there refines what the annotator sees.
        """
        first = self.segment_view(source, prompts, client_id, label, reset)
        start = SliceMask(prompts.slice_index, first.mask, first.low_res, first.iou)  # type: ignore[arg-type]
        started = time.perf_counter()
        with self._lock:
            model, model_key = self.model()
            volume_key = (client_id, label, source.path, source.content, prompts.window, model_key)
            volume = None if reset else self._volumes.get(volume_key)
            volume = volume if volume is not None else VolumeLabel(source.view_hw)
            volume.put(start, "user")
            updated = {start.index}
            stops: list[Stop] = []

            def embed(slices: Sequence[int]) -> list[CachedEmbedding]:
                return [e for e, _, _ in self.embed_views(model, model_key, source, slices, prompts.window)]

            for step in propagation.steps:
                blocked = volume.user_slices() - {start.index}
                with torch_threads(self.decode_threads):
                    kept, stop = propagate_direction(
                        model, self.decoding, embed, start, step, source.num_slices, propagation, blocked
                    )
                volume.replace_direction(start.index, step, kept)
                stops.append(stop)
                for result in kept:
                    updated.add(result.index)
                    view_key = self._view_key(source, result.index, prompts.window, model_key)
                    self._states.put((client_id, view_key, label), result.low_res)
            self._volumes.put(volume_key, volume)
        walked = len(updated) - 1
        elapsed = time.perf_counter() - started
        slices = [
            {"slice": k, "iou": round(r.iou, 6), "area": r.area, "source": r.source, "updated": k in updated}
            for k, r in sorted(volume.slices.items())
        ]
        return VolumeSegmentation(
            first=first,
            label=volume.stack(source.num_slices),
            slices=slices,
            stops=stops,
            review_first=volume.review_first(),
            seconds_per_slice=round(elapsed / walked, 4) if walked else None,
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

    def idle_seconds(self) -> float:
        """Seconds since the last click began (since start before the first): background work waits for idle."""
        return time.monotonic() - self._last_click

    def stats(self) -> dict[str, Any]:
        return {
            "embedding_cache": self.cache.stats(),
            "images_in_memory": len(self._sources),
            "image_bytes_in_memory": self._sources.size,
            "interaction_states": len(self._states),
            "volume_labels": len(self._volumes),
            "device": str(self.device),
        }
