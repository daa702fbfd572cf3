"""The documented rollback command (python -m lib.model_store_cli) on a real model folder."""

from __future__ import annotations

import subprocess
import sys

import torch

from lib.build import build_model
from lib.checkpoint import read_state_dict
from lib.model_store import ModelStore
from tests.conftest import ROOT


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lib.model_store_cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_list_active_and_rollback(tmp_path, golden_config):
    store = ModelStore(tmp_path, golden_config)
    torch.manual_seed(1)
    first = store.publish(build_model(store.config), {"val_dice": 0.61})
    torch.manual_seed(2)
    second = store.publish(build_model(store.config), {"val_dice": 0.64})
    first_weights, _ = read_state_dict(tmp_path / "versions" / first / "model.pt")

    listing = _cli("--model-dir", str(tmp_path), "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("* ") and second in line and "0.64" in line for line in lines)
    assert any(line.startswith("  ") and first in line and "0.61" in line for line in lines)

    done = _cli("--model-dir", str(tmp_path), "rollback", first)
    assert done.returncode == 0 and f"now serving {first}" in done.stdout
    assert _cli("--model-dir", str(tmp_path), "active").stdout.strip() == first
    served, _ = read_state_dict(store.published_path)
    assert all(torch.equal(served[k], first_weights[k]) for k in first_weights)

    unknown = _cli("--model-dir", str(tmp_path), "rollback", "v9999")
    assert unknown.returncode == 2 and "unknown model version 'v9999'" in unknown.stderr and first in unknown.stderr
    assert _cli("--model-dir", str(tmp_path), "active").stdout.strip() == first

    assert _cli("--model-dir", str(tmp_path), "rollback", "base").returncode == 0
    assert not store.published_path.exists()
    assert _cli("--model-dir", str(tmp_path / "missing"), "list").returncode == 2
