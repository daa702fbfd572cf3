"""ModelStore: what is served, atomic publishing with kept versions and metrics, rollback, crash safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lib.build import build_model
from lib.model_store import ModelStore


def _state(golden_config: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(golden_config).state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_serves_base_then_published_versions_and_rolls_back(
    tmp_path: Path, golden_dir: Path, golden_config: dict
) -> None:
    store = ModelStore(tmp_path, golden_config, base_checkpoint=golden_dir / "weights.pth")
    assert store.serving_path() == golden_dir / "weights.pth" and store.active_version() == "base"
    base_key = store.version_key()
    first, second = _state(golden_config, 1), _state(golden_config, 2)
    v1 = store.publish(first, {"val_dice": 0.5})
    assert store.serving_path() == store.published_path and store.active_version() == v1
    assert store.version_key() != base_key
    v2 = store.publish(second, {"val_dice": 0.6})
    assert [v["version"] for v in store.list_versions()] == [v1, v2]
    assert store.list_versions()[0]["metrics"] == {"val_dice": 0.5}
    assert _equal(torch.load(store.published_path, weights_only=True), second)
    assert _equal(store.load().state_dict(), second)
    store.rollback(v1)
    assert store.active_version() == v1 and _equal(store.load().state_dict(), first)
    with pytest.raises(ValueError, match="unknown model version"):
        store.rollback("v9999")
    store.rollback("base")
    assert store.serving_path() == golden_dir / "weights.pth" and store.active_version() == "base"


def test_a_publish_that_fails_midway_leaves_the_served_model(tmp_path: Path, golden_config: dict, monkeypatch) -> None:
    store = ModelStore(tmp_path, golden_config)
    assert store.active_version() == "random-init" and store.serving_path() is None
    v1 = store.publish(_state(golden_config, 1), {"val_dice": 0.5})
    before = store.published_path.read_bytes()
    stat = store.published_path.stat()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.publish(_state(golden_config, 2), {"val_dice": 0.9})
    monkeypatch.undo()
    assert store.published_path.read_bytes() == before
    assert store.published_path.stat().st_mtime_ns == stat.st_mtime_ns
    assert store.active_version() == v1
    assert json.loads((tmp_path / "published.json").read_text())["version"] == v1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
