"""The SAM-Med2D app served by the real MONAI Label server, driven over HTTP as Slicer, OHIF and REST clients do.

One server for the module: the golden_tiny network with its published-layout weights and the predictor
preprocessing (so masks can be compared with the published implementation's golden outputs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk  # noqa: N813
from monailabel.client import MONAILabelClient
from PIL import Image

from apps.sam_med2d.demo import build_demo_datastore
from lib.io.image_source import read_image
from lib.loop.rest_annotator import infer_answer
from lib.serving.decoding import ServedDecoding
from lib.serving.interactive import InteractiveSegmenter
from lib.serving.model_store import ModelStore
from lib.serving.prompt_inputs import parse_prompts
from scripts.monailabel_server import server_log, start_server, stop_server

pytestmark = pytest.mark.server

APP = "apps/sam_med2d"
GOLDEN_CASES = ("one_point", "box", "box_and_point")
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}
# What Slicer adds from the model's config panel (getParamsFromConfig) to every deepgrow request.
SLICER_CONFIG = {"multimask_output": "auto", "reset": False, "largest_cc": False, "device": "cpu"}
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False, "restore_label_idx": False}


def _write_dicom_series(source: Path, folder: Path, slices: int = 4) -> None:
    """A small CT series: pydicom's CT slice stacked with shifted intensities, one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = pydicom.uid.generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SliceLocation = z + 5.0 * k
        pixels = ds.pixel_array.astype(np.int16) + np.int16(10 * k)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm")


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    cases = np.load(golden_dir / "cases.npz")
    meta = json.loads((golden_dir / "meta.json").read_text())
    return {"cases": cases, "meta": meta, "dir": golden_dir}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, golden: dict) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    build_demo_datastore(folder)
    Image.fromarray(golden["cases"]["image"]).save(folder / "golden.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    mr = sitk.ReadImage(str(folder / "mr_anatomical.nii.gz"))
    sitk.WriteImage(mr, str(folder / "mr_copy.nrrd"))  # the same volume as NRRD, written by ITK
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, studies: Path, golden: dict):
    model_dir = tmp_path_factory.mktemp("model")
    conf = {
        "model": golden["dir"] / "meta.json",
        "checkpoint": golden["dir"] / "weights.pth",
        "preprocessing": "predictor",
        "download": "false",
        "model_dir": model_dir,
    }
    url = start_server(APP, studies, conf)
    yield url
    log = server_log(url)
    stop_server(url)
    assert "Traceback" not in log, log[-4000:]  # no request ended in an unhandled error (a 500)


@pytest.fixture(scope="module")
def engine(golden: dict, tmp_path_factory: pytest.TempPathFactory) -> InteractiveSegmenter:
    """The same weights and policy in-process: what the REST answers must equal."""
    store = ModelStore(
        tmp_path_factory.mktemp("engine_model"), golden["dir"] / "meta.json", golden["dir"] / "weights.pth"
    )
    return InteractiveSegmenter(store, decoding=ServedDecoding(policy="predictor"))


def infer(url: str, model: str, image: str, params: dict, **query: str) -> tuple[int, dict, bytes | None, str]:
    """POST /infer like MONAILabelClient: returns status, JSON params, the label file's bytes and its name."""
    response = requests.post(
        f"{url}/infer/{model}", params={"image": image, **query}, files={"params": (None, json.dumps(params))}
    )
    if response.status_code != 200:
        return response.status_code, response.json(), None, ""
    return 200, *infer_answer(response)


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def read_label_file(data: bytes, suffix: str, tmp_path: Path) -> sitk.Image:
    path = tmp_path / f"label{suffix}"
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


def golden_request(meta_case: dict) -> dict:
    params: dict = {"multimask_output": meta_case["multimask_output"], "reset": True}
    if "point_coords" in meta_case:
        pairs = list(zip(meta_case["point_coords"], meta_case["point_labels"]))
        params["foreground"] = [p for p, label in pairs if label == 1]
        params["background"] = [p for p, label in pairs if label == 0]
    if "box" in meta_case:
        params["box"] = meta_case["box"]
    return params


