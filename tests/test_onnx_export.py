"""``python -m lib.serving.export onnx`` writes files that ONNX Runtime runs to the torch model's outputs (golden tiny
weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib.io.checkpoint import load_model
from lib.io.image_source import read_image
from lib.serving.decoding import ServedDecoding, decode_rows
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.export import main as export_main
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.onnx_backend import OnnxDecoder, OnnxSamMed2D
from lib.serving.prompt_inputs import parse_prompts

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
    masks, iou = runtime.decoder(features, kwargs["point_coords"], kwargs["point_labels"], kwargs["boxes"], mask)
    assert masks.shape == (rows, 4, 64, 64) and iou.shape == (rows, 4)
    torch.testing.assert_close(masks, expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(iou, expected[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("multimask", [True, False])
def test_served_decoding_through_onnxruntime_keeps_the_same_mask(model, multimask):
    """``--conf backend onnxruntime``: lib.serving.decoding's rule (kept output, previous mask as the next prompt) on
    the ONNX decoder gives the torch decoder's logits."""
    torch.manual_seed(2)
    with torch.no_grad():
        features = model.encode(torch.randn(1, 3, 256, 256))
    decoding = ServedDecoding()
    torch_entry = CachedEmbedding(features, None)
    onnx_entry = CachedEmbedding(features, None, {"onnx_decoder": OnnxDecoder.from_model(model)})
    coords, labels = torch.tensor([[[70.0, 80.0], [150.0, 40.0]]]), torch.tensor([[1, 0]])
    previous = None
    for _ in range(2):  # a click, then a correction with the previous mask
        with torch.no_grad():
            expected = decode_rows(model, torch_entry, decoding, coords, labels, None, previous, multimask)
        low_res, iou = decode_rows(model, onnx_entry, decoding, coords, labels, None, previous, multimask)
        torch.testing.assert_close(low_res, expected[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(iou, expected[1], atol=ATOL, rtol=0)
        previous = expected[0]


def test_segmenter_with_the_onnxruntime_backend_serves_the_torch_masks(golden_dir, tmp_path):
    """The engine behind ``--conf backend onnxruntime``: a click and a correction give the torch backend's masks."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (181, 222), dtype=np.uint8)).save(tmp_path / "ct.png")
    store = ModelStore(tmp_path / "model", golden_dir / "meta.json", golden_dir / "weights.pth")
    segmenters = [InteractiveSegmenter(store, backend=backend) for backend in ("torch", "onnxruntime")]
    source = read_image(str(tmp_path / "ct.png"))
    for click in ({"foreground": [[120, 90]]}, {"foreground": [[120, 90]], "background": [[40, 150]]}):
        prompts = parse_prompts(click, source.view_hw, None)
        expected, result = (s.segment_view(source, prompts, client_id="c", label="l") for s in segmenters)
        assert result.used_previous_mask == expected.used_previous_mask
        torch.testing.assert_close(result.low_res, expected.low_res, atol=ATOL, rtol=0)
        assert np.mean(result.mask != expected.mask) < 1e-3  # only pixels whose logit is within ATOL of 0 may differ
    with pytest.raises(ValueError, match="backend"):
        InteractiveSegmenter(store, backend="tensorrt")
