"""Checkpoint layouts, conversion and clear errors; nothing pickled is ever executed."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from lib.io.checkpoint import CheckpointError, load_model, read_state_dict
from lib.modeling.build import build_model
from tests.conftest import ROOT


def test_vit_b_keys_and_shapes_equal_the_published_model(spec_dir):
    expected = json.loads((spec_dir / "sam_med2d_vit_b_256_state_dict.json").read_text())
    state = build_model("vit_b").state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in build_model("vit_b").parameters()) == 271_241_776


@pytest.fixture
def train_script_checkpoint(tmp_path, golden_dir, golden_config):
    """The tiny weights as the published ``train.py`` saves them: the state dict next to the pickled optimizer."""
    model = load_model(golden_dir / "weights.pth", golden_config)
    path = tmp_path / "weights_trainpy_layout.pth"
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.Adam(model.parameters(), lr=1e-4)}, path)
    return path


def test_train_script_layout_loads_with_weights_only_semantics(train_script_checkpoint, golden_dir, golden_config):
    path = train_script_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    state, layout = read_state_dict(path)
    assert layout == "train-script"
    reference = torch.load(golden_dir / "weights.pth", weights_only=True)["model"]
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    load_model(path, golden_config)


def test_pickled_code_is_never_executed(tmp_path, golden_config):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": Exploit()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path, golden_config)
    assert not marker.exists()


def test_original_sam_is_converted_as_published(golden_dir, golden_config):
    model = load_model(golden_dir / "sam_original_1024.pth", golden_config)
    _, layout = read_state_dict(golden_dir / "sam_original_1024.pth")
    assert layout == "sam-original"
    # What the published conversion changes (position embedding, relative positions); the rest it keeps as is.
    changed = torch.load(golden_dir / "sam_original_converted_256_changed.pth", weights_only=True)
    original = torch.load(golden_dir / "sam_original_1024.pth", weights_only=True)
    reference = {k: changed.get(k, v) for k, v in original.items()}
    assert changed.keys() < reference.keys() and len(reference) == 230
    state = model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=key)
    adapters = [k for k in state if ".Adapter." in k]
    assert adapters and not set(adapters) & set(reference)
    assert state["image_encoder.blocks.0.Adapter.spatial.0.weight"].std() > 0


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_command_round_trip(tmp_path, train_script_checkpoint, golden_dir, suffix):
    target = tmp_path / f"converted{suffix}"
    config = golden_dir / "meta.json"
    result = subprocess.run(
        [sys.executable, "-m", "lib.io.checkpoint", "convert", str(train_script_checkpoint),
         str(target), "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    if suffix == ".pt":
        torch.load(target, weights_only=True)  # plain state dict: loads with plain weights_only
    a = load_model(target, config).state_dict()
    b = load_model(golden_dir / "weights.pth", config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_truncated_file_fails_clearly(tmp_path, golden_dir, golden_config):
    data = (golden_dir / "weights.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|cannot read"):
        load_model(path, golden_config)


def test_not_a_checkpoint_fails_clearly(tmp_path, golden_config):
    path = tmp_path / "image.pth"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path, golden_config)
    missing = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="not found"):
        load_model(missing, golden_config)
    other = tmp_path / "other.pth"
    torch.save({"epoch": torch.tensor(3), "lr": torch.tensor(1.0)}, other)
    with pytest.raises(CheckpointError, match="unexpected keys: epoch, lr"):
        load_model(other, golden_config)
    assert zipfile.is_zipfile(other)


def test_other_architecture_names_the_mismatches(golden_dir, golden_config):
    with pytest.raises(CheckpointError, match=r"shape mismatches: image_encoder.pos_embed \(1, 16, 16, 64\)"):
        load_model(golden_dir / "weights.pth", "vit_b")
    deeper = dict(golden_config, encoder_depth=7)
    with pytest.raises(CheckpointError, match="missing keys: image_encoder.blocks.6"):
        load_model(golden_dir / "weights.pth", deeper)


def test_missing_and_unexpected_keys_are_named(tmp_path, golden_dir, golden_config):
    state = torch.load(golden_dir / "weights.pth", weights_only=True)["model"]
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, golden_config)
    assert "missing keys: mask_decoder.iou_token.weight" in str(info.value)
    assert "unexpected keys: mask_decoder.extra_head.weight" in str(info.value)


def test_ddp_prefix_and_bare_state_dict(tmp_path, golden_dir, golden_config):
    state = torch.load(golden_dir / "weights.pth", weights_only=True)["model"]
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = load_model(path, golden_config)
    assert np.allclose(model.state_dict()["image_encoder.pos_embed"].numpy(), state["image_encoder.pos_embed"].numpy())