def test_info_lists_interactive_models(server: str) -> None:
    info = requests.get(f"{server}/info/").json()
    for name, first in (("sam_med2d_points", "points"), ("sam_med2d_box", "box")):
        model = info["models"][name]
        assert model["type"] == "deepgrow" and model["dimension"] == 2
        assert model["first_prompt"] == first
    assert info["sam_med2d"]["model_version"] == "base"
    assert info["sam_med2d"]["trained_weights"] is True
    assert "warning" not in info["sam_med2d"]
    assert "multimask_output true by default for every prompt" in info["sam_med2d"]["decoding"]["rule"]
    assert info["models"]["sam_med2d_points"]["config"]["multimask_output"] is True
    assert info["datastore"]["total"] >= 7


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_masks_through_rest(server: str, golden: dict, case: str) -> None:
    """The whole path REST -> model is faithful: masks equal the published implementation's logits > 0."""
    params = golden_request(golden["meta"]["cases"][case]) | {"client_id": f"golden-{case}"}
    status, result, data, _ = infer(server, "sam_med2d_points", "golden", params)
    assert status == 200, result
    mask = read_png(data)
    expected = golden["cases"][f"{case}.masks_logits"][0] > 0
    assert mask.shape == expected.shape
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert set(np.unique(mask)) <= {0, 1}
    assert result["iou"] == pytest.approx(float(golden["cases"][f"{case}.iou"].ravel()[0]), abs=1e-4)
    assert result["multimask_output"] is golden["meta"]["cases"][case]["multimask_output"]


def test_golden_correction_uses_the_previous_mask(server: str, golden: dict) -> None:
    """one_point then three_points from one client: the server passes the first click's kept low-res logits as the
    mask prompt, exactly as the golden three_points case does with the published predictor."""
    params = golden_request(golden["meta"]["cases"]["one_point"]) | {"client_id": "golden-seq", "label": "x"}
    status, first, _, _ = infer(server, "sam_med2d_points", "golden", params)
    assert status == 200 and first["used_previous_mask"] is False
    params = golden_request(golden["meta"]["cases"]["three_points"]) | {"client_id": "golden-seq", "label": "x"}
    params["reset"] = False
    status, second, data, _ = infer(server, "sam_med2d_points", "golden", params)
    assert status == 200 and second["used_previous_mask"] is True
    expected = golden["cases"]["three_points.masks_logits"][0] > 0
    np.testing.assert_array_equal(read_png(data).astype(bool), expected)
    assert second["iou"] == pytest.approx(float(golden["cases"]["three_points.iou"].ravel()[0]), abs=1e-4)


def test_click_then_refine_with_client(server: str, tmp_path: Path) -> None:
    """MONAILabelClient: first click, then a correction that reuses the previous mask (multimask for both)."""
    client = MONAILabelClient(server, tmpdir=str(tmp_path), client_id="annotator-1")
    first_file, first = client.infer("sam_med2d_points", "golden", {"foreground": [[120, 90]], "label": "liver"})
    assert first["multimask_output"] is True and first["used_previous_mask"] is False
    assert first["model_version"] == "base"
    assert set(first["timings_ms"]) >= {"embed", "decode", "upsample"}
    assert "latencies" in first
    second_file, second = client.infer(
        "sam_med2d_points", "golden", {"foreground": [[120, 90]], "background": [[60, 40]], "label": "liver"}
    )
    assert second["embedding_cached"] is True
    assert second["used_previous_mask"] is True and second["multimask_output"] is True
    assert not np.array_equal(np.asarray(Image.open(first_file)), np.asarray(Image.open(second_file)))
    _, reset = client.infer(
        "sam_med2d_points",
        "golden",
        {"foreground": [[120, 90]], "background": [[60, 40]], "label": "liver", "reset": True},
    )
    assert reset["used_previous_mask"] is False
    _, other_label = client.infer("sam_med2d_points", "golden", {"foreground": [[120, 90]], "label": "spleen"})
    assert other_label["used_previous_mask"] is False
    other_client = MONAILabelClient(server, tmpdir=str(tmp_path), client_id="annotator-2")
    _, other = other_client.infer("sam_med2d_points", "golden", {"foreground": [[120, 90]], "label": "liver"})
    assert other["used_previous_mask"] is False and other["embedding_cached"] is True


