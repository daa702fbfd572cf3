"""``python -m lib.export onnx`` writes files that ONNX Runtime runs to the torch model's outputs (golden tiny
weights)."""

from __future__ import annotations

import json

import pytest
import torch

from lib.checkpoint import load_model
from lib.export import main as export_main

ort = pytest.importorskip("onnxruntime")

from lib.onnx_backend import OnnxSamMed2D, onnx_prompts  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def config_path(golden_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(golden_config))
    return path


def _export(golden_dir, config_path, out, *flags):
    argv = ["onnx", "--checkpoint", str(golden_dir / "weights.pth"), "--config", str(config_path), "--out", str(out)]
    assert export_main([*argv, *flags]) == 0
    return OnnxSamMed2D(out, threads=1)


@pytest.fixture(scope="module")
def model(golden_dir, golden_config):
    return load_model(golden_dir / "weights.pth", golden_config)


@pytest.fixture(scope="module")
def runtime(golden_dir, config_path, tmp_path_factory):
    return _export(golden_dir, config_path, tmp_path_factory.mktemp("onnx"))


def test_encoder_matches_torch(model, runtime):
    torch.manual_seed(0)
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = model.encode(image)
    torch.testing.assert_close(runtime.encode(image), expected, atol=ATOL, rtol=0)


def test_encoder_without_adapters(golden_dir, golden_config, config_path, tmp_path):
    plain = load_model(golden_dir / "weights.pth", golden_config, adapters=False)
    runtime = _export(golden_dir, config_path, tmp_path, "--no-adapters")
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = plain.encode(image)
    torch.testing.assert_close(runtime.encode(image), expected, atol=ATOL, rtol=0)


PROMPTS = {
    "points": dict(
        point_coords=torch.tensor([[[40.0, 60.0], [120.0, 90.0]], [[200.0, 30.0], [10.0, 250.0]]]),
        point_labels=torch.tensor([[1, 0], [1, 1]]),
        boxes=None,
    ),
    "box": dict(point_coords=None, point_labels=None, boxes=torch.tensor([[30.0, 40.0, 150.0, 170.0]])),
    "points+box": dict(
        point_coords=torch.tensor([[[90.0, 100.0]]]),
        point_labels=torch.tensor([[0]]),
        boxes=torch.tensor([[30.0, 40.0, 150.0, 170.0]]),
    ),
}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_decoder_matches_torch_for_every_output(model, runtime, prompt, with_mask):
    torch.manual_seed(1)
    kwargs = PROMPTS[prompt]
    with torch.no_grad():
        features = model.encode(torch.randn(1, 3, 256, 256))
        rows = next(t for t in (kwargs["point_coords"], kwargs["boxes"]) if t is not None).shape[0]
        mask = torch.randn(rows, 1, 64, 64) * 4 if with_mask else None
        points = (kwargs["point_coords"], kwargs["point_labels"]) if kwargs["point_coords"] is not None else None
        sparse, dense = model.prompt_encoder(points, kwargs["boxes"], mask)
        expected = model.mask_decoder.predict_masks(features, model.prompt_encoder.get_dense_pe(), sparse, dense)
    coords, labels = onnx_prompts(kwargs["point_coords"], kwargs["point_labels"], kwargs["boxes"])
    masks, iou = runtime.decode_all(features, coords, labels, mask)
    assert masks.shape == (rows, 4, 64, 64) and iou.shape == (rows, 4)
    torch.testing.assert_close(masks, expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, expected[1], atol=ATOL, rtol=0)
