"""An annotator's session in the OHIF the app serves at ``/ohif/`` (OHIF 3.13 with the SAM-Med2D mode), in a real
headless Chromium against a real Orthanc and the real server, driven only by what an annotator sees and does: buttons,
mouse clicks on the image, typing. No script runs in the page.

Open the study list, the CT study, its "SAM-Med2D" workflow; pick "Foreground point" and click on the liver (the mask
appears), pick "Background point" and click a correction (the mask is refined), name the segment, "Save label", "Next
series", and there draw a box. Checked: the SEG is in Orthanc for that series and decodes to the mask the panel showed
(its voxel count, as OHIF's labelmap holds it, and the server's last answer voxel for voxel), the viewport showed it
(segment-coloured pixels appeared in the image), the retraining scheduler started a run on that one new label
(``--conf retrain_after_labels 1``), "Next series" opened the series ``/activelearning/sam_uncertainty`` suggests and
a box there is answered by the box model. A screenshot of every step is kept in ``tests/artifacts/ohif_*.png``
(git-ignored).

Needs Debian's ``chromium`` (through Playwright, no browser download), Orthanc with DICOMweb, the shared data and,
once, node and npm to fetch the pinned viewer (``make ohif``); skips with the install command otherwise. The test
model is the seeded, untrained ``golden_tiny`` network, so masks are noise-like: the test is about the plumbing.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK
from PIL import Image
from requests_toolbelt.multipart.decoder import MultipartDecoder

from apps.sam_med2d.dicomweb import init_dicomweb_datastore
from apps.sam_med2d.ohif_viewer import HOW_TO_BUILD, ViewerBuildError, build_viewer, viewer_ready
from scripts.dicom_demo import volume_to_mr_series
from scripts.monailabel_server import free_port, server_log, start_server, stop_server
from scripts.orthanc import Orthanc, missing_requirements
from tests.conftest import golden_conf

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _why_skip() -> str | None:
    if missing_requirements():
        return missing_requirements()
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium; see scripts/install_system_deps.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    if not viewer_ready() and shutil.which("npm") is None:
        return f"the OHIF viewer is not built and npm is missing (apt-get install nodejs npm; then {HOW_TO_BUILD})"
    return None


pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip())),
]


@pytest.fixture(scope="module")
def viewer() -> Path:
    try:
        return build_viewer()
    except ViewerBuildError as exc:
        pytest.fail(f"the OHIF viewer could not be built: {exc}")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """The 3-slice CT to annotate and an MR series (unlabelled: what "Next series" opens)."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start()
    try:
        ct_files = sorted((data_dir / "dicom_ct_seg").glob("0*.dcm"))
        mr_files = volume_to_mr_series(data_dir / "nifti" / "example_mr_sm.nii.gz", tmp_path_factory.mktemp("mr"))
        orthanc.upload(ct_files + mr_files)
        ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        mr = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
        yield (
            orthanc,
            str(ct.StudyInstanceUID),
            str(ct.SeriesInstanceUID),
            str(ct.PatientName),
            str(mr.SeriesInstanceUID),
        )
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def server(viewer: Path, pacs, golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    orthanc = pacs[0]
    conf = golden_conf(
        golden_dir,
        tmp_path_factory.mktemp("model"),
        dicomweb_cache_path=tmp_path_factory.mktemp("dicomweb_cache"),
        dicomweb_cache_s=0,
        retrain_after_labels=1,
        retrain_poll_seconds=1,
        retrain_params=json.dumps({"max_epochs": 1}, separators=(",", ":")),  # one argument
    )
    # No background uncertainty scoring: on two shared cores it would compete with the browser.
    url = start_server("apps/sam_med2d", orthanc.dicomweb_url, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    yield url
    print(server_log(url)[-4000:])
    stop_server(url)


def _answer_mask(response) -> tuple[dict, np.ndarray]:
    """The server's infer answer (``output=all``): its JSON and the label NRRD as an ``(I, J, K)`` array."""
    parts = MultipartDecoder(response.body(), response.headers["content-type"]).parts
    by_name = {re.search(rb'name="([^"]+)"', p.headers[b"Content-Disposition"]).group(1): p for p in parts}
    header, _, data = by_name[b"image"].content.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    sizes = [int(s) for s in fields["sizes"].split()]
    mask = np.frombuffer(data, dtype=np.uint8, count=int(np.prod(sizes))).reshape(sizes, order="F")
    return json.loads(by_name[b"params"].content), mask


def _segment_coloured(png: bytes) -> int:
    """Pixels of a screenshot in the segment's red (the CT itself is grey)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)).sum())


def _shown_voxels(page) -> int:
    text = page.get_by_text(re.compile(r"^Mask: \d+ voxels")).inner_text()
    return int(text.split()[1])


def test_annotator_clicks_refines_names_saves_and_moves_on(server: str, pacs, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    orthanc, study, series, patient, mr_series = pacs
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

            # 1. the study list (the PACS through the server), the CT study, the SAM-Med2D workflow
            page.goto(f"{server}/ohif/")
            page.get_by_text(patient, exact=True).click(timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_0_study_list.png"))
            page.get_by_role("button", name="SAM-Med2D").click()
            page.get_by_text("(1/3)").wait_for(timeout=120_000)
            assert f"StudyInstanceUIDs={study}" in page.url
            page.wait_for_load_state("networkidle", timeout=120_000)
            banner = page.get_by_text("Confirm and Hide")  # OHIF's first-visit notice
            if banner.is_visible():
                banner.click()
            viewport = page.locator("[data-viewport-uid]").first
            before = _segment_coloured(viewport.screenshot())
            page.screenshot(path=str(ARTIFACTS / "ohif_1_open.png"))

            # 2. a foreground click on the liver: the mask appears
            box = viewport.bounding_box()
            page.get_by_role("button", name="Foreground point").click()
            with page.expect_response(lambda r: "/infer/sam_med2d_points" in r.url, timeout=120_000) as first:
                page.mouse.click(box["x"] + 0.375 * box["width"], box["y"] + 0.483 * box["height"])
            assert first.value.status == 200, first.value.text()
            result, mask = _answer_mask(first.value)
            k = result["slice"]
            assert mask.shape == (512, 512, 3) and mask[:, :, k].any() and not np.delete(mask, k, axis=2).any()
            expect(page.get_by_text(f"Mask: {int(mask.sum())} voxels on 1 slice")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_2_foreground_click.png"))

            # 3. a background click corrects it: the server refines its previous mask with both points
            page.get_by_role("button", name="Background point").click()
            with page.expect_response(lambda r: "/infer/sam_med2d_points" in r.url, timeout=120_000) as second:
                page.mouse.click(box["x"] + 0.55 * box["width"], box["y"] + 0.45 * box["height"])
            assert second.value.status == 200, second.value.text()
            sent = json.loads(second.value.request.post_data.split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])
            assert len(sent["foreground"]) == 1 and len(sent["background"]) == 1 and sent["reset"] is False
            result, mask = _answer_mask(second.value)
            assert result["used_previous_mask"] and result["slice"] == k
            expect(page.get_by_text(f"Mask: {int(mask.sum())} voxels on 1 slice")).to_be_visible(timeout=30_000)
            shown = _shown_voxels(page)
            after = _segment_coloured(viewport.screenshot())
            assert after > before + 500, f"the mask is not drawn on the image ({before} -> {after} red pixels)"
            page.screenshot(path=str(ARTIFACTS / "ohif_3_correction_click.png"))

            # 4. name the segment; OHIF's segmentation panel (its tab) lists it under that name
            name = page.get_by_label("Segment name")
            name.fill("liver")
            name.press("Enter")
            page.locator('[data-cy="panelSegmentationWithToolsLabelMap-btn"]').click()
            expect(page.get_by_text("liver", exact=True)).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_4_named.png"))
            page.locator('[data-cy="prompts-btn"]').click()

            # 5. save: the server stores a DICOM SEG of the series in the PACS
            with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as saved:
                page.get_by_role("button", name="Save label").click()
            assert saved.value.status == 200, saved.value.text()
            expect(page.get_by_text('Saved "liver" as a DICOM SEG')).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_5_saved.png"))

            # 6. the retraining scheduler counts the new label: with retrain_after_labels 1 it starts a run on it
            run = None
            deadline = time.monotonic() + 60
            while run is None and time.monotonic() < deadline:
                retraining = requests.get(f"{server}/info/", timeout=30).json()["retraining"]
                runs = [r for r in [retraining["running"], *retraining["history"]] if r]
                run = next((r for r in runs if r["trigger"] == "labels"), None)
                time.sleep(1)
            assert run is not None, f"no retraining run started on the saved label: {retraining}"
            assert run["new_labels"] == 1

            # 7. next series: the one /activelearning/sam_uncertainty suggests (the unlabelled MR) opens
            page.get_by_role("button", name="Next series").click()
            page.wait_for_url(re.compile(f"SeriesInstanceUIDs={re.escape(mr_series)}"), timeout=60_000)
            page.get_by_text(re.compile(r"\(1/\d+\)")).wait_for(timeout=120_000)
            page.wait_for_load_state("networkidle", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_6_next_series.png"))

            # 8. there, a box: the box model answers and the mask shows in the panel
            viewport = page.locator("[data-viewport-uid]").first
            box = viewport.bounding_box()
            page.get_by_role("button", name="Box").click()
            x, y = box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"]
            with page.expect_response(lambda r: "/infer/sam_med2d_box" in r.url, timeout=120_000) as boxed:
                page.mouse.move(x, y)
                page.mouse.down()
                page.mouse.move(x + 0.2 * box["width"], y + 0.2 * box["height"], steps=10)
                page.mouse.up()
            assert boxed.value.status == 200, boxed.value.text()
            sent = json.loads(boxed.value.request.post_data.split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])
            (i1, j1, i2, j2) = sent["box"]
            assert i1 < i2 and j1 < j2 and not sent["foreground"]
            _, mr_mask = _answer_mask(boxed.value)
            expect(page.get_by_text(f"Mask: {int(mr_mask.sum())} voxels on 1 slice")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "ohif_7_box_on_next_series.png"))
        finally:
            page.screenshot(path=str(ARTIFACTS / "ohif_last_state.png"))
            browser.close()
            (ARTIFACTS / "ohif_console.log").write_text("\n".join(console))

    # The SEG in Orthanc references the CT series and decodes to the displayed mask, named as typed.
    segs = [s for s in orthanc.series() if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 1
    store = init_dicomweb_datastore(orthanc.dicomweb_url, {"dicomweb_cache_path": str(tmp_path / "cache")})
    assert store.latest_segs()[series]["seg"] == segs[0]["MainDicomTags"]["SeriesInstanceUID"]
    (item,) = store.datalist()
    label = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(item["label"])).transpose(2, 1, 0)
    assert item["segments"] == {"1": "liver"}
    assert int((label > 0).sum()) == shown
    assert np.array_equal(label > 0, mask > 0)