def test_refinement_matches_library(server: str, engine: InteractiveSegmenter, studies: Path) -> None:
    """Point after box, through REST, equals the same two steps in-process (previous mask as the mask prompt)."""
    steps = [{"box": [40, 30, 200, 150]}, {"box": [40, 30, 200, 150], "foreground": [[100, 80]]}]
    source = read_image(studies / "golden.png")
    for n, step in enumerate(steps):
        status, result, data, _ = infer(server, "sam_med2d_box", "golden", step | {"client_id": "refine", "label": "a"})
        assert status == 200, result
        expected = engine.segment_view(source, parse_prompts(step, source.view_hw, None), "refine", "a")
        assert expected.mask.any() and not expected.mask.all()
        np.testing.assert_array_equal(read_png(data).astype(bool), expected.mask)
        assert result["iou"] == pytest.approx(expected.iou, abs=1e-5)
        assert result["used_previous_mask"] is (n > 0)


def test_box_layouts_agree(server: str) -> None:
    """Slicer's 6-value IJK roi (pairs in any order) and [x1, y1, x2, y2] are the same box."""
    masks = []
    for box in ({"box": [40, 30, 200, 150]}, {"roi": [200, 40, 30, 150, 0, 0]}, {"roi": [40, 30, 200, 150]}):
        status, result, data, _ = infer(server, "sam_med2d_box", "golden", box | {"reset": True})
        assert status == 200, result
        masks.append(read_png(data))
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], masks[2])


def test_slicer_click_on_png(server: str, tmp_path: Path) -> None:
    """Slicer loads a PNG as a one-slice volume and sends [i, j, 0] clicks and .nrrd/uint8."""
    params = {"label": "lesion", "foreground": [[120, 90, 0]], "background": []} | SLICER_CONFIG | SLICER
    status, result, data, name = infer(server, "sam_med2d_points", "golden", params)
    assert status == 200, result
    assert name.endswith(".nrrd")
    label = read_label_file(data, ".nrrd", tmp_path)
    assert label.GetSize() == (258, 181)
    assert label.GetPixelID() == sitk.sitkUInt8
    status, _, png, _ = infer(server, "sam_med2d_points", "golden", {"foreground": [[120, 90]], "reset": True})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), read_png(png))


def test_slicer_click_on_volume_slice(server: str, studies: Path, engine: InteractiveSegmenter, tmp_path: Path) -> None:
    """A NIfTI volume: voxel [i, j, k] clicks; the answer is the volume with only slice k filled, in its geometry."""
    i, j, k = 16, 20, 12
    params = {"label": "brain", "foreground": [[i, j, k]], "background": []} | SLICER_CONFIG | SLICER
    status, result, data, _ = infer(server, "sam_med2d_points", "mr_anatomical", params)
    assert status == 200, result
    assert result["slice"] == k
    label = read_label_file(data, ".nrrd", tmp_path)
    image = sitk.ReadImage(str(studies / "mr_anatomical.nii.gz"))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)
    array = sitk.GetArrayFromImage(label)  # (k, j, i)
    assert not array[np.arange(array.shape[0]) != k].any()
    source = read_image(studies / "mr_anatomical.nii.gz")
    prompts = parse_prompts({"foreground": [[i, j, k]]}, source.view_hw, source.num_slices)
    expected = engine.segment_view(source, prompts, reset=True)
    assert expected.mask.any() and not expected.mask.all()
    np.testing.assert_array_equal(array[k].astype(bool), expected.mask)
    # Volume intensities go to 0..255 over the whole volume (as the paper does), so slices share one mapping.
    nifti = np.asanyarray(nib.load(studies / "mr_anatomical.nii.gz").dataobj)
    assert source.value_range == (float(nifti.min()), float(nifti.max()))
    # Without Slicer's result_extension a volume answers NIfTI, same label, same affine.
    status, _, data, name = infer(
        server, "sam_med2d_points", "mr_anatomical", {"foreground": [[i, j, k]], "reset": True}
    )
    assert status == 200 and name.endswith(".nii.gz")
    (tmp_path / "label.nii.gz").write_bytes(data)
    label_nifti = nib.load(tmp_path / "label.nii.gz")
    np.testing.assert_allclose(label_nifti.affine, nib.load(studies / "mr_anatomical.nii.gz").affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(label_nifti.dataobj)[:, :, k].T.astype(bool), expected.mask)


