"""The DICOM path against a real Orthanc PACS: list CT/MR/US series over DICOMweb, segment a series by clicks as OHIF
sends them, save the label as DICOM SEG into Orthanc, find it there and read it back as training data; and the
failures a hospital meets (malformed DICOM, a series that vanished, a PACS that is down) as clear errors that store
nothing and lose nothing.

One Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started by ``scripts/orthanc.py`` on a free port with a
throwaway database) and one MONAI Label server (``--studies http://127.0.0.1:<port>/dicom-web``, the golden_tiny
network) for the module. Tests run in file order; the PACS-down test stops and restarts Orthanc, so it is last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK

from apps.sam_med2d.activelearning import SamUncertaintyScoring
from apps.sam_med2d.dicomweb import init_dicomweb_datastore
from lib.io.dicom_seg import read_seg, read_series, volume_label_samples
from lib.serving.model_store import ModelStore
from lib.training.data import prepare_image
from scripts.dicom_demo import hc18_pixel_size, picture_to_us_frame, volume_to_mr_series
from scripts.monailabel_server import free_port, server_log, start_server, stop_server
from scripts.orthanc import Orthanc, OrthancError, missing_requirements

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

APP = "apps/sam_med2d"
# What OHIF's MONAI Label panel adds to a point request (MonaiLabelClient.infer).
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
CT_CLICK = [256, 300, 10]  # [i, j, k] on the 20-slice CT: inside the body


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pacs(orthanc: Orthanc, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Upload the 20-slice CT series, the 3-slice CT with its liver SEG, and MR/US series made from the fixtures;
    returns SeriesInstanceUIDs by name."""
    demo = tmp_path_factory.mktemp("dicom_demo")
    mr_files = volume_to_mr_series(data_dir / "nifti" / "example_mr_sm.nii.gz", demo / "mr")
    us_file = picture_to_us_frame(
        data_dir / "hc18" / "images" / "002_HC.png", demo / "us", hc18_pixel_size("002_HC.png")
    )
    orthanc.upload([data_dir / "dicom_ct_series"], fill_missing_uids=True)
    orthanc.upload([data_dir / "dicom_ct_seg", demo])
    by_description = {}
    for series in orthanc.series():
        tags = series["MainDicomTags"]
        by_description[(tags["Modality"], len(series["Instances"]))] = tags["SeriesInstanceUID"]
    return {
        "ct20": by_description[("CT", 20)],
        "ct3": by_description[("CT", 3)],
        "liver_seg": by_description[("SEG", 1)],
        "mr": str(pydicom.dcmread(mr_files[0]).SeriesInstanceUID),
        "us": str(pydicom.dcmread(us_file).SeriesInstanceUID),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model")


@pytest.fixture(scope="module")
def server(
    orthanc: Orthanc, pacs: dict[str, str], golden_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
):
    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "download": "false",
        "model_dir": model_dir,
        "dicomweb_cache_path": tmp_path_factory.mktemp("dicomweb_cache"),
        "dicomweb_cache_s": 0,
    }
    # No uncertainty scoring after every save and training run: on two shared cores it would score every series of
    # the PACS in the background while the tests time the requests (tests/test_ohif_browser.py keeps the default).
    url = start_server(APP, orthanc.dicomweb_url, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    yield url
    print(server_log(url)[-5000:])
    stop_server(url)


def fresh_datastore(orthanc: Orthanc, cache: Path):
    """The datastore as a training subprocess builds it (same URL, its own empty cache)."""
    return init_dicomweb_datastore(orthanc.dicomweb_url, {"dicomweb_cache_path": str(cache), "dicomweb_cache_s": "0"})


def infer(url: str, series: str, params: dict) -> requests.Response:
    """The request OHIF's MONAI Label panel sends for point prompts."""
    return requests.post(
        f"{url}/infer/sam_med2d_points",
        params={"image": series, "output": "image"},
        data={"params": json.dumps(params | OHIF)},
        timeout=300,
    )


def read_nrrd(content: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "result.nrrd"
    path.write_bytes(content)
    array, _ = nrrd.read(str(path))
    return array


def save_label(url: str, series: str, filename: str, content: bytes, params: dict) -> requests.Response:
    """PUT /datastore/label as Slicer (NRRD) and OHIF's client (raw .bin) send it."""
    return requests.put(
        f"{url}/datastore/label",
        params={"image": series, "tag": "final"},
        data={"params": json.dumps(params)},
        files={"label": (filename, content)},
        timeout=300,
    )


def segs_in_pacs(orthanc: Orthanc) -> dict[str, dict]:
    """SEG series in Orthanc: SeriesInstanceUID -> Orthanc's record."""
    return {
        s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.series() if s["MainDicomTags"]["Modality"] == "SEG"
    }


def seg_dataset(orthanc: Orthanc, record: dict) -> pydicom.Dataset:
    from io import BytesIO

    return pydicom.dcmread(BytesIO(orthanc.request(f"/instances/{record['Instances'][0]}/file")))


def test_lists_ct_mr_and_us_series_not_segs(orthanc: Orthanc, pacs: dict[str, str], tmp_path: Path) -> None:
    store = fresh_datastore(orthanc, tmp_path)
    listed = store.list_images()
    assert {pacs["ct20"], pacs["ct3"], pacs["mr"], pacs["us"]} <= set(listed)
    assert pacs["liver_seg"] not in listed
    assert store.get_labeled_images() == [pacs["ct3"]]  # the dcmqi liver SEG references the 3-slice CT
    ct_only = init_dicomweb_datastore(
        orthanc.dicomweb_url, {"dicomweb_cache_path": str(tmp_path / "ct"), "dicomweb_modalities": "CT"}
    )
    assert set(ct_only.list_images()) == {pacs["ct20"], pacs["ct3"]}


def test_uncertainty_scoring_does_not_download_the_pacs(
    orthanc: Orthanc, pacs: dict[str, str], golden_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "model", golden_dir / "meta.json", golden_dir / "weights.pth")
    cache = tmp_path / "cache"
    result = SamUncertaintyScoring(store)({}, fresh_datastore(orthanc, cache))
    assert result["skipped"] == "DICOMweb datastore" and result["scored"] == 0
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".dcm", ".gz", ".nii")]


