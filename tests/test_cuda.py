"""The CUDA paths: goldens in fp32, the served click path and the bf16 (AMP) training step.

Skipped without a GPU; the CPU tests cover the same behaviour there. On a GPU, cuDNN convolutions may use TF32, so
the golden tolerance is looser than on the CPU (where it is 1e-4) but still far below a mask-changing difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.io.checkpoint import load_model
from lib.modeling.build import build_model
from lib.serving.decoding import ServedDecoding
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.predictor import Predictor
from lib.serving.prompt_inputs import parse_prompts
from lib.training.iteration import SimulatedAnnotator
from lib.training.recipe import make_optimizer, parameter_groups, recipe
from tests.test_training_step import _batch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: these check the GPU paths on a machine with one"
)

CUDA_ATOL = 2e-3
GOLDEN_CASES = ("one_point", "box", "box_and_point")


@pytest.fixture(scope="module")
def cases(golden_dir: Path):
    return np.load(golden_dir / "cases.npz")


@pytest.fixture(scope="module")
def meta(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "meta.json").read_text())


@pytest.mark.parametrize("case", ["one_point", "box", "three_points", "box_and_point"])
def test_golden_predictor_cases_on_cuda(golden_dir: Path, golden_config: dict, cases, meta: dict, case: str) -> None:
    model = load_model(golden_dir / "weights.pth", golden_config, device="cuda")
    predictor = Predictor(model, preprocess="predictor")
    predictor.set_image(cases["image"])
    assert predictor.features.device.type == "cuda"
    inputs = {k[len(f"{case}.in.") :]: cases[k] for k in cases.files if k.startswith(f"{case}.in.")}
    multimask = meta["cases"][case]["multimask_output"]
    logits, iou, low_res = predictor.predict(**inputs, multimask_output=multimask, return_logits=True)
    np.testing.assert_allclose(logits, cases[f"{case}.masks_logits"], atol=CUDA_ATOL, rtol=0)
    np.testing.assert_allclose(iou, cases[f"{case}.iou"], atol=CUDA_ATOL, rtol=0)
    np.testing.assert_allclose(low_res, cases[f"{case}.low_res"], atol=CUDA_ATOL, rtol=0)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_served_click_path_on_cuda(golden_dir: Path, cases, meta: dict, tmp_path: Path, case: str) -> None:
    """What the server runs per click, on the GPU: the mask equals the golden logits > 0 wherever they are not
    within the GPU's rounding of zero, and the result comes back as a NumPy mask."""
    image = tmp_path / "golden.png"
    Image.fromarray(cases["image"]).save(image)
    store = ModelStore(tmp_path / "model", golden_dir / "meta.json", golden_dir / "weights.pth")
    segmenter = InteractiveSegmenter(store, device="cuda", decoding=ServedDecoding(policy="predictor"))
    segmenter.warm_up()
    spec = meta["cases"][case]
    request: dict = {"multimask_output": spec["multimask_output"]}
    if "point_coords" in spec:
        request["foreground"] = [p for p, label in zip(spec["point_coords"], spec["point_labels"]) if label == 1]
        request["background"] = [p for p, label in zip(spec["point_coords"], spec["point_labels"]) if label == 0]
    if "box" in spec:
        request["box"] = spec["box"]
    result = segmenter.segment(str(image), lambda source: parse_prompts(request, source.view_hw, None), reset=True)
    assert isinstance(result.mask, np.ndarray) and result.mask.dtype == bool
    golden_logits = cases[f"{case}.masks_logits"][0]
    decided = np.abs(golden_logits) > CUDA_ATOL
    np.testing.assert_array_equal(result.mask[decided], golden_logits[decided] > 0)
    assert result.iou == pytest.approx(float(cases[f"{case}.iou"].ravel()[0]), abs=CUDA_ATOL)
    again = segmenter.segment(str(image), lambda source: parse_prompts(request, source.view_hw, None), reset=True)
    assert again.embedding_cached is True


def test_bf16_training_step_changes_exactly_the_recipe_groups(golden_config: dict) -> None:
    """AMP (bf16 autocast) on CUDA: parameters stay fp32, the first step trains adapters, prompt encoder and decoder,
    the decoder-only steps only the decoder, frozen weights stay bit-identical, and the loss falls."""
    torch.manual_seed(0)
    model = build_model(golden_config).cuda()
    groups = parameter_groups(model)
    frozen_before = [p.detach().clone() for p in groups["frozen_encoder"]]
    other_before = {g: [p.detach().clone() for p in groups[g]] for g in ("adapters", "prompt_encoder")}
    config = recipe("continual", {"decoder_iterations": 3, "seed": 1, "amp": True})
    optimizer = make_optimizer(model, config)
    annotator = SimulatedAnnotator(config)
    images, labels, boxes = (t.cuda() for t in _batch())
    outputs = [annotator(model, optimizer, images, labels, boxes) for _ in range(6)]
    assert all(np.isfinite(o["loss"]) for o in outputs)
    assert outputs[-1]["loss"] < outputs[0]["loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for before, p in zip(frozen_before, groups["frozen_encoder"]):
        assert torch.equal(before, p.detach())
    for group, tensors in other_before.items():
        assert any(not torch.equal(b, p.detach()) for b, p in zip(tensors, groups[group])), group
