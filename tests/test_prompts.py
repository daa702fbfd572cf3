"""The prompt sampler shared by training and evaluation: where clicks land, with which labels, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.serving.prompts import PromptRandom, error_clicks, jitter_boxes, largest_component_box, random_points


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth squares and predictions shifted from them: both false negatives and false positives exist."""
    target = torch.zeros(4, 64, 64, dtype=torch.bool)
    target[:, 10:40, 10:40] = True
    prediction = torch.zeros_like(target)
    prediction[:, 20:50, 20:50] = True
    return prediction, target


def test_error_clicks_land_only_in_the_error_region_with_the_right_labels() -> None:
    prediction, target = _masks()
    coords, labels = error_clicks(prediction, target, 9, PromptRandom(0))
    assert coords.shape == (4, 9, 2) and labels.shape == (4, 9)
    rows = torch.arange(4)[:, None]
    xs, ys = coords[..., 0].long(), coords[..., 1].long()
    in_pred = prediction[rows, ys, xs]
    in_target = target[rows, ys, xs]
    assert bool((in_pred != in_target).all()), "a click fell outside the error region"
    assert torch.equal(labels == 1, in_target & ~in_pred), "false negatives must be positive clicks"
    assert torch.equal(labels == 0, in_pred & ~in_target), "false positives must be negative clicks"


def test_error_clicks_cover_the_error_region_uniformly() -> None:
    prediction, target = _masks()
    coords, labels = error_clicks(prediction[:1], target[:1], 20000, PromptRandom(1))
    # The two error areas have equal size (30x30 - 20x20 = 500 pixels each): about half the clicks in each.
    share_positive = labels.float().mean().item()
    assert 0.47 < share_positive < 0.53
    xs, ys = coords[0, :, 0].long(), coords[0, :, 1].long()
    counts = np.bincount((ys * 64 + xs).numpy(), minlength=64 * 64)
    region = (prediction[0] ^ target[0]).flatten().numpy()
    assert counts[~region].sum() == 0
    assert (counts[region] > 0).mean() > 0.99  # practically every error pixel can be drawn


def test_a_perfect_prediction_gets_confirming_clicks() -> None:
    _, target = _masks()
    coords, labels = error_clicks(target.clone(), target, 50, PromptRandom(2))
    rows = torch.arange(4)[:, None]
    expected = target[rows, coords[..., 1].long(), coords[..., 0].long()].long()
    assert torch.equal(labels, expected)
    assert labels.min() == 0 and labels.max() == 1  # drawn from the whole image, not only inside


def test_first_point_is_foreground_and_empty_masks_click_background() -> None:
    _, target = _masks()
    target[3] = False
    coords, labels = random_points(target, PromptRandom(3), 5)
    rows = torch.arange(4)[:, None]
    hit = target[rows, coords[..., 1].long(), coords[..., 0].long()]
    assert bool(hit[:3].all()) and labels[:3].eq(1).all()
    assert not bool(hit[3].any()) and labels[3].eq(0).all()


def test_largest_component_box_is_exclusive_xyxy_of_the_biggest_component() -> None:
    mask = np.zeros((50, 60), dtype=bool)
    mask[5:10, 5:10] = True  # small
    mask[20:41, 30:52] = True  # large: rows 20..40, cols 30..51
    assert largest_component_box(mask).tolist() == [30, 20, 52, 41]
    assert largest_component_box(np.zeros((8, 9), bool)).tolist() == [0, 0, 9, 8]


def test_box_jitter_is_one_bounded_translation() -> None:
    boxes = torch.tensor([[30.0, 20.0, 130.0, 120.0]]).repeat(500, 1)
    jittered = jitter_boxes(boxes, PromptRandom(4), max_shift=5)
    shift = jittered - boxes
    assert torch.equal(shift[:, :2], shift[:, 2:]), "the box must keep its size"
    assert shift.min() >= -5 and shift.max() <= 4 and torch.equal(shift, shift.round())
    assert len(torch.unique(shift[:, 0])) == 10  # every shift in [-5, 5) occurs
    small = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(50, 1)  # 5 * 0.1 * 4 = 2 -> shifts in [-2, 2)
    assert (jitter_boxes(small, PromptRandom(4)) - small).abs().max() <= 2
    assert torch.equal(jitter_boxes(boxes, PromptRandom(4), max_shift=0), boxes)


def test_draws_are_seeded_and_independent_of_how_rows_are_split() -> None:
    prediction, target = _masks()
    whole = error_clicks(prediction, target, 3, PromptRandom(7))
    again = error_clicks(prediction, target, 3, PromptRandom(7))
    assert torch.equal(whole[0], again[0])
    halves = [
        error_clicks(prediction[r * 2 : r * 2 + 2], target[r * 2 : r * 2 + 2], 3, PromptRandom(7, r, 2)) for r in (0, 1)
    ]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    with pytest.raises(ValueError):
        PromptRandom(0, rank=2, world_size=2)