@pytest.mark.parametrize(
    "name, click, shape", [("mr", [60, 45, 7], (117, 91, 20)), ("us", [400, 270, 0], (800, 540, 1))]
)
def test_infer_on_mr_and_us_series_by_ohif_clicks(
    server: str, orthanc: Orthanc, pacs: dict[str, str], name: str, click: list[int], shape: tuple, tmp_path: Path
) -> None:
    answer = infer(server, pacs[name], {"foreground": [click], "background": []})
    assert answer.status_code == 200, answer.text
    label = read_nrrd(answer.content, tmp_path)
    if label.ndim == 2:
        label = label[:, :, None]
    assert label.shape == shape  # the series' (I, J, K) grid
    assert label[:, :, click[2]].any(), "the clicked slice got no mask"
    others = np.delete(label, click[2], axis=2)
    assert not others.any(), "only the clicked slice is segmented"


def test_whole_path_click_save_seg_find_it_and_train_on_it(
    server: str, orthanc: Orthanc, pacs: dict[str, str], data_dir: Path, tmp_path: Path
) -> None:
    ct = pacs["ct20"]
    before = set(segs_in_pacs(orthanc))

    # 1. clicks as OHIF sends them: voxel [i, j, k]
    answer = infer(server, ct, {"foreground": [CT_CLICK], "background": [[100, 100, 10]]})
    assert answer.status_code == 200, answer.text
    mask = read_nrrd(answer.content, tmp_path) > 0
    assert mask.shape == (512, 512, 20)
    assert mask[:, :, 10].any() and not np.delete(mask, 10, axis=2).any()

    # 2. the annotator saves it (Slicer sends the NRRD it got, with the segment names)
    saved = save_label(server, ct, "label.nrrd", answer.content, {"label_info": [{"name": "liver", "idx": 1}]})
    assert saved.status_code == 200, saved.text

    # 3. the SEG is in Orthanc, linked to its series and each slice, with the segment name
    new = set(segs_in_pacs(orthanc)) - before
    assert len(new) == 1
    seg = seg_dataset(orthanc, segs_in_pacs(orthanc)[new.pop()])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    ct_dir = tmp_path / "ct"
    ct_dir.mkdir()
    record = next(r for r in orthanc.series() if r["MainDicomTags"]["SeriesInstanceUID"] == ct)
    for m, instance in enumerate(record["Instances"]):
        (ct_dir / f"{m}.dcm").write_bytes(orthanc.request(f"/instances/{instance}/file"))
    reference, datasets = read_series(sorted(ct_dir.iterdir()))
    slice_10 = np.array(reference.TransformIndexToPhysicalPoint((0, 0, 10)))
    instance_10 = next(d for d in datasets if np.allclose(np.array(d.ImagePositionPatient, float), slice_10, atol=1e-3))
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in referenced] == [str(instance_10.SOPInstanceUID)]
    frame_source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert str(frame_source.ReferencedSOPInstanceUID) == str(instance_10.SOPInstanceUID)

    # 4. read back onto the series grid: the same voxels as the mask the annotator saw
    assert np.array_equal(read_seg(seg, reference).masks[1], mask)

    # 5. the trainer's datastore (a fresh process and cache) reads the SEGs as labels
    store = fresh_datastore(orthanc, tmp_path / "train_cache")
    items = {Path(d["image"]).name.removesuffix(".nii.gz"): d for d in store.datalist()}
    assert set(items) == {ct, pacs["ct3"]}
    assert items[ct]["segments"] == {"1": "liver"}
    first_seg = str(seg.SeriesInstanceUID)
    assert store.get_label_by_image_id(ct, "final") == first_seg  # label id = the SEG (retraining's change stamp)
    assert store.get_label_info(first_seg, "final")["segments"] == {"1": "liver"}
    samples = volume_label_samples(items[ct]["image"], items[ct]["label"], items[ct]["segments"])
    assert [s.slice_index for s in samples] == [10] and samples[0].names == ["liver"]
    assert np.array_equal(samples[0].masks[0], mask[:, :, 10].T)
    dcmqi_liver, _ = nrrd.read(str(data_dir / "dicom_ct_seg" / "liver_seg.nrrd"))
    ct3 = volume_label_samples(items[pacs["ct3"]]["image"], items[pacs["ct3"]]["label"], items[pacs["ct3"]]["segments"])
    assert len(ct3) == 3 and ct3[0].names == ["Liver"]
    assert all(np.array_equal(s.masks[0], dcmqi_liver[:, :, s.slice_index].T > 0) for s in ct3)
    prepared = prepare_image(samples[0].image, samples[0].masks, 64, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert prepared.image.shape == (3, 64, 64) and prepared.masks.shape == (1, 64, 64) and prepared.masks.any()

    # 6. OHIF's client saves raw bytes (label.bin, Fortran order); a newer SEG is the one training reads
    relabel = np.zeros((512, 512, 20), dtype=np.uint8)
    relabel[200:260, 280:330, 5] = 1
    relabel[300:340, 200:240, 5] = 2
    saved = save_label(
        server,
        ct,
        "label.bin",
        relabel.tobytes(order="F"),
        {"label_info": [{"name": "kidney", "idx": 1}, {"name": "spleen", "idx": 2}]},
    )
    assert saved.status_code == 200, saved.text
    items = {Path(d["image"]).name.removesuffix(".nii.gz"): d for d in store.datalist()}
    assert items[ct]["segments"] == {"1": "kidney", "2": "spleen"}
    assert store.get_label_by_image_id(ct, "final") not in ("", first_seg)
    samples = volume_label_samples(items[ct]["image"], items[ct]["label"], items[ct]["segments"])
    assert [s.slice_index for s in samples] == [5] and samples[0].names == ["kidney", "spleen"]
    assert np.array_equal(samples[0].masks[1], (relabel[:, :, 5] == 2).T)


def test_training_reads_the_seg_labels_from_the_pacs(server: str, model_dir: Path, pacs: dict[str, str]) -> None:
    """POST /train: the training subprocess rebuilds the app, lists the SEGs in Orthanc and curates them: the app's
    SEG of the 20-slice CT (two segments on one slice) and dcmqi's liver SEG of the 3-slice CT (three slices)."""
    params = {"max_epochs": 1, "train_batch_size": 2, "val_split": 0.5, "val_points": "1"}
    response = requests.post(f"{server}/train/sam_med2d?run_sync=true", json=params, timeout=600)
    assert response.status_code == 200, response.text + server_log(server)[-4000:]
    stats = json.loads((model_dir / "train" / "train_stats.json").read_text())
    assert stats["status"] == "completed", server_log(server)[-4000:]
    assert {stats["train_images"], stats["val_images"]} == {1, 3}  # split by case: one series each side


def test_unknown_series_is_404_and_stores_nothing(server: str, orthanc: Orthanc, pacs: dict[str, str]) -> None:
    before = set(segs_in_pacs(orthanc))
    missing = "1.2.3.4.5.6.7.8.9"
    answer = infer(server, missing, {"foreground": [[10, 10, 0]]})
    assert answer.status_code == 404 and missing in answer.text
    saved = save_label(server, missing, "label.bin", b"\x01" * 8, {})
    assert saved.status_code == 404 and missing in saved.text
    assert set(segs_in_pacs(orthanc)) == before


def test_ids_that_are_not_uids_are_refused(server: str, orthanc: Orthanc) -> None:
    """Series ids become folders of the local cache: anything but a DICOM UID is a 400 before the PACS is asked."""
    before = set(segs_in_pacs(orthanc))
    for series in ("../../../../tmp/escape_series", "1.2.3/../../4", "1.2.3.4%2F..%2F5"):
        answer = infer(server, series, {"foreground": [[10, 10, 0]]})
        assert answer.status_code == 400 and "not a DICOM UID" in answer.text, answer.text
        saved = save_label(server, series, "label.bin", b"\x01" * 8, {})
        assert saved.status_code == 400, saved.text
    assert not list(Path("/tmp").glob("escape_series*"))
    assert set(segs_in_pacs(orthanc)) == before


def test_series_that_vanished_from_the_pacs(
    server: str, orthanc: Orthanc, data_dir: Path, tmp_path: Path, pacs: dict[str, str]
) -> None:
    us_file = picture_to_us_frame(data_dir / "hc18" / "images" / "004_HC.png", tmp_path)
    orthanc.upload([us_file])
    series = str(pydicom.dcmread(us_file).SeriesInstanceUID)
    answer = infer(server, series, {"foreground": [[300, 200, 0]]})
    assert answer.status_code == 200, answer.text
    before = set(segs_in_pacs(orthanc))

    orthanc.delete_series(series)
    saved = save_label(server, series, "label.nrrd", answer.content, {"label_info": [{"name": "head"}]})
    assert saved.status_code == 404, saved.text
    assert "no longer in the PACS" in saved.json()["detail"] and series in saved.json()["detail"]
    assert set(segs_in_pacs(orthanc)) == before  # nothing stored, nothing removed
    store = fresh_datastore(orthanc, tmp_path / "cache")
    assert series not in store.list_images()
    assert pacs["ct20"] in store.get_labeled_images()


def test_malformed_dicom_gives_clear_errors(
    server: str, orthanc: Orthanc, pacs: dict[str, str], data_dir: Path, tmp_path: Path
) -> None:
    # a file that is not DICOM: Orthanc refuses it, the upload names it
    junk = tmp_path / "notes.dcm"
    junk.write_bytes(b"this is not a DICOM file" * 20)
    with pytest.raises(OrthancError, match="notes.dcm"):
        orthanc.upload([junk])

    # a DICOM whose pixel data is cut short: stored by the PACS, but no image can be made of it
    source = sorted((data_dir / "dicom_ct_seg").glob("0*.dcm"))[0]
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = bytes(ds.PixelData)[:1000]
    ds.save_as(tmp_path / "truncated.dcm")
    orthanc.upload([tmp_path / "truncated.dcm"])
    answer = infer(server, str(ds.SeriesInstanceUID), {"foreground": [[100, 100, 0]]})
    assert answer.status_code == 422, answer.text
    assert str(ds.SeriesInstanceUID) in answer.text and "cannot be used as an image" in answer.text

    # labels that cannot be a SEG of the series: unreadable, wrong grid, empty; nothing stored
    before = set(segs_in_pacs(orthanc))
    ct = pacs["ct20"]
    for filename, content, problem in (
        ("label.nrrd", b"NRRD0004\nnot really", "unreadable label"),
        ("label.bin", b"\x01" * 100, "unreadable label"),
        ("label.bin", np.zeros((512, 512, 20), np.uint8).tobytes(), "empty"),
    ):
        saved = save_label(server, ct, filename, content, {})
        assert saved.status_code == 422, (filename, saved.text)
        assert problem in saved.json()["detail"]
    wrong_grid = tmp_path / "small.nii.gz"
    SimpleITK.WriteImage(SimpleITK.Image(64, 64, 20, SimpleITK.sitkUInt8) + 1, str(wrong_grid))
    saved = save_label(server, ct, "small.nii.gz", wrong_grid.read_bytes(), {})
    assert saved.status_code == 422 and "voxel grid" in saved.json()["detail"]
    assert set(segs_in_pacs(orthanc)) == before


def test_pacs_down_is_503_and_nothing_is_lost(server: str, orthanc: Orthanc, pacs: dict[str, str]) -> None:
    stored = set(segs_in_pacs(orthanc))
    ct = pacs["ct20"]
    cached = infer(server, ct, {"foreground": [CT_CLICK]})
    assert cached.status_code == 200
    orthanc.stop()
    try:
        answer = infer(server, pacs["ct3"] + ".9", {"foreground": [[100, 100, 0]]})  # not cached: needs the PACS
        assert answer.status_code == 503, answer.text
        assert "does not answer" in answer.text and orthanc.dicomweb_url in answer.text
        saved = save_label(server, ct, "label.nrrd", cached.content, {"label_info": [{"name": "liver"}]})
        assert saved.status_code == 503, saved.text
        assert "does not answer" in saved.json()["detail"]
    finally:
        orthanc.start()
    assert set(segs_in_pacs(orthanc)) == stored  # the PACS kept every SEG
    saved = save_label(server, ct, "label.nrrd", cached.content, {"label_info": [{"name": "liver"}]})
    assert saved.status_code == 200, saved.text
    assert len(set(segs_in_pacs(orthanc)) - stored) == 1


def test_orthanc_script_is_what_users_run(tmp_path: Path) -> None:
    """``python scripts/orthanc.py start|status|stop`` as docs/dicom.md tells users (here on a free port)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "orthanc.py"
    port = str(free_port())
    common = ["--storage", str(tmp_path / "pacs"), "--port", port]
    run = lambda *args: subprocess.run([sys.executable, str(script), *args, *common], capture_output=True, text=True)  # noqa: E731
    assert run("start").returncode == 0
    try:
        status = run("status")
        assert status.returncode == 0 and "up" in status.stdout
    finally:
        assert run("stop").returncode == 0
    assert run("status").returncode == 1
    shutil.rmtree(tmp_path / "pacs")
