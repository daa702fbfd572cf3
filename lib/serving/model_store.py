"""Which weights are served: the starting checkpoint, the published (retrained) model and its kept versions.

Layout of ``model_dir``::

    current.json                 {"version": <name>} of the served version, or null for the base: the one switch
    versions/<version>/model.pt  every kept version: a plain state dict
    versions/<version>/metrics.json   its metadata (version id, metrics, time, and what it was trained from: the
                                 network config and the base checkpoint's fingerprint)
    train.lock                   held by the training run in progress (one at a time, whatever starts it)

Switching what serves (publish, rollback) is one atomic, fsynced rename of ``current.json``: weights and metadata
are those of one version folder, complete and on disk before the switch, so a crash (``kill -9``, power cut) at
any point leaves one consistent version serving. A model_dir from before ``current.json`` (``published.pt`` and
``published.json``) serves the version ``published.json`` names until the next switch.

Inference asks :meth:`ModelStore.serving_path` and :meth:`ModelStore.version_key` on each request and reloads when
the key changes; the trainer calls :meth:`ModelStore.publish` at the end of a successful run. What serves is the
current version when it can: a version trained from another network config or another base checkpoint than the
server now runs with (the same ``model_dir`` after a change of ``--conf model`` or ``checkpoint``), or whose file
is empty or does not load, is not served; the newest usable version published before it serves instead, else the
base, and :meth:`ModelStore.published_mismatch` says why, for the log and ``/info``. Publishing keeps the newest
``keep_versions`` versions (the serving one always). Nothing here imports the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lib.common.atomic_files import fsync_path, write_json_atomic
from lib.io.checkpoint import copy_checkpoint_into, load_model, save_state_dict
from lib.modeling import SamMed2D
from lib.modeling.build import build_model
from lib.modeling.config import SamMed2DConfig, resolve_config

PUBLISHED = "published.pt"  # before current.json: a copy of the served version's weights
PUBLISHED_META = "published.json"  # before current.json: the served version's metadata
CURRENT = "current.json"
VERSIONS = "versions"
TRAIN_LOCK = "train.lock"
_SWITCH_LOCK = ".switch.lock"
_FINGERPRINT_BYTES = 1 << 20  # hashed from each end of a checkpoint: enough to tell files apart, fast for 400 MB

logger = logging.getLogger(__name__)


class TrainingInProgressError(RuntimeError):
    """Another training run holds the model store's training lock."""


def checkpoint_fingerprint(path: str | Path | None, seed: int = 0) -> str:
    """What a base checkpoint is, cheaply: name, size and a SHA-256 of its first and last MiB (``random-init`` and
    the seed when there is none)."""
    if path is None:
        return f"random-init:seed={seed}"
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read())
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


