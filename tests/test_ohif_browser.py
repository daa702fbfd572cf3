"""OHIF, as MONAI Label serves it at ``/ohif/``, in a real (headless) Chromium against a real Orthanc.

An annotator's session: open a CT series in the MONAI Label mode, connect the MONAI Label panel to the server, pick
the SAM-Med2D model in "Point Prompts", place a foreground click on the image, run, see the mask; then save it as a
DICOM SEG into the PACS, which the app's datastore reads back as a training label. The screenshot of the result is
kept in ``tests/artifacts/ohif_sam_med2d.png`` (git-ignored).

How the save is driven: OHIF's "MONAI Label" mode has no save button (its right panel is the MONAI Label panel
only; the segmentation panel with "Export DICOM SEG" belongs to other modes), so the test runs OHIF's own commands
that button runs, ``generateSegmentation`` (dcmjs writes the SEG in the browser) and the data source's STOW-RS
through MONAI Label's ``/proxy/dicom``, from the page (``window.commandsManager``), skipping only the name prompt.

Needs Debian's ``chromium`` (used through Playwright, no browser download), Orthanc with DICOMweb and the shared
data; skips with the reason otherwise. The series is the 3-slice uncompressed CT: Orthanc 1.10 cannot transcode
the 20-slice JPEG 2000 series to what OHIF's image loader asks for (see docs/dicom.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest

from apps.sam_med2d.dicomweb import init_dicomweb_datastore
from scripts.monailabel_server import free_port, server_log, start_server, stop_server
from scripts.orthanc import Orthanc, missing_requirements

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
    return None


pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip())),
]

PROBE_COUNT_JS = (
    "window.cornerstoneTools.annotation.state.getAllAnnotations()"
    ".filter(a => a.metadata && a.metadata.toolName === 'ProbeMONAILabel').length"
)
LABELMAP_COUNT_JS = """() => {
  const s = window.services.segmentationService.getSegmentations()[0];
  if (!s) return null;
  const volume = window.cornerstone.cache.getVolume(s.representationData.Labelmap.volumeId);
  const data = volume.voxelManager ? volume.voxelManager.getCompleteScalarDataArray() : volume.getScalarData();
  let count = 0;
  for (let i = 0; i < data.length; i++) if (data[i]) count++;
  return {id: s.segmentationId, dims: volume.dimensions, count: count,
          labels: Object.values(s.segments).filter(x => x).map(x => x.label)};
}"""

STORE_SEG_JS = """async (segmentationId) => {
  const dataSource = window.extensionManager.getActiveDataSource()[0];
  const generated = window.commandsManager.runCommand(
    'generateSegmentation', {segmentationId, options: {SeriesDescription: 'SAM-Med2D (OHIF)'}});
  await dataSource.store.dicom(generated.dataset);
  return generated.dataset.SeriesInstanceUID;
}"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port()).start()
    try:
        files = sorted((data_dir / "dicom_ct_seg").glob("0*.dcm"))
        orthanc.upload(files)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        yield orthanc, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def server(pacs, golden_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    orthanc, _, _ = pacs
    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "download": "false",
        "dicomweb_cache_path": tmp_path_factory.mktemp("dicomweb_cache"),
        "dicomweb_cache_s": 0,
    }
    url = start_server("apps/sam_med2d", orthanc.dicomweb_url, conf)
    yield url
    print(server_log(url)[-4000:])
    stop_server(url)


def test_ohif_click_mask_and_save_seg(server: str, pacs, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    orthanc, study, series = pacs
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "ohif_sam_med2d.png"
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            # the MONAI Label panel reads its server URL from this cookie (default: port 8000 of the page's host)
            context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": f"{server}/", "url": server}])
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

            # 1. open the series in the MONAI Label mode
            page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={study}&SeriesInstanceUIDs={series}")
            page.get_by_text("(2/3)").wait_for(timeout=120_000)  # the axial viewport shows the middle slice
            page.wait_for_load_state("networkidle", timeout=120_000)
            banner = page.get_by_text("Confirm and Hide")  # OHIF's first-visit notice
            if banner.is_visible():
                banner.click()

            # 2. connect the panel, choose Point Prompts (SAM-Med2D's model) and the label to annotate
            url_box = page.locator("#monailabelServerURL")
            assert url_box.input_value() == f"{server}/"
            url_box.locator("xpath=following::button[1]").click()
            page.get_by_text("Point Prompts").click(timeout=30_000)
            assert page.locator("select").filter(has_text="sam_med2d_points").count() == 1
            page.get_by_text("object", exact=True).click()

            # 3. a foreground click on the liver (left of the axial image) and Run
            viewport = page.locator("[data-viewport-uid]").first
            box = viewport.bounding_box()
            for _ in range(10):  # the panel activates its probe tool asynchronously after the tab switch
                page.mouse.click(box["x"] + 0.375 * box["width"], box["y"] + 0.483 * box["height"])
                page.wait_for_timeout(500)
                if page.evaluate(PROBE_COUNT_JS) >= 1:
                    break
            assert page.evaluate(PROBE_COUNT_JS) == 1, "no foreground point was placed with the MONAI Label probe"
            with page.expect_response(lambda r: "/infer/sam_med2d_points" in r.url, timeout=120_000) as answer:
                page.get_by_role("button", name="Run").last.click()
            response = answer.value
            assert response.status == 200, response.text()
            request = json.loads(response.request.post_data.split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])
            ((i, j, k),) = request["foreground"]
            assert 0 <= i < 512 and 0 <= j < 512 and 0 <= k < 3
            (tmp_path / "mask.nrrd").write_bytes(response.body())
            mask, _ = nrrd.read(str(tmp_path / "mask.nrrd"))
            assert mask[:, :, k].any() and not np.delete(mask, k, axis=2).any()

            # 4. the mask OHIF shows is the server's mask
            page.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0")
            shown = page.evaluate(LABELMAP_COUNT_JS)
            assert shown["dims"] == [512, 512, 3] and shown["labels"] == ["object"]
            assert shown["count"] == int((mask > 0).sum())
            page.wait_for_timeout(1500)
            page.screenshot(path=str(screenshot))

            # 5. save it as DICOM SEG into the PACS, as OHIF's export does
            seg_uid = page.evaluate(STORE_SEG_JS, shown["id"])
        finally:
            page.screenshot(path=str(ARTIFACTS / "ohif_last_state.png"))
            browser.close()
            (ARTIFACTS / "ohif_console.log").write_text("\n".join(console))

    assert screenshot.stat().st_size > 10_000
    segs = [s for s in orthanc.series() if s["MainDicomTags"].get("SeriesInstanceUID") == seg_uid]
    assert len(segs) == 1 and segs[0]["MainDicomTags"]["Modality"] == "SEG"

    # 6. the app's datastore (as training reads it) takes OHIF's SEG as the series' label
    store = init_dicomweb_datastore(orthanc.dicomweb_url, {"dicomweb_cache_path": str(tmp_path / "cache")})
    assert store.latest_segs()[series]["seg"] == seg_uid
    (item,) = store.datalist()
    import SimpleITK

    label = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(item["label"])).transpose(2, 1, 0)
    assert item["segments"] == {"1": "object"}
    assert np.array_equal(label > 0, mask > 0)
