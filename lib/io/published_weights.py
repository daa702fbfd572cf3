"""Fetching the published SAM-Med2D ViT-B weights (``sam-med2d_b.pth``) from the authors' Google Drive link.

The download streams into ``<name>.part`` with progress, is checked by loading it as a SAM-Med2D ViT-B checkpoint,
and only then renamed into place, so an interrupted or wrong download never leaves a file that looks usable. It fails
fast (short connect timeout) when there is no network, so an offline server still starts promptly.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from lib.common.atomic_files import atomic_path

logger = logging.getLogger(__name__)

GOOGLE_DRIVE_ID = "1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl"
PUBLISHED_PAGE = f"https://drive.google.com/file/d/{GOOGLE_DRIVE_ID}/view"
PUBLISHED_URL = f"https://drive.usercontent.google.com/download?id={GOOGLE_DRIVE_ID}&export=download&confirm=t"
PUBLISHED_FILE = "sam-med2d_b.pth"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


class DownloadError(RuntimeError):
    """The weights could not be fetched or are not a SAM-Med2D checkpoint; the message says what to do."""


def how_to_fetch(model_dir: str | Path) -> str:
    """Instructions for a user whose server could not download the weights."""
    return (
        f"download sam-med2d_b.pth from {PUBLISHED_PAGE} (authors' link) and put it in {model_dir}/, "
        "or start with --conf checkpoint <path to a SAM-Med2D or SAM ViT-B checkpoint>"
    )


def find_local_weights(model_dir: str | Path, exclude: tuple[str, ...] = ("published.pt",)) -> Path | None:
    """The base checkpoint kept in ``model_dir``: ``sam-med2d_b.pth`` if present, else the only weights file there."""
    model_dir = Path(model_dir)
    preferred = model_dir / PUBLISHED_FILE
    if preferred.is_file():
        return preferred
    if not model_dir.is_dir():
        return None
    candidates = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.name not in exclude and not p.name.startswith(".")
    )
    return candidates[0] if len(candidates) == 1 else None


def download_published_weights(
    model_dir: str | Path,
    url: str = PUBLISHED_URL,
    connect_timeout: float = 5.0,
    verify_config: str | Path | None = "vit_b",
) -> Path:
    """Download the published weights into ``model_dir/sam-med2d_b.pth`` and return the path.

    ``verify_config``: the network the file must load as (``None``: no check).

    Raises:
        DownloadError: no network, an HTTP error, a web page instead of the file, or a file that does not load as
            SAM-Med2D ViT-B.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / PUBLISHED_FILE
    try:
        response = urllib.request.urlopen(url, timeout=connect_timeout)  # noqa: S310 (fixed https URL)
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}; {how_to_fetch(model_dir)}") from exc
    with response, atomic_path(target) as part:  # an interrupted or refused download leaves no file behind
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type:
            raise DownloadError(f"Google Drive answered with a web page, not the file; {how_to_fetch(model_dir)}")
        total = int(response.headers.get("Content-Length") or 0) or None
        logger.info("Downloading SAM-Med2D weights from %s to %s", url, target)
        try:
            with open(part, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=PUBLISHED_FILE) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as exc:
            raise DownloadError(f"download interrupted: {exc}; {how_to_fetch(model_dir)}") from exc
        if verify_config is not None:
            from lib.io.checkpoint import CheckpointError, load_model

            try:
                load_model(part, verify_config)
            except CheckpointError as exc:
                raise DownloadError(
                    "the downloaded file is not a SAM-Med2D checkpoint of this network: "
                    f"{exc}; {how_to_fetch(model_dir)}"
                ) from exc
    logger.info("SAM-Med2D weights saved to %s (%.1f MB)", target, target.stat().st_size / 2**20)
    return target
