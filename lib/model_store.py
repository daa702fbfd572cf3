"""Which weights are served: the starting checkpoint, the published (retrained) model and its kept versions.

Layout of ``model_dir``::

    published.pt                 plain state dict now served (written atomically; its mtime is the model's version)
    published.json               metadata of the served version (version id, metrics, time, and what it was trained
                                 from: the network config and the base checkpoint's fingerprint)
    versions/<version>/model.pt  every published version, kept with
    versions/<version>/metrics.json

Inference asks :meth:`ModelStore.serving_path` and :meth:`ModelStore.version_key` on each request and reloads when
the key changes; the trainer calls :meth:`ModelStore.publish` at the end of a successful run. A published version
trained from another network config or another base checkpoint than the server now runs with (the same ``model_dir``
after a change of ``--conf model`` or ``checkpoint``) is not served: the base serves and
:meth:`ModelStore.published_mismatch` says why, for the log and ``/info``. Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .build import build_model
from .checkpoint import CheckpointError, load_model, save_state_dict
from .config import SamMed2DConfig, resolve_config
from .json_files import write_json_atomic
from .modeling import SamMed2D

PUBLISHED = "published.pt"
PUBLISHED_META = "published.json"
VERSIONS = "versions"
_FINGERPRINT_BYTES = 1 << 20  # hashed from each end of a checkpoint: enough to tell files apart, fast for 400 MB


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
        model_dir: folder holding ``published.pt`` and ``versions/``.
        config: network config (name, JSON path, dict or :class:`SamMed2DConfig`).
        base_checkpoint: weights served before anything is published (any layout :func:`load_model` reads); ``None``
            serves a seeded random initialisation (a loud warning belongs to the caller).
        adapters: run the encoder adapters (SAM-Med2D) or not (SAM-Med2D*).
        seed: seed of the random initialisation when there is no checkpoint.
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: str | Path | Mapping[str, Any] | SamMed2DConfig = "vit_b",
        base_checkpoint: str | Path | None = None,
        adapters: bool = True,
        seed: int = 0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = resolve_config(config)
        self.base_checkpoint = Path(base_checkpoint) if base_checkpoint else None
        self.adapters = adapters
        self.seed = seed
        self._meta_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._unloadable: dict[tuple[int, int], str] = {}
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

    def published_mismatch(self) -> str | None:
        """Why the published model cannot serve with this store's config and base (``None``: it can, or there is
        none): another architecture, another base checkpoint, or a file that failed to load."""
        if not self.published_path.is_file():
            return None
        stat = self.published_path.stat()
        failed = self._unloadable.get((stat.st_size, stat.st_mtime_ns))
        if failed:
            return failed
        meta = self.published_meta()
        version = meta.get("version", "published")
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

    @property
    def published_path(self) -> Path:
        return self.model_dir / PUBLISHED

    @property
    def versions_dir(self) -> Path:
        return self.model_dir / VERSIONS

    def serving_path(self) -> Path | None:
        """The file whose weights are served now: the published model if any (and it fits this server's config and
        base), else the base checkpoint."""
        if self.published_path.is_file() and self.published_mismatch() is None:
            return self.published_path
        return self.base_checkpoint

    def version_key(self) -> str:
        """Changes whenever the served weights change (path, size and mtime in ns, adapter switch)."""
        path = self.serving_path()
        if path is None:
            return f"random-init:seed={self.seed}:adapters={self.adapters}"
        stat = path.stat()
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}:adapters={self.adapters}"

    def active_version(self) -> str:
        """Human-readable name of what serves: a published version id, ``base`` or ``random-init``."""
        if self.serving_path() == self.published_path:
            meta = self.published_meta()
            return str(meta.get("version", "published"))
        return "base" if self.base_checkpoint else "random-init"

    def published_meta(self) -> dict[str, Any]:
        """``published.json`` (read again only when it changed: inference asks on every click)."""
        path = self.model_dir / PUBLISHED_META
        try:
            stat = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._meta_cache is None or self._meta_cache[0] != stamp:
            self._meta_cache = (stamp, json.loads(path.read_text()))
        return dict(self._meta_cache[1])

    def load(self, device: str | torch.device = "cpu") -> SamMed2D:
        """Build and load the served model (eval mode).

        A published file that does not load into this config (a version of another architecture published before
        versions recorded their config) is set aside: the base serves and :meth:`published_mismatch` says why.
        """
        path = self.serving_path()
        if path == self.published_path:
            try:
                return load_model(path, self.config, device=device, adapters=self.adapters)
            except CheckpointError as exc:
                stat = path.stat()
                self._unloadable[(stat.st_size, stat.st_mtime_ns)] = f"published model does not load: {exc}"
                path = self.serving_path()
        if path is None:
            torch.manual_seed(self.seed)
            model = build_model(self.config)
            if self.config.encoder_adapter:
                model.set_adapters_enabled(self.adapters)
            return model.to(device).eval()
        return load_model(path, self.config, device=device, adapters=self.adapters)

    def publish(self, model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], metrics: Mapping[str, Any]) -> str:
        """Keep a new version with its metrics and make it the served model; returns the version id.

        The version folder is complete before ``published.pt`` is replaced (atomically), so a crash at any point
        leaves the previously served model in place.
        """
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        version = f"v{len(self.list_versions()) + 1:04d}-{stamp}"
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
        self._activate(folder, meta)
        return version

    def list_versions(self) -> list[dict[str, Any]]:
        """Every kept version with its metrics, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        out = []
        for folder in sorted(p for p in self.versions_dir.iterdir() if (p / "model.pt").is_file()):
            meta_path = folder / "metrics.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"version": folder.name}
            out.append(meta)
        return out

    def rollback(self, version: str) -> None:
        """Serve a kept version again (``base`` removes the published model so the base checkpoint serves)."""
        if version == "base":
            self.published_path.unlink(missing_ok=True)
            (self.model_dir / PUBLISHED_META).unlink(missing_ok=True)
            return
        folder = self.versions_dir / version
        if not (folder / "model.pt").is_file():
            known = ", ".join(v["version"] for v in self.list_versions()) or "none"
            raise ValueError(f"unknown model version {version!r}; kept versions: {known}")
        meta_path = folder / "metrics.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"version": version}
        self._activate(folder, meta)

    def _activate(self, folder: Path, meta: Mapping[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.model_dir, prefix=f".{PUBLISHED}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(folder / "model.pt", tmp)
            os.replace(tmp, self.published_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        write_json_atomic(self.model_dir / PUBLISHED_META, meta)
