"""The prompt encoder and the mask decoder as TorchScript graphs, one per prompt layout (and one per kept output for
the mask): the same operations, without Python between them.

A click's sparse prompt embedding, transformer and IoU head (:meth:`MaskDecoder.decode_tokens`) are about 700 small
operations on a few prompt tokens and 256 image tokens; in eager mode the Python around each one (module calls, shape
arithmetic, argument parsing) is a large part of their time. :class:`TracedTokenDecoder` records the operations
once per layout (:func:`torch.jit.trace`) and replays them from C++: the same kernels in the same order, so the outputs
equal the eager ones bit for bit (``tests/test_traced_decoder.py``).

A layout is what the recorded graph fixes: the input shapes (prompt rows, prompt tokens) and which first-layer terms
the caller has (all of them, or only the positional encoding's layout after a mask prompt). Shape-dependent choices
made in Python (:meth:`Attention.folds`) are part of it. The graphs read the model's parameters where they are, so
weights copied into the model in place (a model swap) serve the next click; a new model object needs a new decoder.

Recording a layout takes about 0.25 s, so a click with a new layout is decoded eagerly while a background thread
records it for the next click: no click waits for a trace. The server's warm-up records the layouts of a first click
(one point, with and without the previous mask) and the mask graphs of every output on its own thread, so that the
recording, Python under the GIL, does not slow the first clicks. Replay runs without the graph executor's optimisation
passes (``torch.jit.optimized_execution(False)``, per thread), whose profiling runs would cost tens of milliseconds
on the first calls of every graph and gain nothing for these small operations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from lib.modeling import SamMed2D
from lib.modeling.mask_decoder import DecodedTokens, MaskDecoder
from lib.modeling.prompt_encoder import PromptEncoder

logger = logging.getLogger(__name__)

# The first-layer terms a caller passes (:meth:`TwoWayTransformer.first_layer_terms`), in the graphs' input order.
FIRST_LAYER_NAMES = ("keys", "key_pe", "t2i_k", "t2i_v", "i2t_q")
PROMPT_NAMES = ("point_coords", "point_labels", "boxes")
Layout = tuple


class _TokenGraph(nn.Module):
    """The prompt encoder's sparse embedding, then :meth:`MaskDecoder.decode_tokens`, with the prompts and first-layer
    terms named by ``names`` as positional inputs after ``src`` and ``image_pe``."""

    def __init__(self, prompt_encoder: PromptEncoder, decoder: MaskDecoder, names: tuple[str, ...]) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.decoder = decoder
        self.names = names

    def forward(
        self, src: torch.Tensor, image_pe: torch.Tensor, *inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        named = dict(zip(self.names, inputs))
        points = (named["point_coords"], named["point_labels"]) if "point_coords" in named else None
        sparse, _ = self.prompt_encoder(points, named.get("boxes"), None)
        terms = {name: named[name] for name in FIRST_LAYER_NAMES if name in named}
        decoded = self.decoder.decode_tokens(src, image_pe, sparse, terms)
        return decoded.mask_tokens, decoded.image_tokens, decoded.iou


class _MaskGraph(nn.Module):
    """:meth:`MaskDecoder.masks` of output ``index`` for one prompt row."""

    def __init__(self, decoder: MaskDecoder, index: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.index = index
        self.grid = grid

    def forward(self, mask_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        decoded = DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=self.grid, iou=mask_tokens)
        return self.decoder.masks(decoded, torch.tensor([self.index]))


def layout(kind: tuple, inputs: tuple[torch.Tensor, ...]) -> Layout:
    """What a recorded graph is specific to: ``kind`` (which prompts and terms are given, or which output's mask) and
    the shapes, dtype and device of every input."""
    return kind, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


class TracedTokenDecoder:
    """The prompt encoder's sparse embedding with :meth:`MaskDecoder.decode_tokens`, and :meth:`MaskDecoder.masks`,
    of ``model``, replayed from recorded graphs where one exists; where none does yet, the calls return ``None``
    and :func:`lib.serving.decoding.decode_rows` runs the eager modules (the one eager definition).

    Args:
        model: the served model, in eval mode; inference only (the graphs record no gradient).
        max_graphs: layouts kept (least recently used dropped); a prompt of ``n`` points is one layout per ``n``.
        background: record new layouts on a background thread at the lowest priority (the server); ``False``
            records on the calling thread before answering (tests, benchmarks).
    """

    def __init__(self, model: SamMed2D, max_graphs: int = 24, background: bool = True) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Layout, torch.jit.ScriptModule] = OrderedDict()
        self._pending: set[Layout] = set()
        self._lock = threading.Lock()
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder-trace") if background else None
        self._here = threading.local()
        self.recorded = 0

    @contextlib.contextmanager
    def recording_here(self) -> Iterator[None]:
        """Within the block, layouts new to this thread's calls are recorded on it before answering (the warm-up): the
        recording is Python under the GIL, which in the background slows the clicks of that moment."""
        outer = getattr(self._here, "active", False)
        self._here.active = True
        try:
            yield
        finally:
            self._here.active = outer

    def record_masks(self, grid: tuple[int, int]) -> None:
        """Record the mask graph of every output for one prompt row on a ``grid`` of image tokens, on this thread: a
        mask graph depends on the output kept, not on the prompt, so a few serve every click."""
        decoder = self.model.mask_decoder
        weight = decoder.mask_tokens.weight
        mask_tokens = weight.new_zeros(1, decoder.num_mask_tokens, decoder.transformer_dim)
        image_tokens = weight.new_zeros(1, grid[0] * grid[1], decoder.transformer_dim)
        decoded = DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=grid, iou=mask_tokens)
        with self.recording_here():
            for index in range(decoder.num_mask_tokens):
                self.masks(decoded, torch.tensor([index], device=weight.device))

    def __call__(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        first_layer: dict[str, torch.Tensor] | None = None,
    ) -> DecodedTokens | None:
        """What :meth:`MaskDecoder.decode_tokens` returns for these prompts, from the layout's graph; ``None`` while
        it has none (then the caller decodes eagerly). ``src`` ``(B or 1, C, h, w)``, ``image_pe`` ``(1, C, h, w)``,
        prompts as :func:`decode_rows` takes them (``(B, N, 2)``, ``(B, N)``, ``(B, 4)``), ``first_layer`` as
        :meth:`MaskDecoder.decode_tokens` takes it."""
        given = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, **(first_layer or {})}
        named = {name: given[name] for name in (*PROMPT_NAMES, *FIRST_LAYER_NAMES) if given.get(name) is not None}
        names, inputs = tuple(named), (src, image_pe, *named.values())
        model = self.model
        graph = self._graph(
            layout(names, inputs), lambda: _TokenGraph(model.prompt_encoder, model.mask_decoder, names), inputs
        )
        if graph is None:
            return None
        with torch.jit.optimized_execution(False):
            mask_tokens, image_tokens, iou = graph(*inputs)
        return DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=tuple(src.shape[2:]), iou=iou)

    def masks(self, decoded: DecodedTokens, outputs: torch.Tensor) -> torch.Tensor | None:
        """What :meth:`MaskDecoder.masks` returns for the kept ``outputs`` ``(B,)``, from the graph of that output
        (one prompt row, a click); ``None`` for several rows or while the graph is not recorded."""
        if decoded.mask_tokens.shape[0] != 1:
            return None
        decoder, index, grid = self.model.mask_decoder, int(outputs[0]), decoded.grid
        inputs = (decoded.mask_tokens, decoded.image_tokens)
        graph = self._graph(layout(("masks", index, grid), inputs), lambda: _MaskGraph(decoder, index, grid), inputs)
        if graph is None:
            return None
        with torch.jit.optimized_execution(False):
            return graph(*inputs)

    def _graph(
        self, key: Layout, make_module: Callable[[], nn.Module], inputs: tuple[torch.Tensor, ...]
    ) -> torch.jit.ScriptModule | None:
        """The recorded graph of ``key``, or ``None`` (then recording it is under way, or it failed)."""
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                return graph
            if key in self._pending:
                return None
            self._pending.add(key)
        if self._recorder is not None and not getattr(self._here, "active", False):
            self._recorder.submit(self._record, key, make_module, inputs)
            return None
        self._record(key, make_module, inputs)
        with self._lock:
            return self._graphs.get(key)

    def _record(self, key: Layout, make_module: Callable[[], nn.Module], inputs: tuple[torch.Tensor, ...]) -> None:
        if threading.current_thread().name.startswith("decoder-trace") and hasattr(os, "nice"):
            os.nice(19 - os.nice(0))  # Linux: per thread; a trace never takes a core from a click
        try:
            # Plain copies: tensors made in inference mode cannot be recorded outside it.
            with torch.no_grad(), warnings.catch_warnings():
                # The warnings name shape-dependent Python choices, which the layout key fixes.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.trace(make_module(), tuple(t.clone() for t in inputs), check_trace=False)
        except Exception:  # a layout that cannot be recorded keeps decoding eagerly
            logger.exception("Cannot record the decoder for layout %s; it stays eager", key)
            return
        with self._lock:
            self._pending.discard(key)
            self._graphs[key] = graph
            self.recorded += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)

    def __len__(self) -> int:
        """Layouts recorded and kept."""
        return len(self._graphs)

    def wait(self) -> None:
        """Wait until every layout asked for so far is recorded (tests)."""
        if self._recorder is not None:
            self._recorder.submit(lambda: None).result()
