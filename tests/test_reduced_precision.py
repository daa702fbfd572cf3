"""The opt-in reduced-precision encoders (``--conf encoder_precision int8|bf16``) keep the golden masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.bench_model import golden_dice_change
from lib.io.checkpoint import load_model
from lib.io.image_source import read_image
from lib.modeling.reduced_precision import set_encoder_precision
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.prompt_inputs import parse_prompts


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_golden_masks_barely_change(golden_dir, precision):
    assert min(golden_dice_change(precision, golden_dir)) > -0.01


def test_fp32_is_left_as_it_is_and_unknown_precisions_are_refused(golden_dir, golden_config):
    model = load_model(golden_dir / "weights.pth", golden_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_encoder_precision(model, "fp32")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="precision"):
        set_encoder_precision(model, "int4")


def test_segmenter_serves_with_an_int8_encoder(golden_dir, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 170), dtype=np.uint8)).save(tmp_path / "ct.png")
    store = ModelStore(tmp_path / "model", golden_dir / "meta.json", golden_dir / "weights.pth")
    source = read_image(str(tmp_path / "ct.png"))
    prompts = parse_prompts({"foreground": [[80, 90]]}, source.view_hw, None)
    masks = [
        InteractiveSegmenter(store, encoder_precision=p).segment_view(source, prompts).mask for p in ("fp32", "int8")
    ]
    assert 2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum()) > 0.98


def test_int8_quantises_every_linear_layer_of_the_encoder(golden_dir, golden_config):
    model = load_model(golden_dir / "weights.pth", golden_config)
    set_encoder_precision(model, "int8")
    layers = [type(m) for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert not layers, layers
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.image_encoder.modules())


def test_the_bf16_encoder_holds_its_weights_as_autocast_casts_them(golden_dir, golden_config):
    """The bf16 encoder keeps its products' weights in bf16, cast once (half their memory, no cast per encode), and
    encodes exactly as bf16 autocast of the fp32 encoder does."""
    model = load_model(golden_dir / "weights.pth", golden_config)
    size = model.config.image_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.image_encoder(image).float()
    set_encoder_precision(model, "bf16")
    with torch.inference_mode():
        got = model.image_encoder(image)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    linear_weights = [m.weight for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_weights and all(w.dtype == torch.bfloat16 for w in linear_weights)


def test_a_served_bf16_model_takes_a_new_version_in_place(golden_dir, golden_config, tmp_path):
    """A published version reaches a served bf16 model in place, without a second model beside it: its weights become
    the new version's rounded to bf16, and it encodes exactly as a bf16 model built from that version."""
    from lib.modeling.build import build_model

    store = ModelStore(tmp_path / "model", golden_config, base_checkpoint=golden_dir / "weights.pth")
    segmenter = InteractiveSegmenter(store, encoder_precision="bf16")
    served, _ = segmenter.model()
    torch.manual_seed(1)
    store.publish(build_model(golden_config).state_dict(), {"val_dice": 0.5})
    model, _ = segmenter.model()
    assert model is served
    fresh = set_encoder_precision(store.load("cpu").eval(), "bf16")
    state, expected = model.state_dict(), fresh.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in state)
    size = model.config.image_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model.encode(image), fresh.encode(image))
