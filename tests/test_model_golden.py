"""The network and predictor reproduce the published implementation's outputs (golden_tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lib.io.checkpoint import load_model
from lib.serving.predictor import Predictor

LOGIT_ATOL = 1e-4
FEATURE_RTOL = 1e-3


@pytest.fixture(scope="module")
def model(golden_dir, golden_config):
    return load_model(golden_dir / "weights.pth", golden_config)


@pytest.fixture(scope="module")
def cases(golden_dir):
    return np.load(golden_dir / "cases.npz")


@pytest.fixture(scope="module")
def evaluation_cases(golden_dir):
    return np.load(golden_dir / "cases_evaluation.npz")


@pytest.fixture(scope="module")
def meta(golden_dir):
    return json.loads((golden_dir / "meta.json").read_text())


def _case_inputs(arrays, prefix: str) -> dict:
    return {k[len(prefix) :]: arrays[k] for k in arrays.files if k.startswith(prefix)}


def _assert_features(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= FEATURE_RTOL * scale


def test_encoder_output_matches(model, cases):
    with torch.no_grad():
        out = model.encode(torch.from_numpy(cases["encoder_input"])).numpy()
    _assert_features(out, cases["encoder_output"])


def test_predictor_features_match(model, cases):
    predictor = Predictor(model, preprocess="predictor")
    predictor.set_image(cases["image"])
    _assert_features(predictor.features.numpy(), cases["features"])


@pytest.mark.parametrize("case", ["one_point", "box", "three_points", "box_and_point"])
def test_predictor_policy_prompt_cases(model, cases, meta, case):
    predictor = Predictor(model, preprocess="predictor")
    predictor.set_image(cases["image"])
    inputs = _case_inputs(cases, f"{case}.in.")
    multimask = meta["cases"][case]["multimask_output"]
    logits, iou, low_res = predictor.predict(**inputs, multimask_output=multimask, return_logits=True)
    np.testing.assert_allclose(logits, cases[f"{case}.masks_logits"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(iou, cases[f"{case}.iou"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(low_res, cases[f"{case}.low_res"], atol=LOGIT_ATOL, rtol=0)
    masks, _, _ = predictor.predict(**inputs, multimask_output=multimask)
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks, logits > 0)


@pytest.mark.parametrize("case", ["pad", "colour"])
@pytest.mark.parametrize("prompt", ["box", "point"])
def test_evaluation_policy_cases(model, evaluation_cases, case, prompt):
    arrays = evaluation_cases
    predictor = Predictor(model, preprocess="evaluation")
    predictor.set_image(arrays[f"{case}.image_rgb"])
    _assert_features(predictor.features.numpy(), arrays[f"{case}.features"])
    inputs = _case_inputs(arrays, f"{case}.{prompt}.in.")
    logits, iou, low_res = predictor.predict(**inputs, multimask_output=True, return_logits=True)
    assert logits.shape[-2:] == arrays[f"{case}.image_rgb"].shape[:2]
    np.testing.assert_allclose(logits, arrays[f"{case}.{prompt}.masks_logits"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(iou, arrays[f"{case}.{prompt}.iou"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(low_res, arrays[f"{case}.{prompt}.low_res"], atol=LOGIT_ATOL, rtol=0)


def test_policies_differ_on_colour_images(model, evaluation_cases):
    """The colour case only matches with BGR order: the predictor policy must give other features."""
    predictor = Predictor(model, preprocess="predictor")
    predictor.set_image(evaluation_cases["colour.image_rgb"])
    expected = evaluation_cases["colour.features"]
    assert np.abs(predictor.features.numpy() - expected).max() > 1e-2 * np.abs(expected).max()


def test_many_prompts_in_one_call_equal_single_calls(model, cases):
    predictor = Predictor(model, preprocess="predictor")
    predictor.set_image(cases["image"])
    boxes = np.array([[40, 30, 200, 150], [10, 10, 120, 100], [100, 60, 250, 170]], dtype=np.float64)
    batched_logits, batched_iou, _ = predictor.predict(box=boxes, multimask_output=True, return_logits=True)
    assert batched_logits.shape == (3, 1, 181, 258)
    for i, box in enumerate(boxes):
        logits, iou, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
        np.testing.assert_allclose(batched_logits[i], logits, atol=1e-5)
        np.testing.assert_allclose(batched_iou[i], iou, atol=1e-5)


def test_adapters_switch_off_at_run_time(golden_dir, golden_config, cases):
    with_adapters = load_model(golden_dir / "weights.pth", golden_config)
    without = load_model(golden_dir / "weights.pth", golden_config, adapters=False)
    x = torch.from_numpy(cases["encoder_input"])
    with torch.no_grad():
        a, b = with_adapters.encode(x), without.encode(x)
        assert not torch.allclose(a, b, atol=1e-3)
        # Turning the branch off equals a model built without adapters loaded with the same other weights.
        config = dict(golden_config, encoder_adapter=False)
        state = {k: v for k, v in with_adapters.state_dict().items() if ".Adapter." not in k}
        from lib.modeling.build import build_model

        plain = build_model(config).eval()
        plain.load_state_dict(state)
        torch.testing.assert_close(plain.encode(x), b)
        without.set_adapters_enabled(True)
        torch.testing.assert_close(without.encode(x), a)
