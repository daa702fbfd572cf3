"""The server's recorded decoder graphs give the eager decoder's logits, bit for bit, for every prompt layout.

The server replays each click's prompt encoder and mask decoder from TorchScript graphs
(:class:`lib.serving.decoder_graphs.DecoderGraphs`). A graph fixes the layout it was recorded with; what it must not
fix is the prompt's values, the image, or the weights (a model swap copies new weights into the served model in place,
and the decoder MLPs' packed copies are re-packed from them).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.modeling.build import build_model
from lib.serving.decoder_graphs import DecoderGraphs
from lib.serving.decoding import ServedDecoding, decode_rows, prompt_independent_inputs
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.prompt_inputs import parse_prompts

DECODING = ServedDecoding(mask_prompt="logits")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vit_b").eval().requires_grad_(False)


def entry_of(model, features: torch.Tensor, graphs: DecoderGraphs | None) -> CachedEmbedding:
    extras = prompt_independent_inputs(model, features)
    if graphs is not None:
        extras["decoder_graphs"] = graphs
    return CachedEmbedding(features, None, extras)


def prompts(rows: int, points: int, box: bool, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    coords = torch.rand(rows, points, 2, generator=generator) * 256 if points else None
    labels = torch.randint(0, 2, (rows, points), generator=generator) if points else None
    boxes = (torch.tensor([[40.0, 50.0, 180.0, 200.0]]) + seed).repeat(rows, 1) if box else None
    return coords, labels, boxes


def assert_same(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


LAYOUTS = {"one point": (1, False), "three points": (3, False), "box": (0, True), "box and two points": (2, True)}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "previous mask"])
@pytest.mark.parametrize("multimask", [True, False], ids=["best of three", "output 0"])
def test_replayed_graphs_equal_the_eager_decoder(model, name, with_mask, multimask):
    points, box = LAYOUTS[name]
    graphs = DecoderGraphs(model)
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        eager, traced = entry_of(model, features, None), entry_of(model, features, graphs)
        for seed in range(3):  # recorded by the first prompt, replayed for the others of the same layout
            previous = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed)) * 4
            inputs = (*prompts(1, points, box, seed), previous if with_mask else None, multimask)
            assert_same(decode_rows(model, traced, DECODING, *inputs), decode_rows(model, eager, DECODING, *inputs))
    # One tokens graph for the layout, and one mask graph for each output kept (output 0, or some of 1..3).
    assert 2 <= len(graphs) <= (2 if not multimask else 4)


def test_several_prompt_rows_decode_eagerly(model):
    graphs = DecoderGraphs(model)
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        inputs = prompts(3, 2, False, 0)
        got = decode_rows(model, entry_of(model, features, graphs), DECODING, *inputs)
        assert_same(got, decode_rows(model, entry_of(model, features, None), DECODING, *inputs))
    assert len(graphs) == 0


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"], ids=["oneDNN products", "MKL products"])
def test_a_new_image_and_weights_copied_in_place_are_what_the_graphs_read(model, vendor, products_rule):
    """With a click's products in oneDNN (AMD processors: the MLPs read packed copies) or in MKL (Intel ones)."""
    products_rule(vendor)
    graphs = DecoderGraphs(model)
    coords, labels, _ = prompts(1, 2, False, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.inference_mode():
            first = decode_rows(model, entry_of(model, torch.randn(1, 256, 16, 16), graphs), DECODING, coords, labels)
            entry = entry_of(model, torch.randn(1, 256, 16, 16), graphs)
            on_new_image = decode_rows(model, entry, DECODING, coords, labels)
            assert not torch.equal(first[0], on_new_image[0])
            recorded = len(graphs)
            # The MLPs' packed copies (8 MB) are read only where their products run in oneDNN.
            assert graphs.packed_layers_read() == (4 if vendor == "AuthenticAMD" else 0)
        torch.manual_seed(1)
        model.load_state_dict(build_model("vit_b").state_dict())  # copies into the same tensors, as a swap does
        with torch.inference_mode():
            entry = entry_of(model, entry.features, graphs)
            swapped = decode_rows(model, entry, DECODING, coords, labels)
            expected = decode_rows(model, entry_of(model, entry.features, None), DECODING, coords, labels)
        assert not torch.equal(swapped[0], on_new_image[0])
        assert_same(swapped, expected)
        assert len(graphs) <= recorded + 1  # the same tokens graph; perhaps another kept output's mask graph
    finally:
        model.load_state_dict(state)


def test_one_graph_serves_a_growing_number_of_clicks_where_it_is_exact(model):
    """A tokens graph recorded with one point replays for more points (the tracer records the shape arithmetic) as
    long as the Python choices that depend on the number of tokens come out the same; where they do not (10 points:
    the cross-attention is no longer folded) the check against the eager decoder says so and another graph is
    recorded. A number of points is checked when it comes a second time: a series of corrections, one point more
    each, decodes eagerly and records nothing more. Every answer is the eager one."""
    graphs = DecoderGraphs(model)
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        traced, eager = entry_of(model, features, graphs), entry_of(model, features, None)
        previous = None
        for series, counts in enumerate(((1, 2, 3, 9, 10, 11), (3, 9, 10, 11, 2))):
            for points in counts:
                inputs = (*prompts(1, points, False, points + series), previous)
                got = decode_rows(model, traced, DECODING, *inputs)
                assert_same(got, decode_rows(model, eager, DECODING, *inputs))
                previous = got[0] if points > 1 else torch.randn(1, 1, 64, 64)
            if series == 0:  # each number of points met once: the graphs of the two kinds' first clicks, unchecked
                assert [g.exact_for for kind in graphs._tokens.values() for g in kind] == [{1: True}, {2: True}]
    first, *others = graphs._tokens.values()
    assert len(first) == 1 and first[0].exact_for == {1: True}  # the clicks without a previous mask
    ((recorded_with_two, recorded_with_ten),) = others  # with it: 2-9 points on one graph, 10-11 on another
    assert recorded_with_two.exact_for == {2: True, 3: True, 9: True, 10: False, 11: False}
    assert recorded_with_ten.exact_for == {10: True, 11: True}


def test_graphs_past_the_bound_are_dropped_least_recently_used_first_and_freed(model):
    graphs = DecoderGraphs(model, max_graphs=2)
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        traced, eager = entry_of(model, features, graphs), entry_of(model, features, None)
        kinds = {"points": (2, False), "box": (0, True), "box and points": (1, True)}
        recorded = {}
        for name in ("points", "box", "points", "box and points"):
            inputs = prompts(1, *kinds[name], 0)
            assert_same(decode_rows(model, traced, DECODING, *inputs), decode_rows(model, eager, DECODING, *inputs))
            recorded.setdefault(name, weakref.ref(graphs._tokens[next(reversed(graphs._tokens))][0]))
    assert sum(map(len, graphs._tokens.values())) == 2
    gc.collect()
    assert recorded["box"]() is None  # the least recently used, and nothing else holds it
    assert recorded["points"]() is not None and recorded["box and points"]() is not None


def test_the_segmenter_with_graphs_answers_clicks_as_without(golden_dir: Path, tmp_path: Path):
    """The server's segmenter (graphs by default) records on the clicking thread, under its locks, and a click, a
    correction with the previous mask and a box give the eager answers (``--conf decoder_graphs false``)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(tmp_path / "picture.png")
    plain = InteractiveSegmenter(ModelStore(tmp_path / "plain", golden_dir / "meta.json"), decoder_graphs=False)
    graphed = InteractiveSegmenter(ModelStore(tmp_path / "graphed", golden_dir / "meta.json"))
    steps = (
        ({"foreground": [[30, 40]]}, True),
        ({"foreground": [[30, 40]], "background": [[60, 20]]}, False),
        ({"box": [10, 12, 70, 80]}, True),
    )
    for request, reset in steps:
        answers = [
            segmenter.segment(
                str(tmp_path / "picture.png"),
                lambda source, request=request: parse_prompts(request, source.view_hw, None),
                "c",
                "l",
                reset,
            )
            for segmenter in (plain, graphed)
        ]
        assert answers[1].used_previous_mask == (not reset)
        assert np.array_equal(answers[0].mask, answers[1].mask)
        assert torch.equal(answers[0].low_res, answers[1].low_res) and answers[0].iou == answers[1].iou
    assert len(graphed._graphs._tokens) == 3 and plain._graphs is None
