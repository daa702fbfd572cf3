"""The optimised encoder and decoder equal the published forward math beyond the golden shapes.

The goldens cover a 16x16 token grid; here a 20x20 grid (320 input) pads windows of 14 to 28 on both sides, and
relative-position tables and adapters carry random (not zero) values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import published_reference
from lib.modeling.adapter import Adapter
from lib.modeling.build import build_model
from lib.serving.decoding import ServedDecoding, decode_rows, prompt_independent_inputs
from lib.serving.embedding_cache import CachedEmbedding

CONFIG = dict(
    image_size=320,
    encoder_embed_dim=48,
    encoder_depth=4,
    encoder_num_heads=3,
    encoder_global_attn_indexes=[1, 3],
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    model = build_model(CONFIG).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(0, 0.5)
    return model


def test_encoder_equals_published_math(model):
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), published_reference.encode(model.image_encoder, x))


@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoder_equals_published_math_per_row(model, multimask):
    torch.manual_seed(4)
    with torch.no_grad():
        embedding = model.encode(torch.randn(1, 3, 320, 320))
        coords = torch.rand(3, 2, 2) * 320
        labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
        boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [50.0, 60.0, 70.0, 90.0], [0.0, 0.0, 319.0, 319.0]])
        masks = torch.randn(3, 1, 80, 80)
        low_res, iou = model.decode(embedding, coords, labels, boxes, masks, multimask_output=multimask)
        for row in range(3):
            ref_low, ref_iou = published_reference.decode(
                model, embedding, coords[row : row + 1], labels[row : row + 1], boxes[row : row + 1],
                masks[row : row + 1], multimask,
            )  # fmt: skip
            torch.testing.assert_close(low_res[row : row + 1], ref_low, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[row : row + 1], ref_iou, atol=1e-5, rtol=1e-4)


def test_served_rows_with_cached_image_terms_equal_published_math_per_row(model):
    """decode_rows reuses the image's prompt-independent decoder terms (computed once, batch 1) for R prompt rows."""
    torch.manual_seed(5)
    with torch.no_grad():
        embedding = model.encode(torch.randn(1, 3, 320, 320))
        entry = CachedEmbedding(embedding, None, prompt_independent_inputs(model, embedding))
        coords, labels = torch.rand(3, 2, 2) * 320, torch.tensor([[1, 0], [1, 1], [0, 1]])
        low_res, iou = decode_rows(model, entry, ServedDecoding(), coords, labels)
        for row in range(3):
            ref_low, ref_iou = published_reference.decode(
                model, embedding, coords[row : row + 1], labels[row : row + 1], None, None, True
            )
            torch.testing.assert_close(low_res[row : row + 1], ref_low, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[row], ref_iou[0, 0], atol=1e-5, rtol=1e-4)


def test_seeded_adapter_weights_do_not_depend_on_their_storage():
    """A seed gives the adapter the published initialisation (its layers built in order, then Kaiming-normal,
    fan_out), whatever layout the weights are stored in (the transposed convolution's is re-laid output-major): a
    ``--conf seed`` serves the same weights as before."""
    torch.manual_seed(5)
    adapter = Adapter(16)
    torch.manual_seed(5)
    published_layers = [
        nn.Linear(16, 4, bias=False),
        nn.Linear(4, 16, bias=False),
        nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1, bias=False),
        nn.ConvTranspose2d(16, 16, kernel_size=4, stride=2, padding=1, bias=False),
    ]
    for layer in published_layers:
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    ours = [adapter.channel[0], adapter.channel[2], adapter.spatial[0], adapter.spatial[2]]
    for mine, published in zip(ours, published_layers, strict=True):
        assert torch.equal(mine.weight, published.weight), mine
    assert not adapter.spatial[2].weight.is_contiguous()  # the re-laid one is among them


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (3, 1, 0), (2, 2, 1)])
def test_a_convolution_as_a_gather_of_fields_and_a_product_equals_the_layer(kernel, stride, padding):
    """The adapter's convolution (its 3x3 stride-2 one, and other shapes) on a channels-last grid, as one gather of
    each output pixel's field and one product (:func:`lib.modeling.adapter.conv2d_by_matmul`), gives the layer's
    output for two images at once, with the weight stored as the adapter stores it or not, in inference and in
    training (where the fields are gathered by ``unfold``, whose gradient is cheap)."""
    from lib.modeling.adapter import conv2d_by_matmul
    from lib.modeling.common import store_weight_in_memory_order

    torch.manual_seed(0)
    layer = nn.Conv2d(6, 5, kernel_size=kernel, stride=stride, padding=padding)
    x = torch.randn(2, 6, 9, 8)
    expected = layer(x).detach()
    for _ in range(2):
        for training in (False, True):
            with torch.set_grad_enabled(training):
                got, (height, width) = conv2d_by_matmul(x.permute(0, 2, 3, 1), layer)
            got = got.view(5, 2, height, width).transpose(0, 1)
            torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
        store_weight_in_memory_order(layer, (0, 2, 3, 1))


@pytest.mark.parametrize("kernel, stride, padding", [(4, 2, 1), (3, 2, 0), (2, 2, 0), (3, 1, 1)])
def test_a_transposed_convolution_as_a_product_and_an_overlap_add_equals_the_layer(kernel, stride, padding):
    """The adapter's transposed convolution (its 4x4 stride-2 one, and other shapes) as one product and a sum per
    tap of the kernel (:func:`lib.modeling.adapter.overlap_add`, in place of ``fold``) gives the layer's output, for
    two images at once, in inference and in training (where it is ``fold``)."""
    from lib.modeling.adapter import conv_transpose_by_matmul

    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(6, 5, kernel_size=kernel, stride=stride, padding=padding)
    x = torch.randn(2, 6, 7, 9)
    expected = layer(x).detach()
    pixels = x.permute(1, 0, 2, 3).reshape(6, -1)  # (Cin, B * h * w), as the adapter's first product gives them
    for training in (False, True):
        with torch.set_grad_enabled(training):
            got = conv_transpose_by_matmul(pixels, (7, 9), layer)
        assert got.shape == expected.shape
        torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
