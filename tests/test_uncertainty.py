"""The SAM-Med2D uncertainty score (lib.loop.uncertainty) on the golden tiny model and real HC18 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.io.checkpoint import load_model
from lib.loop.uncertainty import UncertaintyConfig, UncertaintyScorer, mask_disagreement
from lib.serving.embedding_cache import EmbeddingCache
from lib.training.data import read_image


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return load_model(golden_dir / "weights.pth", golden_dir / "meta.json")


@pytest.fixture(scope="module")
def hc18_images(data_dir):
    paths = sorted((data_dir / "hc18" / "images").glob("*_HC.png"))[:4]
    return [read_image(p) for p in paths]


def test_mask_disagreement_is_one_minus_mean_pairwise_iou():
    same = torch.zeros(3, 8, 8, dtype=torch.bool)
    same[:, 2:6, 2:6] = True
    assert mask_disagreement(same) == pytest.approx(0.0)
    disjoint = torch.zeros(2, 8, 8, dtype=torch.bool)
    disjoint[0, :4] = True
    disjoint[1, 4:] = True
    assert mask_disagreement(disjoint) == pytest.approx(1.0)
    half = torch.zeros(2, 8, 8, dtype=torch.bool)
    half[0, :4] = True  # 32 pixels
    half[1, :2] = True  # 16 pixels inside the first: IoU 0.5
    assert mask_disagreement(half) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mask_disagreement(same[:1])


def test_score_is_reproducible_bounded_and_perturbations_matter(golden_model, hc18_images):
    scorer = UncertaintyScorer(golden_model, UncertaintyConfig(num_prompts=8, seed=3))
    scores = [scorer.score(img) for img in hc18_images]
    for s in scores:
        assert 0.0 <= s.score <= 1.0 and 0.0 <= s.disagreement <= 1.0 and 0.0 <= s.predicted_iou <= 1.0
        assert s.score == pytest.approx(0.5 * (s.disagreement + 1 - s.predicted_iou))
        x0, y0, x1, y1 = s.seed_box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    assert scorer.score(hc18_images[0]).score == scores[0].score
    # the perturbed prompts give different masks on real images, and images get different scores
    assert max(s.disagreement for s in scores) > 0.01
    assert len({round(s.score, 6) for s in scores}) > 1
    other_seed = UncertaintyScorer(golden_model, UncertaintyConfig(num_prompts=8, seed=4)).score(hc18_images[0])
    assert other_seed.disagreement != scores[0].disagreement


def test_prompt_insensitive_model_has_zero_disagreement(golden_dir, hc18_images):
    """With every prompt token made identical, any prompt gives the same mask: disagreement must be exactly 0."""
    model = load_model(golden_dir / "weights.pth", golden_dir / "meta.json")
    pe = model.prompt_encoder
    with torch.no_grad():
        pe.pe_layer.positional_encoding_gaussian_matrix.zero_()
        half = pe.not_a_point_embed.weight.shape[1] // 2
        constant = torch.cat([torch.zeros(half), torch.ones(half)])  # sin(0), cos(0)
        for embedding in pe.point_embeddings:
            embedding.weight.zero_()
        pe.not_a_point_embed.weight.copy_(constant[None])
    for method in ("disagreement", "combined", "iou"):
        s = UncertaintyScorer(model, UncertaintyConfig(method=method)).score(hc18_images[1])
        assert s.disagreement == pytest.approx(0.0, abs=1e-6)
        expected = {"disagreement": 0.0, "combined": 0.5 * (1 - s.predicted_iou), "iou": 1 - s.predicted_iou}[method]
        assert s.score == pytest.approx(expected, abs=1e-6)


def test_embedding_cache_is_used_and_keyed_by_model_version(golden_model, hc18_images):
    cache = EmbeddingCache(64 * 2**20)
    scorer = UncertaintyScorer(golden_model, cache=cache, model_version="v1")
    first = scorer.score(hc18_images[0], image_id="img0", content="c1")
    again = scorer.score(hc18_images[0], image_id="img0", content="c1")
    assert again.score == first.score
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    UncertaintyScorer(golden_model, cache=cache, model_version="v2").score(hc18_images[0], "img0", "c1")
    assert cache.stats()["misses"] == 2


def test_small_padded_image_scores_inside_the_image(golden_model, golden_dir):
    data = np.load(golden_dir / "cases_evaluation.npz")
    image = data["pad.image_rgb"]
    assert image.shape[:2] == (155, 225)
    s = UncertaintyScorer(golden_model).score(image)
    top, left = (256 - 155) // 2, (256 - 225) // 2
    x0, y0, x1, y1 = s.seed_box
    assert left <= x0 < x1 <= left + 225 and top <= y0 < y1 <= top + 155
    assert 0.0 <= s.score <= 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_prompts"):
        UncertaintyConfig(num_prompts=1)
    with pytest.raises(ValueError, match="method"):
        UncertaintyConfig(method="entropy")
