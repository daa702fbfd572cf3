"""Start, stop and fill a local Orthanc PACS with DICOMweb, for trying the app on DICOM and for the tests.

Uses Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``scripts/install_system_deps.sh`` installs them). The
server listens on 127.0.0.1 only, without authentication, with its database in a throwaway folder; DICOMweb is at
``http://127.0.0.1:<port>/dicom-web``::

    python scripts/orthanc.py start --storage /tmp/orthanc            # port 8042, DICOM port off
    python scripts/orthanc.py upload tests/fixtures/data/dicom_ct_series tests/fixtures/data/dicom_ct_seg/0*.dcm
    .venv/bin/monailabel start_server --app apps/sam_med2d --studies http://127.0.0.1:8042/dicom-web --host 127.0.0.1
    python scripts/orthanc.py stop --storage /tmp/orthanc

Only the standard library is used, so it runs with any Python 3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DEFAULT_PORT = 8042


class OrthancError(RuntimeError):
    """Orthanc is not installed, did not start, or refused a file; the message says which and why."""


def find_binary() -> str | None:
    """Path of the Orthanc executable (``/usr/sbin`` is not on every user's PATH), or ``None``."""
    found = shutil.which(ORTHANC_BINARY)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/bin"):
        candidate = Path(folder) / ORTHANC_BINARY
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_requirements() -> str | None:
    """Why Orthanc with DICOMweb cannot run here, or ``None`` when it can."""
    if find_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; see scripts/install_system_deps.sh)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return None


