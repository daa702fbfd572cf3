"""Crash safety of the served model through the real server: a publish killed with SIGKILL at random points, then a
restart, serves one consistent version (weights and metadata of the same version); an empty served file does not
stop the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from lib.modeling.build import build_model
from scripts.monailabel_server import ROOT, server_log, start_server, stop_server

pytestmark = pytest.mark.server

PUBLISHER = """
import sys, torch
from lib.modeling.build import build_model
from lib.serving.model_store import ModelStore
golden = sys.argv[2]
store = ModelStore(sys.argv[1], golden + "/meta.json", base_checkpoint=golden + "/weights.pth")
seed = 100
while True:
    torch.manual_seed(seed)
    store.publish(build_model(store.config).state_dict(), {"seed": seed})
    seed += 1
"""


def _served(url: str) -> dict:
    info = requests.get(f"{url}/info/", timeout=30).json()["sam_med2d"]
    response = requests.post(
        f"{url}/infer/sam_med2d_points",
        params={"image": "picture", "output": "json"},
        files={"params": (None, json.dumps({"foreground": [[20, 20]]}))},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == info["model_version"]
    return info


def test_kill_during_publish_then_restart_serves_one_consistent_version(
    tmp_path: Path, golden_dir: Path, golden_config: dict
) -> None:
    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    studies.mkdir()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (48, 1))).save(studies / "picture.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (1.5, 2.2, 2.9):  # the publisher's imports take about 1 s; then it publishes in a tight loop
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(model_dir), str(golden_dir)], env=env)
        time.sleep(delay)
        publisher.send_signal(signal.SIGKILL)
        publisher.wait()
    current = json.loads((model_dir / "current.json").read_text())["version"]
    assert len(list((model_dir / "versions").iterdir())) <= 6  # kept versions bounded (5, and one cut short)

    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "model_dir": model_dir,
        "download": "false",
    }
    url = start_server("apps/sam_med2d", studies, conf)
    try:
        info = _served(url)
        assert info["model_version"] == current and "published_not_served" not in info, server_log(url)[-3000:]
        weights = Path(info["weights"])
        assert weights == model_dir / "versions" / current / "model.pt"
        seed = json.loads((weights.parent / "metrics.json").read_text())["metrics"]["seed"]
        torch.manual_seed(seed)
        expected = build_model(golden_config).state_dict()
        served = torch.load(weights, weights_only=True)
        assert all(torch.equal(served[k], expected[k]) for k in expected)  # weights and metadata agree
    finally:
        stop_server(url)

    # The served file emptied (a disk that filled up): the server still starts, on the newest readable version.
    weights.write_bytes(b"")
    url = start_server("apps/sam_med2d", studies, conf)
    try:
        info = _served(url)
        assert info["model_version"] not in (current, "base"), info
        assert "empty" in info["published_not_served"]
    finally:
        stop_server(url)
