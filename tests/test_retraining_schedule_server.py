"""The interval trigger, the one queued run and a failing run against the real MONAI Label server.

The runs the scheduler starts carry a learning rate the trainer rejects, so each fails within seconds: the test sees
the interval trigger start a run, the interval firing again during it queue exactly one more, that queued run start
when the first ends, and both recorded as failed with the trainer's reason while the served model stays.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests

from scripts.monailabel_server import server_log, start_server, stop_server
from tests.conftest import golden_conf

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_interval_trigger_queues_one_more_run_and_failures_leave_the_model(tmp_path, data_dir, golden_dir):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    images = sorted((data_dir / "hc18" / "images").glob("*_HC.png"))[:3]
    for image in images:
        (studies / image.name).symlink_to(image)
    shutil.copy(data_dir / "hc18" / "masks" / images[0].name, studies / "labels" / "final" / images[0].name)
    conf = golden_conf(
        golden_dir,
        tmp_path / "model",
        device="cpu",
        retrain_interval_minutes=0.05,
        retrain_schedule_without_new_labels="true",
        retrain_poll_seconds=1,
        retrain_params=json.dumps({"lr": "fast"}, separators=(",", ":")),
    )
    url = start_server("apps/sam_med2d", studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        deadline = time.monotonic() + 240
        info: dict = {}
        while time.monotonic() < deadline:
            info = requests.get(f"{url}/info/", timeout=30).json()["retraining"]
            if len(info["history"]) >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"two runs did not end in time: {info}\n{server_log(url)[-6000:]}")
        first, second = info["history"][:2]
        assert first["trigger"] == "interval" and "interval of 0.05 min elapsed" in first["reason"]
        assert second["trigger"] == "queued" and second["reason"].startswith("queued: interval")
        for run in (first, second):
            assert run["status"] == "failed", run
            assert "lr='fast'" in run["message"], run["message"]
            assert run["version_before"] == run["version_after"] == "base"
        assert info["active_version"] == "base" and info["versions"] == []
        assert info["next_scheduled"] is not None
        assert not (tmp_path / "model" / "current.json").exists()
        log = server_log(url)
        assert "Retraining: run 1 ended: failed; serving base" in log
        assert "while a run is in progress; one more run queued" in log
    finally:
        stop_server(url)
