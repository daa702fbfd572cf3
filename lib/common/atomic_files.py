"""The one atomic writer: files that readers may open at any time (state JSON, checkpoints, downloads, datasets).

Atomically and durably: the content is written to a temporary file beside the target, flushed to disk, renamed over
the target, and the rename flushed (:func:`fsync_path` of the file, then of its folder), so a reader, a power cut
or a ``kill -9`` sees the old file or the new one, never an empty or partial one. JSON is written with non-finite
numbers as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN and infinity (a diverged run's metrics) as ``None``: they are not JSON and ``/info`` must serve them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a clean exit it replaces ``path`` durably, on an
    error it is removed and ``path`` is left as it was.

    The temporary file keeps ``path``'s suffixes (``.nii.gz``, ``.safetensors``) for writers that choose the format
    by name, and gets ``mode`` (``mkstemp`` makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: Mapping[str, Any], indent: int = 2) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(payload), indent=indent, sort_keys=True, allow_nan=False, default=str))


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename, a new file), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
