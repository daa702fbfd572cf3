"""Fixtures: the golden outputs, tiny weights and real images committed in ``tests/fixtures`` (see its README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPEC = FIXTURES / "spec"
GOLDEN = FIXTURES / "golden_tiny"
DATA = FIXTURES / "data"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_config(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "meta.json").read_text())["config"]


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPEC


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def golden_conf(golden_dir: Path, model_dir: Path, **extra: object) -> dict[str, object]:
    """``--conf`` of a server that serves the golden tiny SAM-Med2D (its config and weights), never downloading."""
    conf = {
        "model": golden_dir / "meta.json",
        "checkpoint": golden_dir / "weights.pth",
        "download": "false",
        "model_dir": model_dir,
    }
    return {**conf, **extra}


@pytest.fixture
def products_rule(monkeypatch):
    """``products_rule(vendor)``: run the linear products as on a CPU of ``vendor`` (``AuthenticAMD``: a click's in
    oneDNN; ``GenuineIntel``: a click's in MKL, the encoder's in oneDNN) for the rest of the test, whatever this
    machine's CPU (:func:`lib.modeling.onednn_linear.min_multiply_adds_for`)."""
    from lib.modeling import onednn_linear

    def use(vendor: str) -> None:
        monkeypatch.setattr(onednn_linear, "ONEDNN_MIN_MULTIPLY_ADDS", onednn_linear.min_multiply_adds_for(vendor))

    return use
