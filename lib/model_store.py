"""Which weights are served: the starting checkpoint, the published (retrained) model and its kept versions.

Layout of ``model_dir``::

    published.pt                 plain state dict now served (written atomically; its mtime is the model's version)
    published.json               metadata of the served version (version id, metrics, source, time)
    versions/<version>/model.pt  every published version, kept with
    versions/<version>/metrics.json

Inference asks :meth:`ModelStore.serving_path` and :meth:`ModelStore.version_key` on each request and reloads when
the key changes; the trainer calls :meth:`ModelStore.publish` at the end of a successful run. Nothing here imports the
server.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .build import build_model
from .checkpoint import load_model, save_state_dict
from .config import SamMed2DConfig, resolve_config
from .json_files import write_json_atomic
from .modeling import SamMed2D

PUBLISHED = "published.pt"
PUBLISHED_META = "published.json"
VERSIONS = "versions"


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

    @property
    def published_path(self) -> Path:
        return self.model_dir / PUBLISHED

    @property
    def versions_dir(self) -> Path:
        return self.model_dir / VERSIONS

    def serving_path(self) -> Path | None:
        """The file whose weights are served now: the published model if any, else the base checkpoint."""
        if self.published_path.is_file():
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
        if self.published_path.is_file():
            meta = self.published_meta()
            return str(meta.get("version", "published"))
        return "base" if self.base_checkpoint else "random-init"

    def published_meta(self) -> dict[str, Any]:
        path = self.model_dir / PUBLISHED_META
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, device: str | torch.device = "cpu") -> SamMed2D:
        """Build and load the served model (eval mode)."""
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
        meta = {"version": version, "metrics": dict(metrics), "published_at": stamp}
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
