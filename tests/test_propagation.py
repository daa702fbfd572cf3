"""The prompts a propagated slice gets from the slice before it."""

from __future__ import annotations

import numpy as np

from lib.serving.propagation import CLICKED_REGIONS, next_prompts


def test_every_larger_region_of_the_previous_mask_gets_a_click_inside_it() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:25, 5:25] = True  # 400 pixels
    mask[10:20, 40:55] = True  # 150 pixels
    mask[35:38, 40:43] = True  # 9 pixels: under a tenth of the largest, no click
    coords, labels, box = next_prompts(mask)
    assert coords.shape == (2, 2) and labels.tolist() == [1, 1]
    assert [bool(mask[int(y), int(x)]) for x, y in coords] == [True, True]
    assert coords[0, 0] < 25 < coords[1, 0]  # the largest region first
    assert box.tolist() == [5, 5, 55, 38]


def test_at_most_clicked_regions_clicks() -> None:
    mask = np.zeros((20, 100), dtype=bool)
    for left in range(0, 100, 20):
        mask[5:15, left + 2 : left + 12] = True
    coords, labels, _ = next_prompts(mask)
    assert len(coords) == len(labels) == CLICKED_REGIONS
