"""Bounds on what one request may make the server do, read from ``--conf max_<field>``.

The defaults are sized for real clinical images: a mammogram (about 4000x5000), a digital radiograph (4300x4300),
a whole-body CT (512x512x2000) and a photon-counting CT (1024x1024x1000) are all inside them; a 100 KB PNG that
claims 12000x12000 pixels (576 MB decoded as RGB) is not. Every bound is checked before the expensive work it
guards: pixels from the file's header before decoding, points before any model work, bytes before the body is read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from lib.common.settings import dataclass_from_conf


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request bounds (``--conf max_image_pixels 64000000``...).

    Attributes:
        image_pixels: pixels of a 2D picture or DICOM frame (colour channels not counted).
        volume_voxels: voxels of a 3D volume or DICOM series.
        upload_mb: bytes of one request body (an uploaded image or label, an infer request).
        points: foreground plus background points in one request.
        state_mb: remembered previous masks of all clients together (each ``(256, 256)`` float32, 256 KB).
        id_chars: characters of a ``client_id`` or interaction ``label`` (they are kept as keys of that state).
        request_threads: requests served at once (inference, uploads...); more wait without holding up the server.
    """

    image_pixels: int = 64_000_000
    volume_voxels: int = 2**30
    upload_mb: float = 2048.0
    points: int = 500
    state_mb: float = 128.0
    id_chars: int = 128
    request_threads: int = 16

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"max_{field.name} must be positive, got {getattr(self, field.name)!r}")

    @property
    def upload_bytes(self) -> int:
        return int(self.upload_mb * 2**20)

    @property
    def state_bytes(self) -> int:
        return int(self.state_mb * 2**20)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Limits:
        return dataclass_from_conf(cls, conf, "max_")


# A plain name: what a file name in one folder can be on every platform, with nothing a path could make of it
# (no separator, no leading dot so never "." or ".." or a hidden file, no control or shell characters).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_plain_name(value: Any) -> bool:
    """Whether ``value`` is a plain name (an image id, a label tag) that can never leave the folder it is joined to."""
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


def is_dicom_uid(value: Any) -> bool:
    """Whether ``value`` is a well-formed DICOM UID (and so a safe folder or file name)."""
    return isinstance(value, str) and len(value) <= 64 and _DICOM_UID.fullmatch(value) is not None
