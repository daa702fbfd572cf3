"""The recorded decoder graphs give the eager decoder's logits, bit for bit, for every prompt layout.

With ``--conf decoder_graphs true`` the server replays the prompt encoder and decoder from TorchScript graphs
(:class:`TracedTokenDecoder`). A graph fixes what it was recorded with; what it must not fix is the prompt's
values, the image, or the weights (a model swap copies new weights into the served model in place).
"""

from __future__ import annotations

import pytest
import torch

from lib.modeling.build import build_model
from lib.serving.decoding import ServedDecoding, decode_rows, prompt_independent_inputs
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.traced_decoder import TracedTokenDecoder

DECODING = ServedDecoding(mask_prompt="logits")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vit_b").eval()


def entry_of(model, features: torch.Tensor, token_decoder: TracedTokenDecoder | None) -> CachedEmbedding:
    entry = CachedEmbedding(features, None)
    entry.extras.update(prompt_independent_inputs(model, features))
    if token_decoder is not None:
        entry.extras["token_decoder"] = token_decoder
    return entry


def prompts(rows: int, points: int, box: bool, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    coords = torch.rand(rows, points, 2, generator=generator) * 256 if points else None
    labels = torch.randint(0, 2, (rows, points), generator=generator) if points else None
    boxes = torch.tensor([[40.0, 50.0, 180.0, 200.0]]).repeat(rows, 1) if box else None
    return coords, labels, boxes


LAYOUTS = {
    "one point": (1, 1, False),
    "three points": (1, 3, False),
    "box": (1, 0, True),
    "box and two points": (1, 2, True),
    "three prompt rows": (3, 2, False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "previous mask"])
def test_replayed_graph_equals_the_eager_decoder(model, name, with_mask):
    rows, points, box = LAYOUTS[name]
    traced = TracedTokenDecoder(model, background=False)
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        eager_entry, traced_entry = entry_of(model, features, None), entry_of(model, features, traced)
        previous = torch.randn(rows, 1, 64, 64) * 4 if with_mask else None
        for seed in range(3):  # recorded on the first prompt, replayed on others of the same layout
            inputs = (*prompts(rows, points, box, seed), previous)
            expected = decode_rows(model, eager_entry, DECODING, *inputs)
            got = decode_rows(model, traced_entry, DECODING, *inputs)
            for a, b in zip(got, expected):
                assert torch.equal(a, b)
    # One graph of the prompt layout; for one row also one per kept output (of 1..3) for its mask, none for more rows.
    assert 2 <= traced.recorded <= 4 if rows == 1 else traced.recorded == 1
    assert len(traced) == traced.recorded


def test_a_new_image_and_weights_copied_in_place_are_what_the_graph_reads(model):
    traced = TracedTokenDecoder(model, background=False)
    coords, labels, _ = prompts(1, 2, False, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.inference_mode():
            first = decode_rows(model, entry_of(model, torch.randn(1, 256, 16, 16), traced), DECODING, coords, labels)
            entry = entry_of(model, torch.randn(1, 256, 16, 16), traced)
            on_new_image = decode_rows(model, entry, DECODING, coords, labels)
            assert not torch.equal(first[0], on_new_image[0])
            torch.manual_seed(1)
            model.load_state_dict(build_model("vit_b").state_dict())  # copies into the same tensors, as a swap does
            entry = entry_of(model, entry.features, traced)
            swapped = decode_rows(model, entry, DECODING, coords, labels)
            expected = decode_rows(model, entry_of(model, entry.features, None), DECODING, coords, labels)
        assert not torch.equal(swapped[0], on_new_image[0])
        assert torch.equal(swapped[0], expected[0]) and torch.equal(swapped[1], expected[1])
        assert traced.recorded <= 4  # the graphs recorded before the copy, and perhaps another kept output's mask
    finally:
        model.load_state_dict(state)


def test_in_the_background_a_new_layout_is_decoded_eagerly_until_recorded(model):
    traced = TracedTokenDecoder(model, background=True)
    coords, labels, _ = prompts(1, 1, False, 0)
    with torch.inference_mode():
        entry = entry_of(model, torch.randn(1, 256, 16, 16), traced)
        expected = decode_rows(model, entry_of(model, entry.features, None), DECODING, coords, labels)
        first = decode_rows(model, entry, DECODING, coords, labels)
        traced.wait()
        assert len(traced) == 2  # the prompt layout's graph and the kept output's mask graph, both asked for at once
        decode_rows(model, entry, DECODING, coords, labels)
        traced.wait()
        assert len(traced) == 2
        replayed = decode_rows(model, entry, DECODING, coords, labels)
    for got in (first, replayed):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_the_warm_up_records_on_its_own_thread_and_mask_graphs_serve_every_prompt(model):
    traced = TracedTokenDecoder(model, background=True)
    with torch.inference_mode():
        traced.record_masks((16, 16))
        assert len(traced) == model.mask_decoder.num_mask_tokens  # recorded before returning, not in the background
        entry = entry_of(model, torch.randn(1, 256, 16, 16), traced)
        with traced.recording_here():
            for points in (1, 4):
                decode_rows(model, entry, DECODING, *prompts(1, points, False, points)[:2])
    assert len(traced) == model.mask_decoder.num_mask_tokens + 2  # one per prompt layout, no further mask graphs


def test_recording_here_nests_as_the_warm_up_uses_it(model):
    """The warm-up records the mask graphs inside its own recording block: the block still records on its thread."""
    traced = TracedTokenDecoder(model, background=True)
    with torch.inference_mode():
        entry = entry_of(model, torch.randn(1, 256, 16, 16), traced)
        with traced.recording_here():
            traced.record_masks((16, 16))
            decode_rows(model, entry, DECODING, *prompts(1, 1, False, 0)[:2])
            assert len(traced) == model.mask_decoder.num_mask_tokens + 1