class Orthanc:
    """One Orthanc process with its own configuration and storage under ``storage``.

    Args:
        storage: folder for the configuration, the database, the log and the pid file (created).
        port: HTTP port on 127.0.0.1 (REST API and DICOMweb).
    """

    def __init__(self, storage: str | Path, port: int = DEFAULT_PORT) -> None:
        self.storage = Path(storage).resolve()
        self.port = int(port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid_file(self) -> Path:
        return self.storage / "orthanc.pid"

    @property
    def log_file(self) -> Path:
        return self.storage / "orthanc.log"

    def config(self) -> dict:
        """The configuration written to ``storage/orthanc.json``."""
        return {
            "Name": "SAM-Med2D test PACS",
            "StorageDirectory": str(self.storage / "db"),
            "IndexDirectory": str(self.storage / "db"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "HttpDescribeErrors": True,
            "Plugins": [DICOMWEB_PLUGIN],
            # OHIF (served by MONAI Label) reads series metadata in full from this plugin.
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": "127.0.0.1"},
            # Keep stored files as they are (e.g. JPEG 2000 CT) and accept every storage class (SEG included).
            "UnknownSopClassAccepted": True,
            "StableAge": 1,
        }

    def request(self, path: str, data: bytes | None = None, method: str | None = None, timeout: float = 10.0):
        """One REST call to Orthanc; returns the decoded JSON answer (or raw bytes when it is not JSON)."""
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            body = answer.read()
        try:
            return json.loads(body)
        except ValueError:
            return body

    def is_up(self) -> bool:
        try:
            return "Version" in self.request("/system", timeout=2.0)
        except (OSError, urllib.error.URLError, ValueError, TypeError):
            return False

    def running_pid(self) -> int | None:
        """Pid from the pid file when that process is alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def start(self, timeout: float = 60.0) -> Orthanc:
        """Start Orthanc (if this storage's instance is not already running) and wait for its REST API."""
        reason = missing_requirements()
        if reason:
            raise OrthancError(reason)
        if self.running_pid() is not None and self.is_up():
            return self
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.storage / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [find_binary(), "--no-jobs", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise OrthancError(f"Orthanc exited with code {process.returncode}; log: {self._log_tail()}")
            if self.is_up():
                plugins = self.request("/plugins")
                if "dicom-web" not in plugins:
                    self.stop()
                    raise OrthancError(f"Orthanc started without its DICOMweb plugin (plugins: {plugins})")
                return self
            time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; log: {self._log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process started by :meth:`start` (by its pid only); the storage folder is left for the caller."""
        pid = self.running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
                if finished == pid:
                    break
            except ChildProcessError:  # not our child (started by another command): poll for its end
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def upload(self, paths: list[str | Path], fill_missing_uids: bool = False) -> list[dict]:
        """Store DICOM files (folders are walked) with the REST API; returns Orthanc's answer per file.

        Args:
            paths: files or folders.
            fill_missing_uids: give files whose anonymisation blanked their identifiers (empty Study/Series/SOP
                Instance UIDs, as in some public test sets) stable ones first, see :func:`fill_missing_uids`.

        Raises:
            OrthancError: a file that Orthanc refuses (not DICOM, unsupported), naming it.
        """
        answers = []
        for path in _dicom_files(paths):
            data = fill_missing_uids_in_file(path) if fill_missing_uids else path.read_bytes()
            try:
                answer = self.request("/instances", data=data, method="POST", timeout=60.0)
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                raise OrthancError(f"Orthanc refused {path}: HTTP {exc.code} {detail}") from exc
            answers.append(answer)
        return answers

    def series(self) -> list[dict]:
        """Every stored series with its main DICOM tags (``MainDicomTags``) and parent study."""
        return self.request("/series?expand")

    def delete_series(self, series_instance_uid: str) -> None:
        """Remove a series (by its SeriesInstanceUID) from the PACS."""
        for item in self.series():
            if item["MainDicomTags"].get("SeriesInstanceUID") == series_instance_uid:
                self.request(f"/series/{item['ID']}", method="DELETE")
                return
        raise OrthancError(f"series {series_instance_uid} is not in Orthanc")

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def fill_missing_uids_in_file(path: Path) -> bytes:
    """The file's bytes, with empty identifiers filled (needs pydicom).

    SOP Class/Instance UIDs come from the file meta header; Study, Series and Frame of Reference UIDs are derived
    from the folder's path, so every file of one folder lands in one series and a second upload is idempotent. An
    empty Patient ID becomes the folder's name. Files with all identifiers present are sent unchanged.
    """
    import io

    import pydicom
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(path)
    folder = str(path.resolve().parent)
    derived = {
        "StudyInstanceUID": generate_uid(entropy_srcs=[folder, "study"]),
        "SeriesInstanceUID": generate_uid(entropy_srcs=[folder, "series"]),
        "FrameOfReferenceUID": generate_uid(entropy_srcs=[folder, "frame of reference"]),
        "SOPClassUID": dataset.file_meta.get("MediaStorageSOPClassUID", ""),
        "SOPInstanceUID": dataset.file_meta.get("MediaStorageSOPInstanceUID", "")
        or generate_uid(entropy_srcs=[str(path.resolve())]),
        "PatientID": path.resolve().parent.name,
    }
    changed = False
    for keyword, value in derived.items():
        if not str(dataset.get(keyword, "") or "") and value:
            setattr(dataset, keyword, value)
            changed = True
    if not changed:
        return path.read_bytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, write_like_original=True)
    return buffer.getvalue()


def _has_dicom_preamble(path: Path) -> bool:
    """Part 10 files start with 128 bytes and ``DICM``; other files in a folder (NRRD, notes) are not uploaded."""
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _dicom_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and _has_dicom_preamble(p)))
        elif path.is_file():
            files.append(path)  # named explicitly: sent as is, so Orthanc's refusal reaches the caller
        else:
            raise OrthancError(f"{path} does not exist")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "upload"])
    parser.add_argument("paths", nargs="*", help="DICOM files or folders (upload)")
    parser.add_argument("--storage", default=os.environ.get("ORTHANC_STORAGE", "/tmp/sam-med2d-orthanc"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("ORTHANC_PORT", DEFAULT_PORT)))
    parser.add_argument(
        "--fill-missing-uids", action="store_true", help="upload: give blanked identifiers stable values (pydicom)"
    )
    args = parser.parse_intermixed_args(argv)
    orthanc = Orthanc(args.storage, args.port)
    try:
        if args.command == "start":
            orthanc.start()
            print(f"Orthanc is up: REST {orthanc.url}, DICOMweb {orthanc.dicomweb_url}, storage {orthanc.storage}")
        elif args.command == "stop":
            orthanc.stop()
            print("Orthanc stopped")
        elif args.command == "status":
            up = orthanc.is_up()
            print(f"Orthanc at {orthanc.url}: {'up' if up else 'down'}")
            return 0 if up else 1
        else:
            answers = orthanc.upload(args.paths, fill_missing_uids=args.fill_missing_uids)
            print(f"stored {len(answers)} file(s) in Orthanc at {orthanc.url}")
    except OrthancError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
