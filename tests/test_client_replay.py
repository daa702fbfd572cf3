"""Replays of what 3D Slicer's MONAI Label module and OHIF's MONAI Label extension really send, against the real server.

Each sequence is recorded in ``tests/fixtures/replay/*.json``: the request as the client builds it, the module lines
it comes from (MONAILabel commit in the file), what the annotator does and what the server answered before this was
fixed. Files the clients upload are written the way they write them (``tests/client_files.py``). The checks are what
the client then relies on: the slice segmented, a label it can place (geometry), a label training can use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import SimpleITK as sitk  # noqa: N813
import skimage.data
from PIL import Image

from lib.loop.rest_annotator import infer_answer
from lib.training.curation import iter_curated
from scripts.monailabel_server import server_log, start_server, stop_server
from tests.client_files import dcmqi_liver_mask, hc18_mask, write_slicer_label, write_slicer_rgb_volume
from tests.conftest import golden_conf

pytestmark = pytest.mark.server

REPLAY = Path(__file__).parent / "fixtures" / "replay"
SEQUENCES = [
    (client, sequence)
    for client in ("slicer", "ohif")
    for sequence in json.loads((REPLAY / f"{client}.json").read_text())["sequences"]
]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    shutil.copy(data_dir / "hc18" / "images" / "002_HC.png", folder / "hc_002.png")  # 800 x 540
    pixel_mm = 0.0846  # the order of HC18's pixel sizes (pixel_size_and_HC.csv)
    Image.open(data_dir / "hc18" / "images" / "004_HC.png").save(folder / "hc_dpi.jpg", dpi=(25.4 / pixel_mm,) * 2)
    shutil.copy(data_dir / "dicom_ct_seg" / "01.dcm", folder / "ct_frame.dcm")
    shutil.copy(data_dir / "nifti" / "example_ct_sm.nii.gz", folder / "ct_volume.nii.gz")  # 122 x 101 x 30, 3 mm
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, studies: Path, golden_dir: Path):
    conf = golden_conf(golden_dir, tmp_path_factory.mktemp("model"))
    url = start_server("apps/sam_med2d", studies, conf)
    yield url
    log = server_log(url)
    stop_server(url)
    assert "Traceback" not in log, log[-4000:]  # no request ended in a 500


def client_file(spec: str, studies: Path, data_dir: Path, tmp: Path) -> Path:
    """The file a placeholder ``<kind:name>`` stands for, written as the client writes it."""
    kind, _, name = spec.strip("<>").partition(":")
    if kind == "slicer_label":
        image_id, ext = name.split(".", 1)
        if image_id == "hc_002":
            mask, image = hc18_mask(data_dir, "002_HC.png"), studies / "hc_002.png"
        else:
            mask, image = dcmqi_liver_mask(data_dir), studies / "ct_frame.dcm"
        return write_slicer_label(mask, image, tmp / f"label_{image_id}.{ext}")
    if kind == "raw_labelmap":
        labelmap = np.zeros((30, 101, 122), np.uint8)  # cornerstone's scalar data: i fastest, then j, then k
        labelmap[12, 40:60, 50:70] = 1
        (tmp / name).write_bytes(labelmap.tobytes())
        return tmp / name
    if kind == "rgb_session.nii.gz":
        return write_slicer_rgb_volume(skimage.data.astronaut(), tmp / "rgb_session.nii.gz")
    raise ValueError(f"unknown client file {spec}")


def send(url: str, step: dict[str, Any], files: dict[str, Path], state: dict[str, str]) -> requests.Response:
    """The request as the client sends it: query, a multipart 'params' JSON field (or a JSON body), files."""
    query = {k: str(v).format(**state) for k, v in step.get("query", {}).items()}
    form: dict[str, Any] = {}
    if "params" in step:
        form["params"] = (None, json.dumps(step["params"]))
    for key, value in step.get("form", {}).items():
        form[key] = (None, json.dumps(value) if isinstance(value, dict) else str(value))
    for key, path in files.items():
        form[key] = (path.name, path.read_bytes())
    if "json" in step:
        return requests.request(step["method"], url + step["path"], params=query, json=step["json"], timeout=120)
    return requests.request(step["method"], url + step["path"], params=query, files=form or None, timeout=120)


def answer_label(response: requests.Response, tmp: Path) -> tuple[dict[str, Any], sitk.Image | None]:
    """The JSON result and the label file of an infer answer (multipart for Slicer, the file for output=image)."""
    result, data, name = infer_answer(response)
    if data is not None and not name:
        name = "answer.nrrd"  # OHIF asks output=image with result_extension .nrrd
    if data is None:
        return result, None
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    path = tmp / f"answer{suffix}"
    path.write_bytes(data)
    return result, sitk.ReadImage(str(path))


def assert_same_geometry(label: sitk.Image, reference: sitk.Image) -> None:
    """Where Slicer pastes the label is where the image is: origin, spacing and direction agree (first two axes)."""
    np.testing.assert_allclose(label.GetSpacing()[:2], reference.GetSpacing()[:2], rtol=1e-5)
    np.testing.assert_allclose(label.GetOrigin()[:2], reference.GetOrigin()[:2], atol=1e-3)
    if label.GetDimension() == 3 and reference.GetDimension() == 3:
        np.testing.assert_allclose(label.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(label.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert label.GetSize()[:2] == reference.GetSize()[:2]


def labels_of(url: str, image_id: str) -> dict[str, Any]:
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    return objects[image_id]["labels"]


@pytest.mark.parametrize(("client", "sequence"), SEQUENCES, ids=[f"{c}-{s['id']}" for c, s in SEQUENCES])
def test_replay(client: str, sequence: dict, server: str, studies: Path, data_dir: Path, tmp_path: Path) -> None:
    state: dict[str, str] = {}
    for n, step in enumerate(sequence["steps"]):
        files = {k: client_file(v, studies, data_dir, tmp_path) for k, v in step.get("files", {}).items()}
        expect = step["expect"]
        if "stores_nothing" in expect:
            labels_before = labels_of(server, expect["stores_nothing"])
        response = send(server, step, files, state)
        where = f"{client} {sequence['id']} step {n} (was: {sequence['before']})"
        assert response.status_code == expect["status"], f"{where}: {response.text[:800]}"
        if response.status_code != 200:
            detail = response.json()["detail"]
            assert expect["detail_contains"] in detail, detail
            assert labels_of(server, expect["stores_nothing"]) == labels_before, "a refused label changed the datastore"
            continue
        if step["path"] == "/session/":
            state["session_id"] = response.json()["session_id"]
            continue
        if step["path"].startswith("/activelearning"):
            assert response.json()["id"] in requests.get(f"{server}/datastore/?output=all").json()["objects"]
            continue
        if step["path"] == "/datastore/label":
            assert_curates_like(expect["curates_like"], studies, data_dir)
            continue
        result, label = answer_label(response, tmp_path)
        for key, value in expect.get("result", {}).items():
            assert result[key] == value, f"{where}: {key} = {result[key]!r}, expected {value!r}"
        assert label is not None, where
        if "labelled_slices" in expect:
            array = sitk.GetArrayFromImage(label)  # (k, j, i)
            labelled = [int(k) for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))]
            assert set(labelled) <= set(expect["labelled_slices"]), f"{where}: slices {labelled} labelled"
        if "geometry_of" in expect:
            name = expect["geometry_of"]
            reference = tmp_path / "rgb_session.nii.gz" if name.startswith("<") else next(studies.glob(f"{name}.*"))
            assert_same_geometry(label, sitk.ReadImage(str(reference)))


def assert_curates_like(image_id: str, studies: Path, data_dir: Path) -> None:
    """The saved label, curated as training curates it, is the annotator's mask on the image's own pixels."""
    image = next(studies.glob(f"{image_id}.*"))
    label = next((studies / "labels" / "final").glob(f"{image_id}.*"))
    drawn = hc18_mask(data_dir, "002_HC.png") if image_id == "hc_002" else dcmqi_liver_mask(data_dir)
    curated = list(iter_curated([(image_id, image, label)]))
    assert len(curated) == 1 and curated[0].image.shape[:2] == drawn.shape
    union = np.any(curated[0].masks, axis=0)
    dice = 2 * np.logical_and(union, drawn).sum() / (union.sum() + drawn.sum())
    assert dice > 0.99, f"curated mask of {image_id} is not where it was drawn (Dice {dice:.3f})"
