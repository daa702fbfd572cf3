"""MONAI Label's local datastore, refusing what would write or read outside its folder.

:class:`monailabel.datastore.local.LocalDatastore` joins the ids and tags of requests into paths as given, so
``PUT /datastore/image?image=../../../../tmp/x`` writes ``/tmp/x`` and a label ``tag`` of ``../..`` does the same
for labels. Here an uploaded image's id and a label's tag must be plain names (:func:`lib.guard.limits.is_plain_name`),
the file's extension one the datastore lists (``x.json`` would overwrite ``datastore_v2.json``), and the file an
image within the server's bounds, checked from its header; a label must also pair with its image pixel for pixel
(:func:`lib.training.curation.check_label`, 422). A refusal is an HTTP 4xx naming the problem, raised before anything is
written. A saved label is fsynced (file, folder, datastore index) before the save is answered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.common.atomic_files import fsync_path
from lib.guard.limits import Limits, is_plain_name
from lib.io.image_source import ImageReadError, check_header
from lib.training.curation import CurationError, check_label


def check_tag(tag: str) -> None:
    """A label tag is a folder name under ``labels/``: a plain name or a 400."""
    if not is_plain_name(tag):
        raise HTTPException(400, f"label tag {str(tag)[:80]!r} is not a plain name (letters, digits, '_', '.', '-')")


class SafeLocalDatastore(LocalDatastore):
    """:class:`LocalDatastore` whose writes stay in its folder (see the module docstring).

    Args:
        datastore_path: the datastore folder.
        extensions: file patterns of images (``*.nii.gz``...); uploads must have one of them.
        limits: bounds on uploaded images and labels (pixels from the header).
        kwargs: as :class:`LocalDatastore`.
    """

    def __init__(self, datastore_path: str, extensions: list[str], limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        self.root = Path(datastore_path).resolve()
        self.suffixes = [e.lstrip("*").lower() for e in extensions]
        super().__init__(datastore_path, extensions=extensions, **kwargs)

    def _check_file(self, filename: str, what: str) -> None:
        if not filename.lower().endswith(tuple(self.suffixes)):
            kind = "".join(Path(filename).suffixes) or "(no extension)"
            raise HTTPException(422, f"cannot read {what} of type {kind}: use one of {', '.join(self.suffixes)}")
        try:
            check_header(filename, self.limits)
        except ImageReadError as exc:
            raise HTTPException(exc.status, f"{what}: {exc}") from exc

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        name = image_id or os.path.basename(image_filename)
        if not is_plain_name(name):
            raise HTTPException(
                400, f"image id {str(name)[:80]!r} is not a plain name (letters, digits, '_', '.', '-')"
            )
        self._check_file(image_filename, "an image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_tag(label_tag)
        if image_id not in self.list_images():  # its id then names the label file: only known ids do
            raise HTTPException(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        self._check_file(label_filename, "a label")
        try:  # a label training could not pair with its image pixel for pixel: the annotator learns it now
            check_label(self.get_image_uri(image_id), label_filename, image_id)
        except CurationError as exc:
            raise HTTPException(422, f"label not saved: {exc}") from exc
        label_id = super().save_label(image_id, label_filename, label_tag, label_info)
        # An annotator's saved work is on disk before the save is acknowledged (training reads it later).
        label_path = Path(self.get_label_uri(label_id, label_tag))
        for path in (label_path, label_path.parent, self.root / "datastore_v2.json", self.root):
            if path.exists():
                fsync_path(path)
        return label_id

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        if not self.datalist():  # MONAI Label asserts (a 500) on an empty datastore
            raise HTTPException(404, "no labelled images: the dataset archive would be empty")
        return super().get_dataset_archive(limit_cases)
