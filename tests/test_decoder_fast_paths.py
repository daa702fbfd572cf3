"""The decoder's folded attention computes what the plain attention computes.

:meth:`Attention.attend_to_many` and :meth:`Attention.attend_from_many` regroup the projections of the image tokens
onto the few prompt tokens; they must give the plain layer's outputs, also for several prompt rows sharing one image.
"""

from __future__ import annotations

import pytest
import torch

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
