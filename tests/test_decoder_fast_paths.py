"""The decoder's fast paths compute what the published computation computes.

:meth:`Attention.attend_to_many` and :meth:`Attention.attend_from_many` regroup the projections of the image tokens
onto the few prompt tokens; they must give the plain layer's outputs, also for several prompt rows sharing one image.
:class:`PackedLinear` multiplies by a packed copy of its weight that must follow the weight; a mask prompt's
first-layer terms are updated from the cached ones (:func:`mask_prompt_terms`), from the mask's channels per image
token (:meth:`PromptEncoder.mask_token_channels`).
"""

from __future__ import annotations

import pytest
import torch

from lib.modeling.onednn_linear import PackedLinear, onednn_available
from lib.modeling.transformer import Attention


@pytest.fixture
def attention() -> Attention:
    torch.manual_seed(0)
    return Attention(embedding_dim=256, num_heads=8, downsample_rate=2).eval()


@pytest.mark.parametrize("rows, image_rows", [(1, 1), (3, 1), (3, 3)])
def test_tokens_attending_to_the_image_fold_exactly(attention, rows, image_rows):
    tokens = torch.randn(rows, 7, 256)
    image = torch.randn(image_rows, 256, 256)
    image_pe = torch.randn(image_rows, 256, 256)
    with torch.no_grad():
        assert attention.folds(tokens.shape[1])
        folded = attention.attend_to_many(tokens, image + image_pe, image)
        plain = attention(tokens, (image + image_pe).expand(rows, -1, -1), image.expand(rows, -1, -1))
    torch.testing.assert_close(folded, plain, atol=2e-5, rtol=0)


@pytest.mark.parametrize("rows, image_rows, projected", [(1, 1, False), (3, 1, False), (3, 3, False), (3, 1, True)])
def test_image_attending_to_tokens_folds_exactly(attention, rows, image_rows, projected):
    tokens = torch.randn(rows, 7, 256)
    tokens_pe = torch.randn(rows, 7, 256)
    image = torch.randn(image_rows, 256, 256)
    with torch.no_grad():
        q_heads = attention.heads(attention.q_proj, image) if projected else None
        folded = attention.attend_from_many(None if projected else image, tokens + tokens_pe, tokens, q_heads)
        plain = attention(image.expand(rows, -1, -1), tokens + tokens_pe, tokens)
    torch.testing.assert_close(folded, plain, atol=2e-5, rtol=0)


def test_folding_is_for_few_tokens_and_inference_only(attention):
    with torch.no_grad():
        assert attention.folds(15)  # 8 heads x 15 tokens < 128 internal channels
        assert not attention.folds(16)
    assert not attention.folds(7)  # gradients on: the published computation


