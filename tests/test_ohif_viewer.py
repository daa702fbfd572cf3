"""How the app builds and serves the OHIF viewer (``apps/sam_med2d/ohif_viewer.py``), without the network: the
prebuilt viewer moved from ``/`` to ``/ohif/``, tarball members that would land outside the build refused, and the
``/ohif/`` route serving our modules, the viewer's files and its page, never a file outside those folders.

The whole viewer in a browser is ``tests/test_ohif_browser.py``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from apps.sam_med2d.ohif_viewer import (
    PIN,
    STAMP,
    ViewerBuildError,
    _move_to_prefix,
    _unpack,
    load_pin,
    serve_viewer,
    viewer_ready,
)

INDEX = (
    '<html><head><script>window.PUBLIC_URL="/"</script><link href="/app.bundle.css" rel="stylesheet">'
    '<script defer src="/app.bundle.0f61.js"></script></head></html>'
)


def _prebuilt(folder: Path) -> Path:
    """The files of OHIF's dist that name its public path, as the published build writes them."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(INDEX)
    (folder / "app.bundle.0f61.js").write_text('(() => {\n__webpack_require__.p = "/";\n})();')
    (folder / "compute.bundle.9a.js").write_text('__webpack_require__.p = "/";')
    (folder / "app.bundle.css").write_text("@font-face{src:url(/a34f.woff2)}")
    return folder


def test_the_prebuilt_viewer_is_moved_to_ohif(tmp_path: Path) -> None:
    out = _prebuilt(tmp_path / "dist")
    _move_to_prefix(out)
    html = (out / "index.html").read_text()
    assert 'window.PUBLIC_URL="/ohif/"' in html
    assert 'src="/ohif/app.bundle.0f61.js"' in html and 'href="/ohif/app.bundle.css"' in html
    assert '__webpack_require__.p = "/ohif/";' in (out / "app.bundle.0f61.js").read_text()
    assert '__webpack_require__.p = "/ohif/";' in (out / "compute.bundle.9a.js").read_text()
    assert "url(/ohif/a34f.woff2)" in (out / "app.bundle.css").read_text()


def test_a_viewer_laid_out_differently_is_refused(tmp_path: Path) -> None:
    out = _prebuilt(tmp_path / "dist")
    (out / "app.bundle.0f61.js").write_text("__webpack_require__.p = window.base;")
    with pytest.raises(ViewerBuildError, match="no app bundle sets"):
        _move_to_prefix(out)
    (out / "index.html").write_text("<html></html>")
    with pytest.raises(ViewerBuildError, match="index.html has no"):
        _move_to_prefix(out)


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_only_dist_is_unpacked_without_the_omitted_folders(tmp_path: Path) -> None:
    tarball = _tarball(
        tmp_path / "app.tgz",
        {
            "package/package.json": b"{}",
            "package/dist/index.html": INDEX.encode(),
            "package/dist/assets/logo.svg": b"<svg/>",
            "package/dist/ort/ort-wasm.wasm": b"\0asm",
        },
    )
    _unpack(tarball, tmp_path / "out", ["ort"])
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert found == ["assets/logo.svg", "index.html"]


def test_a_member_escaping_the_build_folder_is_refused(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path / "evil.tgz", {"package/dist/../../../escaped.txt": b"x"})
    with pytest.raises(tarfile.FilterError):
        _unpack(tarball, tmp_path / "out" / "build", [])
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.fixture()
def served(tmp_path: Path) -> TestClient:
    build = _prebuilt(tmp_path / "build")
    (build / STAMP).write_text(json.dumps(load_pin()))
    source = tmp_path / "src"
    source.mkdir()
    (source / "app-config.js").write_text("window.config = {};")
    (source / "extension.js").write_text("export default {};")
    (tmp_path / "secret.txt").write_text("not served")
    app = FastAPI()
    assert serve_viewer(app, build=build, source=source)
    return TestClient(app)


def test_the_route_serves_our_modules_the_viewer_and_its_page(served: TestClient) -> None:
    module = served.get("/ohif/sam-med2d/extension.js")
    assert module.status_code == 200 and module.text == "export default {};"
    assert module.headers["content-type"].startswith("text/javascript")  # ES modules need a JavaScript type
    assert served.get("/ohif/app-config.js").text == "window.config = {};"
    assert served.get("/ohif/app.bundle.css").text.startswith("@font-face")
    for route in ("/ohif/", "/ohif/sam-med2d", "/ohif/viewer?StudyInstanceUIDs=1.2.3"):
        assert served.get(route).text == INDEX  # the viewer's own routes get its page


@pytest.mark.parametrize(
    "path", ["/ohif/sam-med2d/..%2F..%2Fsecret.txt", "/ohif/..%2Fsecret.txt", "/ohif/%2E%2E/secret.txt"]
)
def test_no_path_leaves_the_viewer_folders(served: TestClient, path: str) -> None:
    answer = served.get(path)
    assert "not served" not in answer.text


def test_without_a_build_the_route_is_not_taken(tmp_path: Path) -> None:
    app = FastAPI()
    assert not viewer_ready(tmp_path / "none")
    assert not serve_viewer(app, build=tmp_path / "none")
    assert not app.router.routes or all("/ohif/" not in getattr(r, "path", "") for r in app.router.routes)


def test_the_pin_names_a_version_and_its_sha512() -> None:
    pin = json.loads(PIN.read_text())
    assert pin["package"] == "@ohif/app" and pin["integrity"].startswith("sha512-")