def test_nrrd_volume_answers_like_its_nifti(server: str, studies: Path, tmp_path: Path) -> None:
    params = {"foreground": [[16, 20, 12]], "reset": True} | SLICER
    answers = {}
    for image in ("mr_anatomical", "mr_copy"):
        status, result, data, _ = infer(server, "sam_med2d_points", image, params)
        assert status == 200, result
        answers[image] = read_label_file(data, f"_{image}.nrrd", tmp_path)
    nrrd_input = sitk.ReadImage(str(studies / "mr_copy.nrrd"))
    label = answers["mr_copy"]
    np.testing.assert_allclose(label.GetOrigin(), nrrd_input.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), nrrd_input.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(answers["mr_anatomical"]))
    assert sitk.GetArrayFromImage(label).any()


def test_slicer_roi_then_point_on_volume(server: str) -> None:
    roi = [25, 5, 5, 35, 10, 14]  # i pair reversed, as Slicer's RAS->IJK can give it
    status, first, _, _ = infer(server, "sam_med2d_box", "mr_anatomical", {"roi": roi, "label": "b"} | SLICER)
    assert status == 200, first
    assert first["slice"] == 12 and first["used_previous_mask"] is False
    status, second, _, _ = infer(
        server, "sam_med2d_box", "mr_anatomical", {"roi": roi, "foreground": [[15, 20, 12]], "label": "b"} | SLICER
    )
    assert status == 200, second
    assert second["used_previous_mask"] is True and second["embedding_cached"] is True


def test_ohif_click_returns_the_label_file(server: str, tmp_path: Path) -> None:
    """OHIF asks output=image and .nrrd/uint16; the body is the label volume."""
    params = {"foreground": [[16, 20, 12]], "background": [[5, 5, 12]]} | OHIF
    status, _, data, _ = infer(server, "sam_med2d_points", "mr_anatomical", params, output="image")
    assert status == 200
    label = read_label_file(data, ".nrrd", tmp_path)
    assert label.GetPixelID() == sitk.sitkUInt16
    assert label.GetSize() == (33, 41, 25)


def test_window_and_json_output(server: str) -> None:
    status, default, _, _ = infer(server, "sam_med2d_points", "mr_anatomical", {"foreground": [[16, 20, 3]]})
    assert status == 200 and default["embedding_cached"] is False
    status, windowed, _, _ = infer(
        server,
        "sam_med2d_points",
        "mr_anatomical",
        {"foreground": [[16, 20, 3]], "window": {"level": 500, "width": 2000}},
    )
    assert status == 200 and windowed["embedding_cached"] is False  # another intensity mapping, another embedding
    status, again, data, _ = infer(
        server,
        "sam_med2d_points",
        "mr_anatomical",
        {"foreground": [[16, 20, 3]], "window": [-500, 1500]},
        output="json",
    )
    assert status == 200 and again["embedding_cached"] is True and data is None


def test_single_frame_dicom(server: str, tmp_path: Path) -> None:
    status, result, data, _ = infer(
        server, "sam_med2d_points", "ct_small", {"foreground": [[64, 64]], "window": [-160, 240]}
    )
    assert status == 200, result
    assert read_label_file(data, ".nii.gz", tmp_path).GetSize() == (128, 128, 1)  # a PNG cannot carry the geometry
    status, result, data, _ = infer(server, "sam_med2d_box", "ct_small", {"box": [30, 30, 90, 100]} | SLICER)
    assert status == 200, result
    assert read_label_file(data, ".nrrd", tmp_path).GetSize() == (128, 128, 1)


