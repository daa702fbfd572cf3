"""Mask propagation through real volumes, asked of the real MONAI Label server over HTTP as Slicer and OHIF ask.

One server for the module with the golden_tiny network (fast on CPU). Its weights are not trained on CT, so the
confidence and area stops are relaxed (``propagate_min_iou`` 0, ``propagate_max_area_ratio`` 100) where a test needs
the walk to go on; what is checked is what a client relies on: the label covers exactly the slices the JSON lists, in
the volume's geometry, every direction says why it stopped, ``review_first`` is the least sure propagated slice, a
correction re-propagates outward only, and bad parameters are refused by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk  # noqa: N813
from PIL import Image

from lib.io.dicom_seg import read_seg, read_series
from lib.serving.propagation import AREA_JUMP_RATIO, DEFAULT_MIN_IOU, STOP_REASONS
from scripts.monailabel_server import server_log, start_server, stop_server
from tests.conftest import golden_conf
from tests.test_app_server import infer, read_label_file

pytestmark = pytest.mark.server

APP = "apps/sam_med2d"
CT = "example_ct_sm"  # TotalSegmentator CT, 122 x 101 x 30
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}
KEEP_WALKING = {"propagate_min_iou": 0, "propagate_max_area_ratio": 100}
SLICE_KEYS = {"slice", "iou", "area", "source", "updated"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    shutil.copy(data_dir / "nifti" / f"{CT}.nii.gz", folder)
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(folder / "picture.png")
    return folder


@pytest.fixture(scope="module")
def dcmqi_ct(studies: Path, data_dir: Path) -> Path:
    """The dcmqi CT series as a folder inside the datastore (a volume read with GDCM's slice order); image paths
    outside the datastore are refused."""
    folder = studies / "dcmqi_ct"
    folder.mkdir()
    for file in sorted((data_dir / "dicom_ct_seg").glob("0*.dcm")):
        shutil.copy(file, folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, studies: Path, golden_dir: Path):
    conf = golden_conf(golden_dir, tmp_path_factory.mktemp("model"))
    url = start_server(APP, studies, conf)
    yield url
    log = server_log(url)
    stop_server(url)
    assert "Traceback" not in log, log[-4000:]  # no request ended in an unhandled error (a 500)


def label_slices(label: sitk.Image) -> dict[int, np.ndarray]:
    """Non-empty slices ``k`` of an ``(I, J, K)`` label file -> their ``(J, I)`` masks."""
    array = sitk.GetArrayFromImage(label)  # (K, J, I)
    return {int(k): array[k] > 0 for k in np.flatnonzero(array.reshape(len(array), -1).any(axis=1))}


def check_answer(result: dict, label: sitk.Image) -> dict[int, np.ndarray]:
    """The JSON lists exactly the label's slices with their areas; stops and review_first are well formed."""
    propagation = result["propagation"]
    slices = label_slices(label)
    listed = {entry["slice"]: entry for entry in propagation["slices"]}
    assert set(listed) == set(slices)
    for k, entry in listed.items():
        assert set(entry) == SLICE_KEYS
        assert entry["area"] == int(slices[k].sum()) and 0 <= entry["iou"] <= 1.5
    assert all(stop["reason"] in STOP_REASONS for stop in propagation["stops"])
    propagated = {k: e["iou"] for k, e in listed.items() if e["source"] == "propagated"}
    assert propagation["review_first"] in propagated
    assert propagated[propagation["review_first"]] == min(propagated.values())
    return slices


def test_propagation_answers_the_whole_volume_as_slicer_asks(server: str, studies: Path, tmp_path: Path) -> None:
    params = {"box": [30, 30, 90, 70], "slice": 15, "propagate": "both", "propagate_slices": 5, **KEEP_WALKING}
    status, result, data, _ = infer(server, "sam_med2d_box", CT, {**SLICER, "client_id": "a", **params})
    assert status == 200, result
    label = read_label_file(data, ".nrrd", tmp_path)
    ct = sitk.ReadImage(str(studies / f"{CT}.nii.gz"))
    assert label.GetSize() == ct.GetSize()
    assert np.allclose(label.GetSpacing(), ct.GetSpacing()) and np.allclose(label.GetOrigin(), ct.GetOrigin())
    slices = check_answer(result, label)
    assert sorted(slices) == list(range(10, 21))  # 5 slices each way from 15
    assert [s["reason"] for s in result["propagation"]["stops"]] == ["propagate_slices", "propagate_slices"]
    assert result["slice"] == 15 and result["propagation"]["seconds_per_slice"] > 0


def test_correction_repropagates_outward_and_keeps_earlier_slices(server: str, tmp_path: Path) -> None:
    first = {"box": [30, 30, 90, 70], "slice": 15, "propagate": "both", "propagate_slices": 5, "reset": True}
    session = {**SLICER, "client_id": "b", "label": "organ", **KEEP_WALKING}
    status, result, data, _ = infer(server, "sam_med2d_box", CT, {**session, **first})
    assert status == 200, result
    before = label_slices(read_label_file(data, ".nrrd", tmp_path))

    correction = {"foreground": [[60, 50, 18]], "propagate": "both", "propagate_slices": 5}
    status, result, data, _ = infer(server, "sam_med2d_points", CT, {**session, **correction})
    assert status == 200, result
    after = check_answer(result, read_label_file(data, ".nrrd", tmp_path))
    listed = {e["slice"]: e for e in result["propagation"]["slices"]}
    assert {k for k, e in listed.items() if e["source"] == "user"} == {15, 18}
    down, up = sorted(result["propagation"]["stops"], key=lambda s: s["direction"])
    assert down == {"direction": "down", "reason": "user_slice", "slice": 15, "iou": None, "area": None}
    assert up["reason"] == "propagate_slices"
    assert {k for k, e in listed.items() if e["updated"]} == set(range(16, 24))  # 18, then 16-17 and 19-23
    for k in range(10, 16):  # the first prompt's slice and what lies beyond it were not touched
        assert np.array_equal(after[k], before[k]), k


def test_dcmqi_ct_propagates_from_a_box_on_its_seg(server: str, dcmqi_ct: Path, data_dir: Path, tmp_path: Path) -> None:
    series, _ = read_series(sorted(dcmqi_ct.glob("*.dcm")))
    liver = read_seg(data_dir / "dicom_ct_seg" / "liver.dcm", series).masks
    mask = next(iter(liver.values()))  # (I, J, K)
    k = 1
    i, j = np.nonzero(mask[:, :, k])
    box = [int(i.min()), int(j.min()), int(i.max()) + 1, int(j.max()) + 1]
    params = {"box": box, "slice": k, "propagate": "both", "window": [-160, 240], **KEEP_WALKING}
    status, result, data, _ = infer(server, "sam_med2d_box", str(dcmqi_ct), params)
    assert status == 200, result
    label = read_label_file(data, ".nii.gz", tmp_path)
    assert label.GetSize() == series.GetSize()
    assert np.allclose(label.GetOrigin(), series.GetOrigin(), atol=1e-3)
    slices = check_answer(result, label)
    assert sorted(slices) == [0, 1, 2]
    assert [s["reason"] for s in result["propagation"]["stops"]] == ["volume_end", "volume_end"]


def test_a_walk_without_thresholds_uses_the_defaults_info_names(server: str) -> None:
    defaults = {"propagate_min_iou": DEFAULT_MIN_IOU, "propagate_max_area_ratio": AREA_JUMP_RATIO}
    info = requests.get(f"{server}/info/", timeout=60).json()
    assert all(info["models"][m]["propagation_defaults"] == defaults for m in ("sam_med2d_points", "sam_med2d_box"))
    params = {"box": [30, 30, 90, 70], "slice": 15, "propagate": "both", "propagate_slices": 1, "client_id": "d"}
    status, result, _, _ = infer(server, "sam_med2d_box", CT, params)
    assert status == 200, result
    used = result["propagation"]
    assert (used["min_iou"], used["max_area_ratio"]) == (DEFAULT_MIN_IOU, AREA_JUMP_RATIO)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"propagate": "sideways"}, "propagate"),
        ({"propagate": "both", "propagate_slices": 0}, "propagate_slices"),
        ({"propagate": "both", "propagate_slices": 2.5}, "propagate_slices"),
        ({"propagate": "up", "propagate_min_iou": 1.5}, "propagate_min_iou"),
        ({"propagate": "up", "propagate_min_iou": "high"}, "propagate_min_iou"),
        ({"propagate": "down", "propagate_max_area_ratio": 0.5}, "propagate_max_area_ratio"),
        ({"propagate_slices": -3}, "propagate_slices"),  # checked even when not propagating
    ],
)
def test_bad_propagation_parameters_are_refused_by_name(server: str, params: dict, named: str) -> None:
    status, result, _, _ = infer(server, "sam_med2d_box", CT, {"box": [30, 30, 90, 70], "slice": 15, **params})
    assert status == 400 and named in result["detail"], result


def test_propagation_on_a_picture_is_refused(server: str) -> None:
    status, result, _, _ = infer(server, "sam_med2d_points", "picture", {"foreground": [[5, 5]], "propagate": "both"})
    assert status == 400 and "needs a volume" in result["detail"], result