class ModelStore:
    """Resolves, loads and publishes the served SAM-Med2D weights.

    Args:
        model_dir: folder holding ``current.json`` and ``versions/``.
        config: network config (name, JSON path, dict or :class:`SamMed2DConfig`).
        base_checkpoint: weights served before anything is published (any layout :func:`load_model` reads); ``None``
            serves a seeded random initialisation (a loud warning belongs to the caller).
        adapters: run the encoder adapters (SAM-Med2D) or not (SAM-Med2D*).
        seed: seed of the random initialisation when there is no checkpoint.
        keep_versions: versions kept after a publish (the newest ones; the serving version is never removed).
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: str | Path | Mapping[str, Any] | SamMed2DConfig = "vit_b",
        base_checkpoint: str | Path | None = None,
        adapters: bool = True,
        seed: int = 0,
        keep_versions: int = 5,
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.model_dir = Path(model_dir)
        self.config = resolve_config(config)
        self.base_checkpoint = Path(base_checkpoint) if base_checkpoint else None
        self.adapters = adapters
        self.seed = seed
        self.keep_versions = keep_versions
        self._json_cache: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._unloadable: dict[tuple[str, int, int], str] = {}
        self._fingerprint: tuple[tuple[str, int, int], str] | None = None
        self._config_dict = self.config_dict()

    # ------------------------------------------------------------------ provenance
    def config_dict(self) -> dict[str, Any]:
        """The network config as JSON would store it."""
        return json.loads(json.dumps(dataclasses.asdict(self.config)))

    def base_fingerprint(self) -> str:
        """:func:`checkpoint_fingerprint` of the base, computed once per base file (inference asks on every click)."""
        path = self.base_checkpoint
        key = (str(path), path.stat().st_mtime_ns if path is not None else 0, self.seed)
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, checkpoint_fingerprint(path, self.seed))
        return self._fingerprint[1]

    def _read_json(self, path: Path) -> Any:
        """A small JSON file, read again only when it changed (inference asks on every click); ``None`` if absent
        or unreadable."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._json_cache.get(path)
        if cached is None or cached[0] != stamp:
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                value = None
            cached = self._json_cache[path] = (stamp, value)
        return cached[1]

    def current_version(self) -> str | None:
        """The version the switch names (``None``: the base)."""
        current = self._read_json(self.model_dir / CURRENT)
        if isinstance(current, dict):
            return current.get("version")
        legacy = self._read_json(self.model_dir / PUBLISHED_META)
        return legacy.get("version") if isinstance(legacy, dict) else None

    def version_meta(self, version: str) -> dict[str, Any]:
        """``versions/<version>/metrics.json`` (``{"version": version}`` when it has none)."""
        meta = self._read_json(self.versions_dir / version / "metrics.json")
        return dict(meta) if isinstance(meta, dict) else {"version": version}

    def _unusable(self, version: str) -> str | None:
        """Why a kept version cannot serve with this store's config and base (``None``: it can)."""
        path = self.versions_dir / version / "model.pt"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"version {version} has no model file"
        if stat.st_size == 0:
            return f"version {version}: its model file is empty"
        failed = self._unloadable.get((str(path), stat.st_size, stat.st_mtime_ns))
        if failed:
            return failed
        meta = self.version_meta(version)
        trained_config = meta.get("model_config")
        if trained_config is not None and trained_config != self._config_dict:
            current = self._config_dict
            changed = sorted(
                k for k in trained_config.keys() | current.keys() if trained_config.get(k) != current.get(k)
            )
            return f"published version {version} was trained with another network config ({', '.join(changed)} differ)"
        trained_base = meta.get("base")
        if trained_base is not None and trained_base != self.base_fingerprint():
            return (
                f"published version {version} was trained from another base checkpoint ({trained_base}; this server "
                f"starts from {self.base_fingerprint()})"
            )
        return None

    def published_mismatch(self) -> str | None:
        """Why the current version does not serve (``None``: it does, or the base is current): another architecture,
        another base checkpoint, or a file that is empty or failed to load."""
        version = self.current_version()
        return self._unusable(version) if version else None

    @property
    def published_path(self) -> Path:
        """The current version's weights (they serve unless :meth:`published_mismatch` says why not)."""
        version = self.current_version()
        return self.versions_dir / version / "model.pt" if version else self.model_dir / PUBLISHED

    @property
    def versions_dir(self) -> Path:
        return self.model_dir / VERSIONS

    def _serving_version(self) -> str | None:
        """The current version if usable, else the newest usable one published before it, else ``None`` (base)."""
        current = self.current_version()
        if current is None or self._unusable(current) is None:
            return current
        older = [v for v in self._version_names() if v < current]
        return next((v for v in reversed(older) if self._unusable(v) is None), None)

    def serving_path(self) -> Path | None:
        """The file whose weights are served now: the current version's if it can serve, else the newest usable
        version before it, else the base checkpoint."""
        version = self._serving_version()
        return self.versions_dir / version / "model.pt" if version else self.base_checkpoint

    def version_key(self) -> str:
        """Changes whenever the served weights change (path, size and mtime in ns, adapter switch)."""
        path = self.serving_path()
        if path is None:
            return f"random-init:seed={self.seed}:adapters={self.adapters}"
        stat = path.stat()
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:adapters={self.adapters}"

    def active_version(self) -> str:
        """Human-readable name of what serves: a published version id, ``base`` or ``random-init``."""
        version = self._serving_version()
        if version:
            return str(self.version_meta(version).get("version", version))
        return "base" if self.base_checkpoint else "random-init"

    def published_meta(self) -> dict[str, Any]:
        """Metadata of the current version (``{}`` when the base is current)."""
        version = self.current_version()
        return self.version_meta(version) if version else {}

    def load(self, device: str | torch.device = "cpu") -> SamMed2D:
        """Build and load the served model (eval mode).

        A version file that does not load (truncated, or of another architecture published before versions recorded
        their config) is set aside and the next candidate loads: :meth:`published_mismatch` says why.
        """
        while (version := self._serving_version()) is not None:
            path = self.versions_dir / version / "model.pt"
            try:
                return load_model(path, self.config, device=device, adapters=self.adapters)
            except Exception as exc:  # noqa: BLE001 (torch.load, zip and pickle raise many types for a bad file)
                stat = path.stat()
                self._unloadable[(str(path), stat.st_size, stat.st_mtime_ns)] = (
                    f"version {version} does not load: {exc}"
                )
                logger.error("Version %s does not load (%s); serving the next usable weights", version, exc)
        if self.base_checkpoint is None:
            torch.manual_seed(self.seed)
            model = build_model(self.config)
            if self.config.encoder_adapter:
                model.set_adapters_enabled(self.adapters)
            return model.to(device).eval()
        return load_model(self.base_checkpoint, self.config, device=device, adapters=self.adapters)

    def load_into(self, model: SamMed2D) -> bool:
        """Copy the served weights into ``model`` (built for this store's config), in place and one tensor at a time
        (:func:`lib.io.checkpoint.copy_checkpoint_into`): a swap without a second model in memory.

        Candidates are tried as :meth:`load` tries them. Returns ``False`` when the served weights cannot be copied so
        (seeded random weights, an original SAM checkpoint): then :meth:`load` builds them, and ``model`` is as it
        was unless a candidate failed part-way, which a later candidate or the caller's new model replaces. Raises
        when no candidate loads.
        """
        while (version := self._serving_version()) is not None:
            path = self.versions_dir / version / "model.pt"
            try:
                return copy_checkpoint_into(model, path)
            except Exception as exc:  # noqa: BLE001 (as in load)
                stat = path.stat()
                self._unloadable[(str(path), stat.st_size, stat.st_mtime_ns)] = (
                    f"version {version} does not load: {exc}"
                )
                logger.error("Version %s does not load (%s); serving the next usable weights", version, exc)
        if self.base_checkpoint is None:
            return False
        return copy_checkpoint_into(model, self.base_checkpoint)

    # ------------------------------------------------------------------ versions
    def _version_names(self) -> list[str]:
        """Kept versions with a model file, oldest first (names sort by publication)."""
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if (p / "model.pt").is_file())

    def list_versions(self) -> list[dict[str, Any]]:
        """Every kept version with its metrics, oldest first."""
        return [self.version_meta(name) for name in self._version_names()]

    def publish(
        self,
        model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
        metrics: Mapping[str, Any],
        if_serving: str | None = None,
    ) -> str | None:
        """Keep a new version with its metrics and make it the served model; returns the version id.

        The version folder is complete and on disk before the switch. With ``if_serving`` (a :meth:`version_key`
        taken when the run started) the switch happens only if that is still what serves: a rollback during the run
        wins, the new version is removed and ``None`` returned.
        """
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        names = self._version_names()
        number = int(names[-1][1:5]) + 1 if names and names[-1][1:5].isdigit() else len(names) + 1
        version = f"v{number:04d}-{stamp}"
        folder = self.versions_dir / version
        save_state_dict(model_or_state, folder / "model.pt")
        meta = {
            "version": version,
            "metrics": dict(metrics),
            "published_at": stamp,
            "model_config": self.config_dict(),
            "base": self.base_fingerprint(),
        }
        write_json_atomic(folder / "metrics.json", meta)
        fsync_path(self.versions_dir)
        with self._switch_lock():
            if if_serving is not None and self.version_key() != if_serving:
                shutil.rmtree(folder, ignore_errors=True)
                return None
            self._switch(version)
        self._prune()
        return version

    def rollback(self, version: str) -> None:
        """Serve a kept version again (``base``: the base checkpoint serves). A training run in progress then does
        not publish (see :meth:`publish`'s ``if_serving``)."""
        if version != "base" and version not in self._version_names():
            known = ", ".join(self._version_names()) or "none"
            raise ValueError(f"unknown model version {version!r}; kept versions: {known}")
        with self._switch_lock():
            self._switch(None if version == "base" else version)

    def _switch(self, version: str | None) -> None:
        """Name what serves in one atomic, durable rename; then drop the files of the layout before it."""
        write_json_atomic(self.model_dir / CURRENT, {"version": version})
        for legacy in (PUBLISHED, PUBLISHED_META):
            (self.model_dir / legacy).unlink(missing_ok=True)

    def _prune(self) -> None:
        """Remove the oldest versions beyond ``keep_versions`` (never the current or the serving one), and folders
        of publishes cut short (by a crash) older than the newest kept version."""
        complete = self._version_names()
        keep = set(complete[-self.keep_versions :]) | {self.current_version(), self._serving_version()}
        newest = max(name for name in keep if name)
        for folder in self.versions_dir.iterdir():
            if folder.name not in keep and folder.name < newest:
                shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def _switch_lock(self) -> Iterator[None]:
        """Serialise switches across processes (a run publishing, a rollback from the command line)."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with open(self.model_dir / _SWITCH_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def training_lock(self) -> Iterator[None]:
        """Held for a whole training run; a second run, whatever starts it, gets :class:`TrainingInProgressError`.

        An OS file lock: released when the process holding it ends, even by ``kill -9``.
        """
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with open(self.model_dir / TRAIN_LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrainingInProgressError(
                    f"a training run is already in progress on {self.model_dir} (one at a time)"
                ) from None
            yield