def test_the_kept_mask_alone_equals_that_output_of_all_masks():
    """Serving decodes only the output each row keeps (chosen from the predicted IoUs first): the same logits as that
    output among all four, for rows keeping different outputs, and the state dict is the published layout's."""
    from lib.modeling.build import build_model
    from lib.serving.decoding import kept_output

    torch.manual_seed(0)
    model = build_model("vit_b").eval()
    decoder = model.mask_decoder
    with torch.no_grad():
        src = torch.randn(1, 256, 16, 16)
        image_pe = model.prompt_encoder.get_dense_pe()
        coords = torch.rand(4, 2, 2) * 256
        sparse, _ = model.prompt_encoder((coords, torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]])), None, None)
        decoded = decoder.decode_tokens(src, image_pe, sparse)
        every = decoder.masks(decoded)
        for multimask in (True, False):
            kept = kept_output(decoded.iou, multimask)
            alone = decoder.masks(decoded, kept)
            torch.testing.assert_close(alone[:, 0], every[torch.arange(4), kept], atol=1e-5, rtol=0)
        outputs = torch.tensor([1, 3, 3, 0])  # mixed on purpose: rows share an output's MLP
        torch.testing.assert_close(
            decoder.masks(decoded, outputs)[:, 0], every[torch.arange(4), outputs], atol=1e-5, rtol=0
        )
    state = decoder.state_dict()
    assert state["output_upscaling.0.weight"].shape == (256, 64, 2, 2)
    assert state["transformer.layers.0.mlp.lin1.weight"].shape == (2048, 256)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_packed_linear_follows_its_weight_and_trains_as_published(products_rule):
    """Where oneDNN runs a click's products (AMD processors), inference reads a packed copy: it must equal the plain
    product, be re-made when the weight changes in place (a model swap), not travel with a copy of the layer, and
    leave training's computation (and gradients) as ``F.linear``'s. Where MKL runs them, no copy is made."""
    import copy

    torch.manual_seed(0)
    layer = PackedLinear(256, 2048)
    x = torch.randn(2, 7, 256)
    products_rule("GenuineIntel")
    with torch.inference_mode():
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5
        )
        assert layer.packed is None
    products_rule("AuthenticAMD")
    with torch.inference_mode():
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5
        )
        first = layer.packed[1]
    with torch.no_grad():
        layer.load_state_dict({"weight": torch.randn(2048, 256), "bias": torch.randn(2048)})
    with torch.inference_mode():
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5
        )
        assert layer.packed[1] is not first
    # The recipe's fused Adam step moves the weight but not its version counter.
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    layer.train()
    layer(x).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.inference_mode():
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5
        )
    copied = copy.deepcopy(layer)
    assert copied.packed is None
    plain = torch.nn.Linear(256, 2048)
    plain.load_state_dict(layer.state_dict())
    layer.weight.grad = None
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad)


def test_a_mask_prompt_decodes_from_the_cached_terms_as_from_a_new_embedding():
    """With a mask prompt the server moves the cached first-layer terms by the mask's 16 channels instead of
    projecting the image tokens again: the same kept logits and IoU as the decoder on features + dense embedding,
    for rows with different masks."""
    from lib.modeling.build import build_model
    from lib.serving.decoding import ServedDecoding, decode_rows, kept_output
    from lib.serving.embedding_cache import CachedEmbedding

    torch.manual_seed(0)
    model = build_model("vit_b").eval()
    decoding = ServedDecoding()
    with torch.inference_mode():
        features = torch.randn(1, 256, 16, 16)
        coords, labels = torch.rand(3, 2, 2) * 256, torch.tensor([[1, 0], [1, 1], [0, 1]])
        previous = torch.randn(3, 1, 64, 64) * 4
        low_res, iou = decode_rows(model, CachedEmbedding(features, None), decoding, coords, labels, None, previous)
        sparse, dense = model.prompt_encoder((coords, labels), None, decoding.mask_input(previous))
        decoded = model.mask_decoder.decode_tokens(features + dense, model.prompt_encoder.get_dense_pe(), sparse)
        kept = kept_output(decoded.iou, True)
        expected = model.mask_decoder.masks(decoded, kept)
    torch.testing.assert_close(low_res, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, decoded.iou.gather(1, kept[:, None])[:, 0], atol=1e-5, rtol=0)


def test_a_mask_s_channels_per_token_equal_the_published_convolutions():
    """The mask downscaling's two strided convolutions, layer norms and activations as per-token products give the
    convolutions' channels, in the decoder's token order, for trained-looking (random) weights and several rows."""
    from lib.modeling.build import build_model

    torch.manual_seed(0)
    prompt_encoder = build_model("vit_b").prompt_encoder.eval()
    with torch.no_grad():
        for parameter in prompt_encoder.mask_downscaling.parameters():
            parameter.normal_()
        masks = torch.randn(3, 1, 64, 64) * 4
        published = prompt_encoder.mask_downscaling[:-1](masks)  # (3, 16, 16, 16)
        per_token = prompt_encoder.mask_token_channels(masks)
        kept_weights = prompt_encoder.mask_token_channels(masks, prompt_encoder.mask_token_weights())
    assert per_token.shape == (3, 16 * 16, 16)
    torch.testing.assert_close(per_token, published.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert torch.equal(kept_weights, per_token)
