"""A click's prompt encoder and mask decoder replayed from TorchScript graphs: the same operations as the eager
modules, without the Python between them (the server's opt-in ``--conf decoder_graphs true``).

A click is about 230 small operations (a few prompt tokens against 256 image tokens); in eager mode the Python around
each one (module calls, argument parsing, shape arithmetic) is 10-25% of the click. :class:`DecoderGraphs`
records them once per prompt layout with :func:`torch.jit.trace` and replays them from C++: the same kernels in the
same order, so the logits equal the eager ones bit for bit (``tests/test_decoder_graphs.py``) and the trainer's
validation still measures what the server serves.

Two graphs serve a click, because the kept output is chosen by the predicted IoUs between them:

* the *tokens* graph of a layout, :func:`lib.serving.decoding.decode_prompt_tokens` (the mask prompt's first-layer
  terms, the sparse prompt embedding, the transformer and the IoU head). A layout fixes which prompts are given and
  every input's shape, so the shape-dependent choices made in Python (:meth:`Attention.folds`) are part of it;
* the *mask* graph of the kept output, :meth:`MaskDecoder.masks` for that output (one per output and grid).

What the graphs read: the per-image terms and the prompts are inputs, and so are the decoder MLPs' packed weights
(:class:`~lib.modeling.onednn_linear.PackedLinear`: an opaque oneDNN tensor cannot be a recorded constant, and the copy
is re-packed when the weight changes). The other weights are read where they are, so weights copied into the model in
place (a model swap) serve the next click; a new model object needs new graphs.

Memory: TorchScript keeps about 5-8 KB per recorded operation for the life of the process (each node's source range
holds the Python stack it was recorded under, and PyTorch never frees a traced graph: pytorch/pytorch#35600, #86537),
about 8 MB per tokens graph of a click's ~970 nodes. So the layouts are recorded on a thread of their own (a shallow
stack), at most ``max_layouts`` of them per model, never evicted and re-recorded; further layouts decode eagerly.
Recording a layout takes about 25-50 ms, once, on the click that first uses it.

Measured (``docs/benchmarks.md``): 10-25% off a click in one process at two threads (the decoder at 1.9-2.4x the
published code, against 1.5-1.9x eager), but through REST, where the server decodes on one thread and a click is
mostly outside the model, within the runs' noise, for about 35-40 MB more resident memory. Hence opt-in.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from lib.modeling import SamMed2D
from lib.modeling.mask_decoder import DecodedTokens
from lib.modeling.onednn_linear import PackedLinear, onednn_available
from lib.serving.decoding import decode_prompt_tokens

logger = logging.getLogger(__name__)

# The first-layer terms of an encoded image (:meth:`TwoWayTransformer.first_layer_terms`), in the graphs' input order.
FIRST_LAYER_NAMES = ("keys", "key_pe", "t2i_k", "t2i_v", "i2t_q")
PROMPT_NAMES = ("point_coords", "point_labels", "boxes", "mask_input")

Layout = tuple


def layout(kind: tuple, inputs: tuple[torch.Tensor, ...]) -> Layout:
    """What a recorded graph is specific to: ``kind`` (which inputs are given, or which output's mask) and the shape,
    dtype and device of every input."""
    return kind, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


class DecoderGraphs:
    """The recorded decoder graphs of one model, for clicks (one prompt row); inference only.

    :func:`lib.serving.decoding.decode_rows` asks :meth:`decode_tokens` and :meth:`masks` first and runs the eager
    modules where they return ``None`` (several prompt rows, a layout past ``max_layouts``, one that failed to record).

    Args:
        model: the served model, in eval mode, its parameters without gradients.
        max_layouts: tokens graphs recorded at most (a prompt of ``n`` points is a layout per ``n``, with or without a
            box and a previous mask); the mask graphs, one per output, come on top.
        recorder: the single thread that records (the server's encoder thread: a thread of its own keeps a malloc
            arena and buffers of its own, about 20 MB). ``None``: a thread of this object's, with one intra-op thread.
    """

    def __init__(self, model: SamMed2D, max_layouts: int = 6, recorder: Executor | None = None) -> None:
        self.model = model
        self.max_layouts = max_layouts
        # The packed copies exist where the products run in oneDNN (CPU); elsewhere the graphs read the weights.
        on_cpu = model.mask_decoder.mask_tokens.weight.device.type == "cpu"
        packed = on_cpu and onednn_available()
        self._packed_layers = [m for m in model.mask_decoder.modules() if isinstance(m, PackedLinear)] if packed else []
        self._graphs: dict[Layout, torch.jit.ScriptFunction | None] = {}
        self._layouts = 0
        self._lock = threading.Lock()
        self._recorder = recorder

    def decode_tokens(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        first_layer: dict[str, torch.Tensor],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> DecodedTokens | None:
        """:func:`lib.serving.decoding.decode_prompt_tokens` of these inputs from the layout's graph (recorded now if
        new), or ``None``: then the caller decodes eagerly."""
        prompt = next((t for t in (point_coords, boxes, mask_input) if t is not None), None)
        if prompt is None or prompt.shape[0] != 1 or not all(name in first_layer for name in FIRST_LAYER_NAMES):
            return None
        given = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        names = tuple(name for name in PROMPT_NAMES if given[name] is not None)
        inputs = (src, image_pe, *(given[n] for n in names), *(first_layer[n] for n in FIRST_LAYER_NAMES))
        model = self.model

        def tokens(src, image_pe, *rest):  # noqa: ANN001, ANN202 (traced)
            prompts = dict(zip(names, rest))
            terms = dict(zip(FIRST_LAYER_NAMES, rest[len(names) : len(names) + len(FIRST_LAYER_NAMES)]))
            decoded = decode_prompt_tokens(model, src, image_pe, terms, *(prompts.get(n) for n in PROMPT_NAMES))
            return decoded.mask_tokens, decoded.image_tokens, decoded.iou

        packed = self._packed_weights()
        graph = self._graph(layout(("tokens", names), inputs), tokens, inputs, packed, counts_as_layout=True)
        if graph is None:
            return None
        with torch.jit.optimized_execution(False):
            mask_tokens, image_tokens, iou = graph(*inputs, *packed)
        return DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=tuple(src.shape[2:]), iou=iou)

    def masks(self, decoded: DecodedTokens, outputs: torch.Tensor) -> torch.Tensor | None:
        """:meth:`MaskDecoder.masks` of the kept ``outputs`` ``(1,)`` from that output's graph, or ``None`` (several
        rows, or a graph that failed to record)."""
        if decoded.mask_tokens.shape[0] != 1:
            return None
        decoder, index, grid = self.model.mask_decoder, int(outputs[0]), decoded.grid
        inputs = (decoded.mask_tokens, decoded.image_tokens)

        def mask(mask_tokens, image_tokens):  # noqa: ANN001, ANN202 (traced)
            tokens = DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=grid, iou=mask_tokens)
            return decoder.masks(tokens, torch.tensor([index]))

        # The masks read no packed weight (the up-scaling's products take the plain ones).
        graph = self._graph(layout(("mask", index, grid), inputs), mask, inputs, [], counts_as_layout=False)
        if graph is None:
            return None
        with torch.jit.optimized_execution(False):
            return graph(*inputs)

    def __len__(self) -> int:
        """Graphs recorded."""
        return sum(graph is not None for graph in self._graphs.values())

    def _packed_weights(self) -> list[torch.Tensor]:
        return [layer.onednn_weight() for layer in self._packed_layers]

    def _graph(
        self,
        key: Layout,
        fn: Callable,
        inputs: tuple[torch.Tensor, ...],
        weights: list[torch.Tensor],
        counts_as_layout: bool,
    ) -> torch.jit.ScriptFunction | None:
        """The graph of ``key`` (``fn`` of ``inputs``, then ``weights`` as inputs too), recorded now when it is new and
        within the bound; ``None`` where there is none."""
        with self._lock:
            if key in self._graphs:
                return self._graphs[key]
            if counts_as_layout and self._layouts >= self.max_layouts:
                return None
            self._layouts += counts_as_layout
            if self._recorder is None:
                # One intra-op thread: a new thread whose operations fork an OpenMP team of its own makes libgomp
                # throttle every team's spinning (more threads than cores), and the other threads' products ran 2x
                # slower from then on. The count is the thread's own (torch.set_num_threads is per thread).
                self._recorder = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="decoder-graphs", initializer=torch.set_num_threads, initargs=(1,)
                )
            start = time.perf_counter()
            self._graphs[key] = graph = self._recorder.submit(self._record, key, fn, inputs, weights).result()
            if graph is not None:
                logger.info(
                    "Recorded the decoder graph of %s in %.0f ms (%d of %d prompt layouts)",
                    key[0],
                    1000 * (time.perf_counter() - start),
                    self._layouts,
                    self.max_layouts,
                )
            return graph

    def _record(
        self, key: Layout, fn: Callable, inputs: tuple[torch.Tensor, ...], weights: list[torch.Tensor]
    ) -> torch.jit.ScriptFunction | None:
        def traced(*args):  # noqa: ANN002, ANN202 (traced): the packed weights come last, as inputs
            return fn(*args[: len(inputs)])

        try:
            with torch.inference_mode(), warnings.catch_warnings():
                # The warnings name the shape-dependent Python choices, which the layout fixes.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return torch.jit.trace(traced, (*inputs, *weights), check_trace=False)
        except Exception:  # a layout that cannot be recorded decodes eagerly
            logger.exception("Cannot record the decoder graph of %s; it decodes eagerly", key[0])
            return None
