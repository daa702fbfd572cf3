"""The app's DICOMweb datastore: images from a PACS (Orthanc, dcm4chee, Google Healthcare...), labels back as DICOM SEG.

``monailabel start_server --app apps/sam_med2d --studies http://127.0.0.1:8042/dicom-web --host 127.0.0.1`` serves
every CT, MR and ultrasound series of the PACS. This is MONAI Label's own :class:`DICOMWebDatastore` (same local
cache layout, same client settings, same ``/proxy/dicom`` that OHIF reads through) with its gaps for this app closed:

- listing: one QIDO search per modality (``--conf dicomweb_modalities CT,MR,US``, the default), because DICOMweb
  servers do not agree on multi-valued ``Modality`` matching (Orthanc answers none for ``CT\\MR``); the other keys
  of ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` still apply; the list is cached for ``dicomweb_cache_s`` seconds
  (default 10; monailabel keeps it two hours, so new series would not show).
- labels are written as DICOM SEG by :mod:`lib.io.dicom_seg` (pydicom-seg, no dcmqi binary to download at start),
  one segment per label value with the names the client sent, referencing the series and each of its instances,
  and stored with STOW-RS; only once the PACS has it is the label recorded in the local cache.
- training data (:meth:`datalist`) are the newest SEG of each listed series, resampled onto the series' grid
  (a SEG from any tool that covers only some slices lines up), as a NIfTI label map beside the series' NIfTI.
- errors name the problem with an HTTP status: a PACS that does not answer (503), a series that is not (or no
  longer) in the PACS (404), a series or label that cannot be read (422), a PACS that refuses the SEG (502).
  Downloads go to a temporary folder first, so a failure leaves no partial series and no label is half stored.

Conf keys: ``dicomweb_modalities`` (comma-separated), ``dicomweb_cache_s``, ``dicomweb_timeout_s`` (one request,
default 120), ``dicomweb_cache_path`` (default: MONAI Label's ``MONAI_LABEL_DICOMWEB_CACHE_PATH`` or
``~/.cache/monailabel/dicom``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
import SimpleITK
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from apps.sam_med2d.local_datastore import check_tag
from lib.guard.limits import is_dicom_uid
from lib.io.dicom_seg import SegError, read_seg, read_series, segments_from_label_info, write_seg

logger = logging.getLogger(__name__)

DEFAULT_MODALITIES = ("CT", "MR", "US")
T = TypeVar("T")


class PacsError(HTTPException):
    """A DICOMweb failure with the HTTP status the client gets and a message naming the series and the cause."""


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client sets none, so a hung PACS would hang the server)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", (5.0, self.timeout_s))
        return super().request(method, url, **kwargs)


def init_dicomweb_datastore(studies: str, conf: Mapping[str, str]) -> SamMed2DDicomWebDatastore:
    """The datastore for ``--studies http(s)://.../dicom-web``, built from MONAI Label's settings and ``conf``."""
    session = _TimeoutSession(float(conf.get("dicomweb_timeout_s", 120)))
    username = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    if username and password:
        session.auth = (username, password)
    client = DICOMwebClientX(
        url=studies.rstrip("/").strip(),
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    # dicomweb-client retries every failure 5 times with exponential back-off (30 s before a "PACS is down" answer
    # reaches the annotator); one quick retry is enough for a PACS that hiccups.
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    modalities = [m.strip().upper() for m in conf.get("dicomweb_modalities", ",".join(DEFAULT_MODALITIES)).split(",")]
    search_filter = {k: v for k, v in dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER).items() if k != "Modality"}
    cache_path = (
        conf.get("dicomweb_cache_path")
        or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
        or settings.MONAI_LABEL_DATASTORE_CACHE_PATH
    )
    return SamMed2DDicomWebDatastore(
        client,
        modalities=[m for m in modalities if m],
        search_filter=search_filter,
        cache_path=cache_path.strip() or None,
        listing_ttl_s=float(conf.get("dicomweb_cache_s", 10)),
    )