def test_dicom_series_folder(server: str, studies: Path, tmp_path: Path) -> None:
    """A DICOM series (a folder in the datastore, as a DICOMweb datastore caches it)."""
    folder = studies / "ct_series"
    _write_dicom_series(Path(pydicom.data.get_testdata_file("CT_small.dcm")), folder)
    status, result, data, _ = infer(server, "sam_med2d_points", str(folder), {"foreground": [[64, 60, 2]]} | SLICER)
    assert status == 200, result
    label_path = tmp_path / "label.nrrd"
    label_path.write_bytes(data)
    label, series = (
        sitk.ReadImage(str(label_path)),
        sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))),
    )
    assert label.GetSize() == series.GetSize() == (128, 128, 4)
    np.testing.assert_allclose(label.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(label.GetSpacing(), series.GetSpacing(), atol=1e-4)
    assert not np.delete(sitk.GetArrayFromImage(label), 2, axis=0).any()


def test_uploaded_file(server: str, golden: dict) -> None:
    buffer = io.BytesIO()
    Image.fromarray(golden["cases"]["image"]).save(buffer, format="PNG")
    response = requests.post(
        f"{server}/infer/sam_med2d_points",
        files={
            "params": (None, json.dumps({"foreground": [[120, 90]], "reset": True})),
            "file": ("upload.png", buffer.getvalue()),
        },
        params={"output": "image"},
    )
    assert response.status_code == 200, response.text
    expected = golden["cases"]["one_point.masks_logits"][0] > 0
    np.testing.assert_array_equal(read_png(response.content).astype(bool), expected)


@pytest.mark.parametrize(
    ("model", "image", "params", "status", "words"),
    [
        ("sam_med2d_points", "golden", {"foreground": [[258, 10]]}, 400, "outside the image"),
        ("sam_med2d_points", "golden", {"foreground": [[-1, 10]]}, 400, "outside the image"),
        ("sam_med2d_box", "golden", {"box": [40, 30, 40, 150]}, 400, "empty box"),
        ("sam_med2d_box", "golden", {"box": [200, 30, 40, 150]}, 400, "inverted box"),
        ("sam_med2d_box", "golden", {"box": [40, 30, 400, 150]}, 400, "outside the image"),
        ("sam_med2d_points", "golden", {}, 400, "no prompt"),
        ("sam_med2d_points", "golden", {"foreground": "12,3"}, 400, "must be a JSON list"),
        ("sam_med2d_points", "mr_anatomical", {"foreground": [[10, 10]], "slice": 25}, 400, "slice 25 is out of range"),
        ("sam_med2d_points", "mr_anatomical", {"foreground": [[10, 10, 30]]}, 400, "outside the image"),
        ("sam_med2d_points", "mr_anatomical", {"foreground": [[10, 10]]}, 400, "which slice"),
        ("sam_med2d_points", "no_such_image", {"foreground": [[10, 10]]}, 404, "unknown image"),
        ("sam_med2d_points", "broken", {"foreground": [[10, 10]]}, 422, "unreadable image"),
        (
            "sam_med2d_points",
            "golden",
            {"foreground": [[10, 10]], "multimask_output": "maybe"},
            400,
            "multimask_output",
        ),
        ("sam_med2d_points", "golden", {"foreground": [[10, 10]], "window": [5, 1]}, 400, "window"),
        ("no_such_model", "golden", {"foreground": [[10, 10]]}, 404, "unknown model"),
        ("sam_med2d_points", "golden", {"foreground": [[10, 10]], "result_extension": ".jpg"}, 400, "not supported"),
        ("sam_med2d_points", "mr_anatomical", {"foreground": [[1, 1, 1]], "result_extension": ".png"}, 400, "volume"),
        ("sam_med2d_points", "golden", {"foreground": [[10, 10]], "result_dtype": "float32"}, 400, "uint8 or uint16"),
    ],
)
def test_bad_requests_get_4xx(server: str, model: str, image: str, params: dict, status: int, words: str) -> None:
    code, body, _, _ = infer(server, model, image, params)
    assert code == status, body
    assert words in body["detail"]
    ok, result, _, _ = infer(server, "sam_med2d_points", "golden", {"foreground": [[120, 90]]})
    assert ok == 200, result


def test_demo_datastore_images_all_answer(server: str, studies: Path, tmp_path: Path) -> None:
    for image, click in (
        ("retina_fundus", [300, 300]),
        ("retina_microaneurysms", [50, 50]),
        ("cells_fluorescence", [100, 100]),
    ):
        status, result, data, name = infer(server, "sam_med2d_points", image, {"foreground": [click]})
        assert status == 200, result
        source = read_image(next(studies.glob(f"{image}.*")))
        # Pictures stating a pixel size answer .nii.gz (their geometry), others PNG.
        label = read_label_file(data, ".nii.gz" if name.endswith(".nii.gz") else ".png", tmp_path)
        assert name.endswith(".nii.gz" if source.affine is not None else ".png")
        assert label.GetSize()[:2] == source.view_hw[::-1]
