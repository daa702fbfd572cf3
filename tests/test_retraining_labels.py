"""Counting final labels in a real MONAI Label datastore: saved through the API, copied in as files, replaced."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from monailabel.datastore.local import LocalDatastore
from PIL import Image

from apps.sam_med2d.retraining_scheduler import final_label_stamps
from lib.loop.retraining import RetrainingController, RetrainPolicy


@pytest.fixture()
def datastore(tmp_path, data_dir):
    studies = tmp_path / "studies"
    studies.mkdir()
    sources = sorted((data_dir / "hc18" / "images").glob("*_HC.png"))[:3]
    for src in sources:
        (studies / src.name).symlink_to(src)
    return LocalDatastore(str(studies), extensions=["*.png"], auto_reload=False)


def _label_file(tmp_path, name, value=1):
    path = tmp_path / f"{name}.png"
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def test_labels_saved_copied_and_replaced_all_count(datastore, tmp_path):
    ids = sorted(datastore.list_images())
    ctl = RetrainingController(tmp_path / "state.json", RetrainPolicy(after_labels=2))
    assert final_label_stamps(datastore) == {}

    datastore.save_label(ids[0], str(_label_file(tmp_path, "a")), "final", {})
    stamps = final_label_stamps(datastore)
    assert list(stamps) == [ids[0]]
    assert ctl.poll(stamps, busy=False) is None

    # a label copied into labels/final by hand, as an administrator might: seen after a refresh
    final_dir = os.path.join(datastore._datastore_path, "labels", "final")
    shutil.copy(_label_file(tmp_path, "b"), os.path.join(final_dir, f"{ids[1]}.png"))
    stamps = final_label_stamps(datastore, refresh=True)
    assert set(stamps) == {ids[0], ids[1]}
    trigger = ctl.poll(stamps, busy=False)
    assert trigger is not None and trigger.kind == "labels"
    ctl.started(trigger, stamps, "t1", "base")
    ctl.finished("promoted", "v0001")

    # replacing a label with different content is a new label for the next run
    before = final_label_stamps(datastore)
    datastore.save_label(ids[0], str(_label_file(tmp_path, "c", value=2)), "final", {})
    after = final_label_stamps(datastore)
    assert after[ids[0]] != before[ids[0]] and after[ids[1]] == before[ids[1]]
    assert ctl.new_labels(after) == [ids[0]]
