"""A click's prompt encoder and mask decoder replayed from TorchScript graphs: the same operations as the eager
modules, without the Python between them (the server's default; ``--conf decoder_graphs false`` runs the eager
modules).

A click is about 230 small operations (a few prompt tokens against 256 image tokens); in eager mode the Python around
each one (module calls, argument parsing, shape arithmetic) is 10-25% of the click. :class:`DecoderGraphs`
records them once with the tracer and replays them from C++: the same kernels in the same order, so the logits equal
the eager ones bit for bit (``tests/test_decoder_graphs.py``) and the trainer's validation still measures what the
server serves.

Two graphs serve a click, because the kept output is chosen by the predicted IoUs between them:

* the *tokens* graph of a prompt kind, :func:`lib.serving.decoding.decode_prompt_tokens` (the mask prompt's
  first-layer terms, the sparse prompt embedding, the transformer and the IoU head). A kind fixes which prompts are
  given (points, a box, a previous mask) and the shapes of everything but the number of points: the tracer records
  the shape arithmetic, so one graph serves a growing number of clicks, where the Python choices that depend on it
  (:meth:`Attention.folds`, the oneDNN size threshold) come out the same. Whether they do is not assumed: a number
  of points the kind's graphs have not met decodes eagerly, and when it comes again the eager decoder runs with the
  graphs, and a graph serves that number only if it gave the eager result bit for bit (a click of 10 points on a
  graph recorded with 1 does not: the attention is not folded there), otherwise a graph is recorded for it. Checking
  only numbers seen before keeps a series of corrections, one point more each, at the eager decoder's cost: checking
  each on first sight cost an eager decoding and a replay per click (p50 28 against 16 ms through REST over 60 such
  clicks, and 43 MB of growth);
* the *mask* graph of the kept output, :meth:`MaskDecoder.masks` for that output (one per output).

What the graphs read: the per-image terms and the prompts are inputs, and so are the decoder MLPs' packed weights where
the products read them (:class:`~lib.modeling.onednn_linear.PackedLinear`: an opaque oneDNN tensor cannot be a recorded
constant, and the copy is re-packed when the weight changes; where the products run in MKL, on Intel processors, no copy
is made) and every other weight the tracer met (:func:`compact`), read where it is: weights copied into the model in
place (a model swap) serve the next click; a new model object needs new graphs.

Memory: ``torch.jit.trace`` keeps every graph it makes for the life of the process (pytorch/pytorch#35600, #86537),
and a graph of a click's ~1000 nodes holds several MB. So graphs are recorded with the tracer alone and each is
compiled in a compilation unit of its own: it is freed with its :class:`RecordedGraph`, and at most ``max_graphs``
tokens graphs are kept, the least recently used dropped first. A kept tokens graph and its mask graph hold about 2 MB,
and the tracer's garbage is trimmed after each recording (``docs/benchmarks.md``). Recording takes about 80-110 ms, on
the click that first needs it (the server's warm-up records a point and a point with the previous mask); checking a
graph on a new number of points costs one eager decoding.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
import time
import warnings
from collections.abc import Callable

import torch

from lib.common.memory import release_freed_memory
from lib.modeling import SamMed2D
from lib.modeling.mask_decoder import DecodedTokens
from lib.modeling.onednn_linear import PackedLinear, onednn_available
from lib.serving.decoding import MASK_TOKEN_WEIGHTS, decode_prompt_tokens

logger = logging.getLogger(__name__)

# The first-layer terms of an encoded image (:meth:`TwoWayTransformer.first_layer_terms`), in the graphs' input order.
FIRST_LAYER_NAMES = ("keys", "key_pe", "t2i_k", "t2i_v", "i2t_q", "mask_base", "mask_weight", *MASK_TOKEN_WEIGHTS)
PROMPT_NAMES = ("point_coords", "point_labels", "boxes", "mask_input")
# Inputs whose second dimension is the number of points: a tokens graph is not specific to it.
POINT_INPUTS = ("point_coords", "point_labels")

Layout = tuple


def layout(kind: tuple, inputs: dict[str, torch.Tensor]) -> Layout:
    """What a recorded graph is specific to: ``kind`` (which inputs are given, or which output's mask) and the shape,
    dtype and device of every input, but the number of points."""
    shapes = []
    for name, tensor in inputs.items():
        shape = tuple(tensor.shape)
        if name in POINT_INPUTS:
            shape = (shape[0], None, *shape[2:])
        shapes.append((name, shape, tensor.dtype, tensor.device))
    return kind, tuple(shapes)


class RecordedGraph:
    """A recorded graph as a function, compiled in a compilation unit of its own so that it is freed with this object.

    Attributes:
        packed_layers: the packed weights it reads, after its inputs (indices into the decoder's packed layers).
        exact_for: numbers of points the graph was checked on: ``True`` where it gave the eager decoder's result bit
            for bit (the one it was recorded with among them), ``False`` where it did not.
    """

    def __init__(self, graph: torch._C.Graph, points: int, first_packed: int, packed_layers: list[int]) -> None:
        # The packed weights given (graph inputs from first_packed on, of these layers) that the products read.
        self.packed_layers = drop_unread_inputs(graph, first_packed, packed_layers)
        self._weights = compact(graph)
        unit = torch._C.CompilationUnit()
        saved = unit.create_function("forward", graph).save_to_buffer()
        # Loaded back from its serialized form, in a compilation unit of its own: the nodes then point into one
        # printed source, where a traced node holds the text of the whole Python stack it was recorded under (about
        # 64 bytes a frame, and a server's request thread is some 50 frames deep).
        self._module = torch.jit.load(io.BytesIO(saved))
        self.exact_for: dict[int, bool] = {points: True}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        # The simple executor: the profiling one specialises and fuses, which changes the sums' order.
        with torch.jit.optimized_execution(False):
            return self._module(*inputs, *self._weights)


def drop_unread_inputs(graph: torch._C.Graph, first: int, layers: list[int]) -> tuple[int, ...]:
    """Remove the graph inputs ``first, first + 1, ...`` (the packed weights of ``layers``) that no node reads; return
    the layers of those left."""
    kept, inputs = [], list(graph.inputs())
    for position in reversed(range(len(layers))):  # from the last: an erased input leaves the earlier ones in place
        if inputs[first + position].uses():
            kept.insert(0, layers[position])
        else:
            graph.eraseInput(first + position)
    return tuple(kept)


def compact(graph: torch._C.Graph) -> list[torch.Tensor]:
    """Fold a recorded graph's scalar bookkeeping, in place, and return the tensors it read as constants, now its last
    inputs.

    The tracer records the shape arithmetic of the Python code (sizes to ints to tensors and back), about three
    quarters of a click's nodes. Its constant folding would also evaluate operations on the weights (a concatenation
    of embeddings, a product of two weights) into new tensors that a model swap in place would not update, and its
    constant pooling would merge weights that happen to be equal: so the weights are made inputs first, and only
    scalars and lists are folded.
    """
    weights = []
    for node in list(graph.nodes()):
        if node.kind() == "prim::Constant" and isinstance(node.output().toIValue(), torch.Tensor):
            value = graph.addInput(f"weight_{len(weights)}")
            value.setType(node.output().type())
            weights.append(node.output().toIValue())
            node.output().replaceAllUsesWith(value)
            node.destroy()
    torch._C._jit_pass_peephole(graph, True)  # shapes stay symbolic: one graph serves any number of points
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_constant_pooling(graph)
    torch._C._jit_pass_dce(graph)
    return weights


class DecoderGraphs:
    """The recorded decoder graphs of one model, for clicks (one prompt row); inference only.

    :func:`lib.serving.decoding.decode_rows` asks :meth:`decode_tokens` and :meth:`masks` first and runs the eager
    modules where they return ``None`` (several prompt rows, a prompt that failed to record).

    Args:
        model: the served model, in eval mode, its parameters without gradients.
        max_graphs: tokens graphs kept at most, the least recently used dropped first (a prompt kind needs one, or two
            where its number of points crosses a choice of the Python code: the default keeps points, a box and both,
            each with and without the previous mask); the mask graphs, one per output, come on top.

    Graphs are recorded on the thread that decodes. Another thread would keep buffers of its own for the decoder's
    operations (the server's encoder thread held 6 MB more), and one that forks an OpenMP team of its own makes libgomp
    throttle every team's spinning once there are more team threads than cores (every product of the process ran 2x
    slower from then on).
    """

    def __init__(self, model: SamMed2D, max_graphs: int = 6) -> None:
        self.model = model
        self.max_graphs = max_graphs
        # The packed copies exist where the products run in oneDNN (CPU); elsewhere the graphs read the weights.
        on_cpu = model.mask_decoder.mask_tokens.weight.device.type == "cpu"
        packed = on_cpu and onednn_available()
        self._packed_layers = [m for m in model.mask_decoder.modules() if isinstance(m, PackedLinear)] if packed else []
        self._tokens: collections.OrderedDict[Layout, list[RecordedGraph]] = collections.OrderedDict()
        self._masks: dict[Layout, RecordedGraph | None] = {}
        self._failed: set[tuple[Layout, int]] = set()
        # Numbers of points met by each kind that has graphs: the second meeting checks the graphs on it.
        self._met: dict[Layout, set[int]] = {}
        self._lock = threading.Lock()

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
        """:func:`lib.serving.decoding.decode_prompt_tokens` of these inputs from a graph of their kind (recorded or
        checked now where needed), or ``None``: then the caller decodes eagerly."""
        prompt = next((t for t in (point_coords, boxes, mask_input) if t is not None), None)
        if prompt is None or prompt.shape[0] != 1 or not all(name in first_layer for name in FIRST_LAYER_NAMES):
            return None
        given = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        names = tuple(name for name in PROMPT_NAMES if given[name] is not None)
        named = {"src": src, "image_pe": image_pe, **{n: given[n] for n in names}}
        named.update((name, first_layer[name]) for name in FIRST_LAYER_NAMES)
        inputs, points = tuple(named.values()), 0 if point_coords is None else point_coords.shape[1]
        model = self.model

        def tokens(src, image_pe, *rest):  # noqa: ANN001, ANN202 (traced)
            prompts = dict(zip(names, rest))
            terms = dict(zip(FIRST_LAYER_NAMES, rest[len(names) : len(names) + len(FIRST_LAYER_NAMES)]))
            decoded = decode_prompt_tokens(model, src, image_pe, terms, *(prompts.get(n) for n in PROMPT_NAMES))
            return decoded.mask_tokens, decoded.image_tokens, decoded.iou

        def as_decoded(outputs: tuple[torch.Tensor, ...]) -> DecodedTokens:
            mask_tokens, image_tokens, iou = outputs
            return DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=tuple(src.shape[2:]), iou=iou)

        key = layout(("tokens", names), named)
        graph, unchecked = self._tokens_graph(key, points)
        if graph is not None:
            return as_decoded(graph(*inputs, *self._packed_weights(graph.packed_layers)))
        if unchecked and self._first_meeting(key, points):
            return None
        # Run eagerly first: a number of points these graphs were not recorded with is served by one that gives the
        # eager result exactly, and a new graph is given the packed weights that this decoding multiplied by.
        eager = tokens(*inputs)
        for graph in unchecked:
            replayed = graph(*inputs, *self._packed_weights(graph.packed_layers))
            graph.exact_for[points] = all(torch.equal(a, b) for a, b in zip(replayed, eager))
            if graph.exact_for[points]:
                return as_decoded(eager)
        self._record_tokens(key, points, tokens, inputs)
        return as_decoded(eager)

    def masks(self, decoded: DecodedTokens, outputs: torch.Tensor) -> torch.Tensor | None:
        """:meth:`MaskDecoder.masks` of the kept ``outputs`` ``(1,)`` from that output's graph, or ``None`` (several
        rows, or a graph that failed to record)."""
        if decoded.mask_tokens.shape[0] != 1:
            return None
        decoder, index, grid = self.model.mask_decoder, int(outputs[0]), decoded.grid
        named = {"mask_tokens": decoded.mask_tokens, "image_tokens": decoded.image_tokens}

        def mask(mask_tokens, image_tokens):  # noqa: ANN001, ANN202 (traced)
            tokens = DecodedTokens(mask_tokens=mask_tokens, image_tokens=image_tokens, grid=grid, iou=mask_tokens)
            return decoder.masks(tokens, torch.tensor([index]))

        key = layout(("mask", index, grid), named)
        with self._lock:
            if key not in self._masks:
                self._masks[key] = self._record(key, 0, mask, tuple(named.values()))
            graph = self._masks[key]
        return None if graph is None else graph(*named.values())

    def packed_layers_read(self) -> int:
        """How many of the decoder's packed weights the kept graphs read: those of the products that run in oneDNN."""
        with self._lock:
            return len({i for graphs in self._tokens.values() for graph in graphs for i in graph.packed_layers})

    def __len__(self) -> int:
        """Graphs kept."""
        with self._lock:
            return sum(map(len, self._tokens.values())) + sum(graph is not None for graph in self._masks.values())

    def _packed_weights(self, layers: tuple[int, ...]) -> list[torch.Tensor]:
        return [self._packed_layers[i].onednn_weight() for i in layers]

    def _tokens_graph(self, key: Layout, points: int) -> tuple[RecordedGraph | None, list[RecordedGraph]]:
        """The kind's graph that serves ``points`` points, or else those not yet checked on them."""
        with self._lock:
            graphs = self._tokens.get(key, [])
            if graphs:
                self._tokens.move_to_end(key)
            exact = next((graph for graph in graphs if graph.exact_for.get(points)), None)
            return exact, [graph for graph in graphs if points not in graph.exact_for]

    def _first_meeting(self, key: Layout, points: int) -> bool:
        """Whether ``key``'s graphs meet ``points`` points for the first time (noting that they have)."""
        with self._lock:
            met = self._met.setdefault(key, set())
            first = points not in met
            met.add(points)
            return first

    def _record_tokens(
        self, key: Layout, points: int, fn: Callable, inputs: tuple[torch.Tensor, ...]
    ) -> RecordedGraph | None:
        """A new tokens graph of ``key`` recorded with ``points`` points, kept within ``max_graphs``."""
        with self._lock:
            if (key, points) in self._failed or self.max_graphs < 1:
                return None
        graph = self._record(key, points, fn, inputs)
        with self._lock:
            if graph is None:
                self._failed.add((key, points))
                return None
            self._tokens.setdefault(key, []).append(graph)
            self._tokens.move_to_end(key)
            while sum(map(len, self._tokens.values())) > self.max_graphs:
                oldest = next(iter(self._tokens))
                self._tokens[oldest].pop(0)
                if not self._tokens[oldest]:
                    del self._tokens[oldest]
                    self._met.pop(oldest, None)
        return graph

    def _record(self, key: Layout, points: int, fn: Callable, inputs: tuple[torch.Tensor, ...]) -> RecordedGraph | None:
        """``fn`` of ``inputs`` recorded, or ``None``; the packed weights that exist (:class:`PackedLinear` makes them
        when a product reads them, as ``fn``'s eager run before does) are inputs too, after ``inputs``.

        The copies are not made here: where the products run in MKL (Intel processors) they are never made, and a
        graph given one that its products do not read drops it (:func:`drop_unread_inputs`): a mask graph drops all
        (the up-scaling's products take the plain weights)."""
        layers = [i for i, layer in enumerate(self._packed_layers) if layer.packed is not None]
        weights = self._packed_weights(tuple(layers))

        def traced(*args):  # noqa: ANN002, ANN202 (traced): the packed weights come last, as inputs
            return fn(*args[: len(inputs)])

        start = time.perf_counter()
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                # The warnings name the shape-dependent Python choices, which the graphs' checks cover.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # The tracer alone: torch.jit.trace would add the graph to a compilation unit that lives forever.
                graph, _ = torch.jit._get_trace_graph(traced, (*inputs, *weights))
            recorded = RecordedGraph(graph, points, len(inputs), layers)
        except Exception:  # a prompt that cannot be recorded decodes eagerly
            logger.exception("Cannot record the decoder graph of %s; it decodes eagerly", key[0])
            return None
        # The tracer's garbage stays in this thread's heap until trimmed.
        release_freed_memory(collect=False)
        logger.info("Recorded the decoder graph of %s in %.0f ms", key[0], 1000 * (time.perf_counter() - start))
        return recorded