class SamMed2DDicomWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with per-modality listing, SEG via :mod:`lib.io.dicom_seg` and clear errors.

    Args:
        client: the DICOMweb client.
        modalities: series of these modalities are listed (one QIDO search each).
        search_filter: further QIDO keys for every search (e.g. ``{"StudyDate": "2024-"}``).
        cache_path: local cache root (images converted to NIfTI, labels).
        listing_ttl_s: how long a listing of series and SEGs is reused.
    """

    def __init__(
        self,
        client,
        modalities: list[str] | tuple[str, ...] = DEFAULT_MODALITIES,
        search_filter: Mapping[str, Any] | None = None,
        cache_path: str | None = None,
        listing_ttl_s: float = 10.0,
    ) -> None:
        self.modalities = list(modalities)
        self.listing_ttl_s = listing_ttl_s
        self._lock = threading.RLock()
        self._listing: dict[str, tuple[float, Any]] = {}
        self._seg_references: dict[str, str | None] = {}  # SEG series -> referenced image series (immutable)
        super().__init__(
            client=client,
            search_filter=dict(search_filter or {}),
            cache_path=cache_path,
            fetch_by_frame=False,
            convert_to_nifti=True,
        )

    # ----------------------------------------------------------------------------------------------- PACS calls
    @contextlib.contextmanager
    def _pacs(self, what: str) -> Iterator[None]:
        """Turn the client's exceptions into :class:`PacsError` with the PACS address and what was being done."""
        try:
            yield
        except PacsError:
            raise
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 404:
                raise PacsError(404, f"{what}: not found in the PACS at {self.name()}") from exc
            raise PacsError(502, f"{what}: the PACS at {self.name()} answered HTTP {status}: {exc}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsError(
                503, f"{what}: the PACS at {self.name()} does not answer ({type(exc).__name__}); is it running?"
            ) from exc
        except requests.RequestException as exc:
            raise PacsError(502, f"{what}: DICOMweb request to {self.name()} failed: {exc}") from exc

    def _cached(self, key: str, compute: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._listing.get(key)
            if hit and now - hit[0] < self.listing_ttl_s:
                return hit[1]
        value = compute()
        with self._lock:
            self._listing[key] = (time.monotonic(), value)
        return value

    def _forget_listings(self) -> None:
        with self._lock:
            self._listing.clear()

    def _search_series(
        self, search_filter: Mapping[str, Any], what: str, fields: list[str] | None = None
    ) -> list[Dataset]:
        with self._pacs(what):
            found = self._client.search_for_series(search_filters=dict(search_filter), fields=fields)
        return [Dataset.from_json(item) for item in found]

    def find_series(self, series_uid: str) -> Dataset | None:
        """The PACS's QIDO record of one series (study, modality...), or ``None`` when the PACS does not have it."""
        for ds in self._search_series({"SeriesInstanceUID": series_uid}, f"looking up series {series_uid}"):
            if str(ds.get("SeriesInstanceUID", "")) == series_uid:
                return ds
        return None

    def list_images(self) -> list[str]:
        """SeriesInstanceUIDs of every series of the configured modalities (not SEGs), sorted."""

        def search() -> list[str]:
            found: set[str] = set()
            for modality in self.modalities:
                query = {**self._search_filter, "Modality": modality}
                for ds in self._search_series(query, f"listing {modality} series"):
                    found.add(str(ds["SeriesInstanceUID"].value))
            return sorted(found)

        return self._cached("images", search)

    def _seg_series(self) -> list[dict[str, str]]:
        """Every SEG in the PACS: ``{"seg", "study", "image", "when"}`` (``image``: the series it annotates)."""

        def search() -> list[dict[str, str]]:
            segs = []
            fields = ["SeriesDate", "SeriesTime"]  # not among QIDO's default return keys
            for ds in self._search_series({"Modality": "SEG"}, "listing DICOM SEG series", fields):
                seg_uid, study_uid = str(ds["SeriesInstanceUID"].value), str(ds["StudyInstanceUID"].value)
                if seg_uid not in self._seg_references:
                    with self._pacs(f"reading DICOM SEG {seg_uid}"):
                        meta = self._client.retrieve_series_metadata(study_uid, seg_uid)
                    first = Dataset.from_json(meta[0]) if meta else Dataset()
                    referenced = first.get("ReferencedSeriesSequence")
                    self._seg_references[seg_uid] = str(referenced[0].SeriesInstanceUID) if referenced else None
                    if not referenced:
                        logger.warning("DICOM SEG %s names no referenced series; it is not a training label", seg_uid)
                image_uid = self._seg_references[seg_uid]
                if image_uid:
                    when = f"{ds.get('SeriesDate', '')}{ds.get('SeriesTime', '')}"
                    segs.append({"seg": seg_uid, "study": study_uid, "image": image_uid, "when": when})
            return segs

        return self._cached("segs", search)

    def latest_segs(self) -> dict[str, dict[str, str]]:
        """Image series -> its newest SEG record (series date and time, then UID), for listed series only."""
        listed = set(self.list_images())
        latest: dict[str, dict[str, str]] = {}
        for record in self._seg_series():
            if record["image"] not in listed:
                continue
            current = latest.get(record["image"])
            if current is None or (record["when"], record["seg"]) > (current["when"], current["seg"]):
                latest[record["image"]] = record
        return latest

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(self.latest_segs())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labeled = set(self.get_labeled_images())
        return [s for s in self.list_images() if s not in labeled]

    # --------------------------------------------------------------------------------------------------- images
    @property
    def root(self) -> Path:
        """The local cache folder: images given as paths must be inside it."""
        return Path(os.path.realpath(self._datastore.image_path()))

    def _series_dir(self, series_uid: str) -> Path:
        return self.root / _uid(series_uid, "series")

    def _series_nifti(self, series_uid: str) -> Path:
        return self.root / f"{_uid(series_uid, 'series')}.nii.gz"

    def _retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """WADO-RS of a series in its stored transfer syntax (``transfer-syntax=*``): a PACS that cannot transcode
        (Orthanc and JPEG 2000) refuses the default Explicit VR Little Endian. Falls back to the default for a PACS
        that does not accept ``*``."""
        try:
            return self._client.retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
        except requests.HTTPError as exc:
            if exc.response is None or exc.response.status_code not in (400, 406):
                raise
            return self._client.retrieve_series(study_uid, series_uid)

    def _download(self, record: Dataset, folder: Path) -> None:
        """The series' instances into ``folder`` (written to a sibling temporary folder, then renamed)."""
        series_uid, study_uid = str(record.SeriesInstanceUID), str(record.StudyInstanceUID)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            with self._pacs(f"downloading series {series_uid}"):
                instances = self._retrieve(study_uid, series_uid)
            if not instances:
                raise PacsError(404, f"series {series_uid} has no instances in the PACS at {self.name()}")
            for instance in instances:
                instance.save_as(str(staging / f"{_uid(instance.SOPInstanceUID, 'instance')}.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(staging, folder)
            except OSError:  # another process (a training or scoring run on the same cache) finished first
                if not folder.is_dir() or not any(folder.iterdir()):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def get_image_uri(self, image_id: str) -> str:
        """The series as a NIfTI file in the local cache, downloaded and converted on first use.

        Raises:
            PacsError: 404 (series not in the PACS), 503 (PACS down), 422 (instances that do not make an image).
        """
        nifti, folder = self._series_nifti(image_id), self._series_dir(image_id)
        if self._cached_locally(image_id):
            return str(nifti)
        with self._lock:
            if self._cached_locally(image_id):
                return str(nifti)
            record = self.find_series(image_id)
            if record is None:
                raise PacsError(404, f"series {image_id} is not in the PACS at {self.name()}")
            if not folder.is_dir() or not any(folder.iterdir()):
                self._download(record, folder)
            try:
                volume, _ = read_series(sorted(folder.iterdir()))
            except SegError as exc:
                shutil.rmtree(folder, ignore_errors=True)  # a fixed series in the PACS is fetched again
                raise PacsError(422, f"series {image_id} cannot be used as an image: {exc}") from exc
            with tempfile.TemporaryDirectory() as tmp:
                converted = Path(tmp) / f"{image_id}.nii.gz"
                SimpleITK.WriteImage(volume, str(converted), True)
                LocalDatastore.add_image(self, image_id, str(converted), self._info(record))  # copies it in
        return str(nifti)

    def _cached_locally(self, image_id: str) -> bool:
        """Downloaded and converted before (registered only once the NIfTI is complete)."""
        return image_id in self._datastore.objects and self._series_nifti(image_id).is_file()

    @staticmethod
    def _info(record: Dataset) -> dict[str, str]:
        fields = ("StudyDate", "StudyTime", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID")
        return {f: str(record.get(f, "")) or "UNK" for f in fields}

    # --------------------------------------------------------------------------------------------------- labels
    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """Store a label: for the ``final`` tag as a DICOM SEG in the PACS, then in the local cache.

        ``label_info`` may carry ``label_info`` (MONAI Label's ``[{"name", "idx", "color"}]``) or ``label_names``
        (``{name: value}``) for the segment names; without them the segment is named after ``label`` or "object".

        Raises:
            PacsError: 404 (series not in the PACS), 422 (unreadable label, wrong shape, empty), 502/503 (the PACS
                refused or did not answer). Nothing is stored then.
        """
        label_info = dict(label_info or {})
        check_tag(label_tag)
        _uid(image_id, "series")
        if label_tag == DefaultLabelTag.FINAL and self.find_series(image_id) is None:
            state = "is no longer" if self._cached_locally(image_id) else "is not"
            raise PacsError(404, f"series {image_id} {state} in the PACS at {self.name()}; the label was not saved")
        self.get_image_uri(image_id)
        reference, datasets = self._reference(image_id)
        label = self._read_label(label_filename, reference)
        stored: Path | None = None
        try:
            stored = _label_nifti(label, reference)
            if label_tag == DefaultLabelTag.FINAL:
                values = sorted(int(v) for v in np.unique(label) if v != 0)
                try:
                    segments = segments_from_label_info(
                        values,
                        label_info.get("label_info") or label_info.get("label_names"),
                        str(label_info.get("label") or "object"),
                    )
                    seg = write_seg(label, reference, datasets, segments)
                except SegError as exc:
                    raise PacsError(422, f"label for series {image_id} not saved: {exc}") from exc
                with self._pacs(f"storing the DICOM SEG of series {image_id}"):
                    self._client.store_instances([seg])
                self._seg_references[str(seg.SeriesInstanceUID)] = image_id
                self._forget_listings()
                label_info.update(
                    {
                        "SeriesInstanceUID": str(seg.SeriesInstanceUID),
                        "StudyInstanceUID": str(seg.StudyInstanceUID),
                        "segments": {str(s.number): s.name for s in segments},
                        "seg": str(seg.SeriesInstanceUID),
                    }
                )
                logger.info("Stored DICOM SEG %s for series %s", seg.SeriesInstanceUID, image_id)
            return LocalDatastore.save_label(self, image_id, str(stored), label_tag, label_info)
        finally:
            if stored is not None:
                stored.unlink(missing_ok=True)

    def _reference(self, image_id: str):
        try:
            return read_series(sorted(self._series_dir(image_id).iterdir()))
        except (SegError, OSError) as exc:
            raise PacsError(422, f"series {image_id} cannot be read from the local cache: {exc}") from exc

    @staticmethod
    def _read_label(path: str, reference) -> np.ndarray:
        """A label file as an ``(I, J, K)`` array on the series grid: raw ``.bin`` (OHIF, Fortran order) or any
        image file ITK reads (NIfTI, NRRD: what the infer tasks return)."""
        size = tuple(reference.GetSize())
        try:
            if path.endswith(".bin"):
                raw = np.fromfile(path, dtype=np.uint8)
                if raw.size != int(np.prod(size)):
                    raise ValueError(f"{raw.size} bytes for a series of {size} voxels")
                return raw.reshape(size, order="F")
            image = SimpleITK.ReadImage(path)
            array = SimpleITK.GetArrayFromImage(image).transpose(*reversed(range(image.GetDimension())))
        except (RuntimeError, ValueError, OSError) as exc:
            raise PacsError(422, f"unreadable label {os.path.basename(path)}: {str(exc).strip()[-300:]}") from exc
        if array.ndim == 2 and len(size) == 3 and size[2] == 1:
            array = array[:, :, None]
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        if array.shape != size:
            raise PacsError(422, f"the label's shape {array.shape} is not the series' voxel grid {size} (I, J, K)")
        return array

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        """For ``final``: the SeriesInstanceUID of the series' newest SEG in the PACS (a new save is a new id)."""
        if tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_by_image_id(self, image_id, tag)
        record = self.latest_segs().get(image_id)
        return record["seg"] if record else ""

    def _final_image(self, label_id: str, image_id: str = "") -> str:
        """The image series a final label id stands for (a SEG UID, or the series UID as the local cache keys it),
        with the local label map brought up to that SEG."""
        image = image_id or self._seg_references.get(label_id) or label_id
        record = self.latest_segs().get(image)
        if record is not None:
            self.get_image_uri(image)
            self._sync_label(record)
        return image

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        return LocalDatastore.get_label_uri(self, self._final_image(label_id, image_id), label_tag)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_info(self, label_id, label_tag)
        return LocalDatastore.get_label_info(self, self._final_image(label_id), label_tag)

    def _sync_label(self, record: dict[str, str]) -> None:
        """Make the local final label of ``record["image"]`` the label map of SEG ``record["seg"]``."""
        image_id = record["image"]
        obj = self._datastore.objects.get(image_id)
        current = obj.labels.get(DefaultLabelTag.FINAL) if obj else None
        if current is not None and current.info.get("seg") == record["seg"]:
            return
        with tempfile.TemporaryDirectory() as tmp:
            with self._pacs(f"downloading DICOM SEG {record['seg']}"):
                instances = self._retrieve(record["study"], record["seg"])
            reference, _ = self._reference(image_id)
            try:
                labels = read_seg(instances[0], reference)
            except (SegError, IndexError) as exc:
                logger.warning("DICOM SEG %s of series %s is skipped: %s", record["seg"], image_id, exc)
                return
            path = _label_nifti(labels.label_map(), reference, Path(tmp))
            info = {
                "seg": record["seg"],
                "SeriesInstanceUID": record["seg"],
                "segments": {str(n): s.name for n, s in labels.segments.items()},
            }
            LocalDatastore.save_label(self, image_id, str(path), DefaultLabelTag.FINAL, info)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Training pairs ``{"image": series NIfTI, "label": label map NIfTI, "segments": {value: name}}`` from the
        newest SEG of each listed series in the PACS (cached locally; refreshed when a newer SEG appears)."""
        latest = self.latest_segs()
        for record in latest.values():
            self.get_image_uri(record["image"])
            self._sync_label(record)
        items = []
        for item in LocalDatastore.datalist(self, full_path):
            image_id = Path(item["image"]).name.removesuffix(".nii.gz")
            if image_id in latest:
                info = self._datastore.objects[image_id].labels[DefaultLabelTag.FINAL].info
                items.append({**item, "segments": dict(info.get("segments", {}))})
        return items


def _uid(value: Any, what: str) -> str:
    """A DICOM UID, checked before it names a file or folder of the cache (a request's or a PACS's ``../x`` would
    otherwise leave it)."""
    if not is_dicom_uid(str(value)):
        raise PacsError(400, f"{what} UID {str(value)[:80]!r} is not a DICOM UID (digits and dots, at most 64)")
    return str(value)


def _label_nifti(label: np.ndarray, reference, folder: Path | None = None) -> Path:
    """A label map as a ``.nii.gz`` with the series' geometry (in ``folder`` or a new temporary file)."""
    image = SimpleITK.GetImageFromArray(np.ascontiguousarray(label.astype(np.uint16).transpose(2, 1, 0)))
    image.CopyInformation(reference)
    if folder is None:
        handle, name = tempfile.mkstemp(suffix=".nii.gz")
        os.close(handle)
        path = Path(name)
    else:
        path = folder / "label.nii.gz"
    SimpleITK.WriteImage(image, str(path), True)
    return path
