"""Which weights the served app uses: offline start on untrained weights, and retrained weights picked up live.

The server starts with no checkpoint and a download that cannot succeed (a closed local port stands in for "no
network"), serves seeded random weights with a loud warning, and switches to weights published through
:class:`lib.serving.model_store.ModelStore` (as the trainer does) on the next request, without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from lib.io.checkpoint import read_state_dict
from lib.io.image_source import read_image
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.prompt_inputs import parse_prompts
from scripts.monailabel_server import free_port, server_log, start_server, stop_server
from tests.test_app_server import infer, read_png

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path):
    studies = tmp_path_factory.mktemp("studies")
    image = np.load(golden_dir / "cases.npz")["image"]
    Image.fromarray(image).save(studies / "ct.png")
    model_dir = tmp_path_factory.mktemp("model")
    conf = {
        "model": golden_dir / "meta.json",
        "model_dir": model_dir,
        "download_url": f"http://127.0.0.1:{free_port()}/sam-med2d_b.pth",
        "seed": 3,
    }
    url = start_server("apps/sam_med2d", studies, conf)
    yield url, studies, model_dir
    stop_server(url)


def test_offline_start_serves_untrained_weights_loudly(setup) -> None:
    url, _, model_dir = setup
    info = requests.get(f"{url}/info/").json()["sam_med2d"]
    assert info["trained_weights"] is False and info["model_version"] == "random-init"
    assert "UNTRAINED" in info["warning"] and "drive.google.com" in info["warning"]
    assert info["preprocessing"] == "evaluation"  # the default policy
    log = server_log(url)
    assert "Could not download the published SAM-Med2D weights" in log
    assert "PREDICTIONS COME FROM UNTRAINED" in log
    assert not (model_dir / "sam-med2d_b.pth").exists() and not (model_dir / "sam-med2d_b.pth.part").exists()
    status, result, _, _ = infer(url, "sam_med2d_points", "ct", {"foreground": [[120, 90]]})
    assert status == 200 and result["trained_weights"] is False and "warning" in result


def test_published_weights_serve_the_next_request(setup, golden_dir: Path) -> None:
    url, studies, model_dir = setup
    click = {"foreground": [[120, 90]], "reset": True}
    status, before, before_png, _ = infer(url, "sam_med2d_points", "ct", click)
    assert status == 200 and before["model_version"] == "random-init"

    store = ModelStore(model_dir, golden_dir / "meta.json", seed=3)  # the server's store, as its trainer has it
    state, _ = read_state_dict(golden_dir / "weights.pth")
    version = store.publish(state, {"dice": 0.5})

    status, after, after_png, _ = infer(url, "sam_med2d_points", "ct", click)
    assert status == 200, after
    assert after["model_version"] == version and after["trained_weights"] is True
    assert after["embedding_cached"] is False  # new weights, new embedding
    reference = InteractiveSegmenter(ModelStore(model_dir, golden_dir / "meta.json", seed=3))
    source = read_image(studies / "ct.png")
    expected = reference.segment_view(source, parse_prompts(click, source.view_hw, None))
    np.testing.assert_array_equal(read_png(after_png).astype(bool), expected.mask)
    assert not np.array_equal(read_png(before_png), read_png(after_png))
    info = requests.get(f"{url}/info/").json()["sam_med2d"]
    assert info["model_version"] == version and "warning" not in info
    assert json.loads((model_dir / "current.json").read_text())["version"] == version


def test_versions_of_another_architecture_do_not_stop_the_server(tmp_path: Path, golden_dir: Path) -> None:
    """A model_dir holding a version trained with another network config (same folder, another --conf model): the
    server starts on the base weights, says so loudly in its log and /info, and answers clicks."""
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(np.load(golden_dir / "cases.npz")["image"]).save(studies / "ct.png")
    golden = json.loads((golden_dir / "meta.json").read_text())["config"]
    other = {**golden, "encoder_depth": golden["encoder_depth"] + 1}
    other_store = ModelStore(tmp_path / "model", other)
    version = other_store.publish(other_store.load(), {"val_dice": {"mean": 0.9}})
    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "model_dir": tmp_path / "model",
    }
    url = start_server("apps/sam_med2d", studies, conf)
    try:
        info = requests.get(f"{url}/info/").json()["sam_med2d"]
        assert info["model_version"] == "base" and info["trained_weights"] is True
        assert version in info["published_not_served"] and "encoder_depth" in info["published_not_served"]
        assert "NOT SERVING THE PUBLISHED MODEL" in server_log(url) and "encoder_depth" in server_log(url)
        status, result, _, _ = infer(url, "sam_med2d_points", "ct", {"foreground": [[120, 90]]})
        assert status == 200 and result["model_version"] == "base"
    finally:
        stop_server(url)
