"""Shared fixtures: paths to ../shared (skipped with a reason where absent) and a small seeded model config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED2D_SHARED", ROOT.parent / "shared"))  # overridable: a GPU box, a CI cache
SPEC = SHARED / "spec"
GOLDEN = SPEC / "golden_tiny"
DATA = SHARED / "data"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}: it ships with the project's shared/ folder (CI has it)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require(GOLDEN, "SAM-Med2D golden outputs")


@pytest.fixture(scope="session")
def golden_config(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "meta.json").read_text())["config"]


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return _require(SPEC, "SAM-Med2D spec")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA, "real medical test data")
