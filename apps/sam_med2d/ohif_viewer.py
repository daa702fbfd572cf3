"""The OHIF viewer the app serves at ``/ohif/``: OHIF's prebuilt viewer from npm (``@ohif/app``; version and sha512
integrity pinned in ``ohif/viewer.json``) with the app's SAM-Med2D mode and extension (``ohif/src``: plain ES modules
that OHIF imports at run time, listed in ``ohif/src/app-config.js``).

    python -m apps.sam_med2d.ohif_viewer build    # npm pack, integrity check, unpack into apps/sam_med2d/ohif/build

Why ``npm pack`` and not ``npm install @ohif/app``: the package's dependencies are the sources its ``dist/`` was built
from, not needed to serve it, and some of them were never published (``@ohif/i18n@3.13.2``), so an install fails.
``npm pack`` fetches the one tarball through npm (its registry settings, proxy and cache), and the build refuses it
unless its sha512 is the pinned one.

The prebuilt viewer expects to be served at ``/``; the build moves it to ``/ohif/`` by rewriting the page's script and
link addresses and the bundles' chunk-loading base, and fails if a new version no longer has them where expected.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VIEWER_DIR = Path(__file__).resolve().parent / "ohif"
PIN = VIEWER_DIR / "viewer.json"
SOURCE = VIEWER_DIR / "src"  # our mode, extension and app-config.js, served as they are
BUILD = VIEWER_DIR / "build"  # the unpacked, rewritten viewer (git-ignored)
STAMP = "sam-med2d-viewer.json"  # the pin the build was made from, inside BUILD
PREFIX = "/ohif/"
BUILT_PUBLIC_PATH = '__webpack_require__.p = "/";'
MEDIA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}
HOW_TO_BUILD = "make ohif (or .venv/bin/python -m apps.sam_med2d.ohif_viewer build; needs node and npm)"


class ViewerBuildError(RuntimeError):
    """The viewer could not be fetched, checked or rewritten; the message says which step and why."""


def load_pin(pin: Path = PIN) -> dict[str, Any]:
    return json.loads(pin.read_text())


def viewer_ready(build: Path = BUILD, pin: Path = PIN) -> bool:
    """Whether ``build`` holds the viewer of the current pin."""
    stamp = build / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == load_pin(pin)


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _npm_pack(spec: str, folder: Path, npm: str) -> Path:
    try:
        done = subprocess.run(
            [npm, "pack", spec, "--json", "--pack-destination", str(folder)],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except FileNotFoundError as exc:
        raise ViewerBuildError(f"npm is not installed (apt-get install nodejs npm): {exc}") from exc
    if done.returncode != 0:
        raise ViewerBuildError(f"npm pack {spec} failed: {done.stderr.strip()[-1000:]}")
    return folder / json.loads(done.stdout)[0]["filename"]


def _unpack(tarball: Path, out: Path, omit: list[str]) -> None:
    """``package/dist/`` of the tarball into ``out``, without the top-level folders in ``omit``."""
    with tarfile.open(tarball) as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if parts[:2] != ("package", "dist") or len(parts) < 3 or parts[2] in omit:
                continue
            member.name = str(Path(*parts[2:]))
            members.append(member)
        archive.extractall(out, members=members, filter="data")


def _move_to_prefix(out: Path) -> None:
    """Rewrite the page, its style sheets and the bundles that name the public path ``/`` to :data:`PREFIX`."""
    index = out / "index.html"
    html = index.read_text()
    for old, new in (('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"'), ('src="/', f'src="{PREFIX}')):
        if old not in html:
            raise ViewerBuildError(f"index.html has no {old!r}: the pinned viewer is laid out differently")
        html = html.replace(old, new)
    index.write_text(html.replace('href="/', f'href="{PREFIX}'))
    for sheet in out.glob("*.css"):
        sheet.write_text(sheet.read_text().replace("url(/", f"url({PREFIX}"))
    rewritten = []
    for bundle in out.glob("*.js"):
        text = bundle.read_text(errors="surrogateescape")
        if BUILT_PUBLIC_PATH in text:
            bundle.write_text(
                text.replace(BUILT_PUBLIC_PATH, f'__webpack_require__.p = "{PREFIX}";'), errors="surrogateescape"
            )
            rewritten.append(bundle.name)
    if not any(name.startswith("app.bundle.") for name in rewritten):
        raise ViewerBuildError(f"no app bundle sets {BUILT_PUBLIC_PATH!r}: the pinned viewer is built differently")


def build_viewer(build: Path = BUILD, pin: Path = PIN, npm: str = "npm") -> Path:
    """Fetch the pinned viewer with npm, check its integrity and unpack it, rewritten for :data:`PREFIX`, into
    ``build`` (replaced only once the new one is complete). Does nothing when ``build`` is already this pin's."""
    if viewer_ready(build, pin):
        return build
    wanted = load_pin(pin)
    spec = f"{wanted['package']}@{wanted['version']}"
    with tempfile.TemporaryDirectory(prefix="ohif_viewer_") as scratch:
        tarball = _npm_pack(spec, Path(scratch), npm)
        found = _integrity(tarball)
        if found != wanted["integrity"]:
            raise ViewerBuildError(f"{spec}: integrity {found} is not the pinned {wanted['integrity']}")
        staging = build.with_name(build.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _unpack(tarball, staging, list(wanted.get("omit", [])))
        _move_to_prefix(staging)
        (staging / STAMP).write_text(json.dumps(wanted))
        shutil.rmtree(build, ignore_errors=True)
        staging.rename(build)
    logger.info("OHIF viewer %s unpacked into %s", spec, build)
    return build


def _file_under(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it is a file inside ``root`` (no way out through ``..`` or links)."""
    if not relative:
        return None
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root.resolve()) and candidate.is_file() else None


def serve_viewer(app: Any, build: Path = BUILD, source: Path = SOURCE) -> bool:
    """Serve the built viewer at ``/ohif/`` of the FastAPI ``app``, ahead of MONAI Label's bundled OHIF: our files
    (``app-config.js``, ``sam-med2d/*``) from ``source``, the viewer's from ``build``, and its page for every other
    path (the viewer's own routes). Returns False, serving nothing, when the viewer is not built."""
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    if not viewer_ready(build):
        logger.warning(
            "The SAM-Med2D OHIF viewer is not built; /ohif/ serves MONAI Label's. To build: %s", HOW_TO_BUILD
        )
        return False

    async def viewer_file(request: Any) -> Response:
        relative = request.path_params["path"]
        found = _file_under(source, relative.removeprefix("sam-med2d/")) if relative.startswith("sam-med2d/") else None
        if relative == "app-config.js":
            found = source / "app-config.js"
        found = found or _file_under(build, relative) or build / "index.html"
        headers = {"Cache-Control": "no-cache"} if found.suffix in (".html", ".js") else None
        return FileResponse(found, media_type=MEDIA_TYPES.get(found.suffix), headers=headers)

    app.router.routes.insert(0, Route(PREFIX + "{path:path}", viewer_file, methods=["GET", "HEAD"]))
    logger.info("OHIF viewer with the SAM-Med2D mode at %s (from %s)", PREFIX, build)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apps.sam_med2d.ohif_viewer", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", type=Path, default=BUILD, help="where to unpack the viewer (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_viewer(args.out)
    except ViewerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"OHIF viewer ready in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
