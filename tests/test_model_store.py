"""ModelStore: what is served, atomic publishing with kept versions and metrics, rollback, crash safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lib.modeling.build import build_model
from lib.serving.model_store import ModelStore, TrainingInProgressError


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
    assert json.loads((tmp_path / "current.json").read_text())["version"] == v1 == store.published_meta()["version"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_published_versions_record_what_they_were_trained_from(
    tmp_path: Path, golden_dir: Path, golden_config: dict
) -> None:
    store = ModelStore(tmp_path, golden_config, base_checkpoint=golden_dir / "weights.pth")
    version = store.publish(_state(golden_config, 1), {"val_dice": 0.5})
    meta = store.published_meta()
    assert meta["model_config"] == store.config_dict() and meta["base"].startswith("weights.pth:")
    assert store.published_mismatch() is None and store.active_version() == version

    # Another base checkpoint (a changed --conf checkpoint): the version is not served, the base is, with the reason.
    other_base = tmp_path / "other.pth"
    other_base.write_bytes((golden_dir / "weights.pth").read_bytes() + b"\0")
    moved = ModelStore(tmp_path, golden_config, base_checkpoint=other_base)
    assert "another base checkpoint" in moved.published_mismatch()
    assert moved.serving_path() == other_base and moved.active_version() == "base"

    # Another architecture: the same, and loading gives the base network.
    wider = ModelStore(tmp_path, {**golden_config, "encoder_depth": golden_config["encoder_depth"] + 1})
    assert "encoder_depth" in wider.published_mismatch() and wider.active_version() == "random-init"
    assert wider.load().config.encoder_depth == golden_config["encoder_depth"] + 1


def test_a_published_file_that_does_not_load_falls_back_to_the_base(
    tmp_path: Path, golden_dir: Path, golden_config: dict
) -> None:
    """A version published before versions recorded their config, of another architecture: set aside when it fails
    to load, the base serves, the reason is kept."""
    store = ModelStore(tmp_path, golden_config, base_checkpoint=golden_dir / "weights.pth")
    wider = {**golden_config, "encoder_depth": golden_config["encoder_depth"] + 1}
    version = store.publish(_state(wider, 1), {"val_dice": 0.5})
    meta_path = tmp_path / "versions" / version / "metrics.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"], meta["base"]
    meta_path.write_text(json.dumps(meta))
    assert store.published_mismatch() is None and store.serving_path() == store.published_path
    model = store.load()
    assert _equal(model.state_dict(), torch.load(golden_dir / "weights.pth", weights_only=True)["model"])
    assert "does not load" in store.published_mismatch() and store.active_version() == "base"


def test_an_unreadable_version_falls_back_to_the_newest_readable_one(tmp_path: Path, golden_config: dict) -> None:
    """An empty or truncated served file (a disk that filled up, a copy cut short) never stops serving: the newest
    readable version published before it serves, then the base."""
    store = ModelStore(tmp_path, golden_config)
    first, second = _state(golden_config, 1), _state(golden_config, 2)
    v1 = store.publish(first, {})
    v2 = store.publish(second, {})
    (tmp_path / "versions" / v2 / "model.pt").write_bytes(b"")
    assert store.active_version() == v1 and "empty" in store.published_mismatch()
    assert _equal(store.load().state_dict(), first)
    (tmp_path / "versions" / v1 / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    assert store.active_version() == v1  # not known to be bad until it fails to load
    model = store.load()
    assert store.active_version() == "random-init" and "does not load" in store._unusable(v1)
    assert model.config.encoder_depth == golden_config["encoder_depth"]


def test_kept_versions_are_bounded_and_the_served_one_is_kept(tmp_path: Path, golden_config: dict) -> None:
    store = ModelStore(tmp_path, golden_config, keep_versions=2)
    versions = [store.publish(_state(golden_config, 1), {"n": n}) for n in range(3)]
    assert [v["version"] for v in store.list_versions()] == versions[1:]
    store.rollback(versions[1])
    newer = [store.publish(_state(golden_config, 1), {"n": n}, if_serving=store.version_key()) for n in (3, 4)]
    kept = [v["version"] for v in store.list_versions()]
    assert kept == newer and store.active_version() == newer[-1]
    assert int(newer[-1][1:5]) == 5  # numbers go on after pruning: a name is never reused


def test_a_rollback_during_a_run_wins_and_runs_are_one_at_a_time(tmp_path: Path, golden_config: dict) -> None:
    store = ModelStore(tmp_path, golden_config)
    v1 = store.publish(_state(golden_config, 1), {})
    started_from = store.version_key()  # a run starts from v1 ...
    store.rollback("base")  # ... and an operator rolls back while it trains
    assert store.publish(_state(golden_config, 2), {}, if_serving=started_from) is None
    assert store.active_version() == "random-init" and [v["version"] for v in store.list_versions()] == [v1]
    other = ModelStore(tmp_path, golden_config)  # another process's store: the lock is the file system's
    with store.training_lock(), pytest.raises(TrainingInProgressError, match="in progress"), other.training_lock():
        pass
    with store.training_lock():  # released at the end of the run
        pass


def test_a_swap_copies_new_weights_into_the_served_model_in_place(
    tmp_path: Path, golden_dir: Path, golden_config: dict
) -> None:
    """A published version reaches the model already serving, tensor by tensor (no second model beside it); a
    version that does not fit the model is refused before anything is copied; a rollback to the base copies back."""
    from lib.serving.interactive import InteractiveSegmenter

    store = ModelStore(tmp_path, golden_config, base_checkpoint=golden_dir / "weights.pth")
    segmenter = InteractiveSegmenter(store, backend="torch")
    served, _ = segmenter.model()
    base = {k: v.clone() for k, v in served.state_dict().items()}
    first = _state(golden_config, 1)
    store.publish(first, {"val_dice": 0.5})
    model, key = segmenter.model()
    assert model is served and key == store.version_key() and _equal(model.state_dict(), first)

    wider = {**golden_config, "encoder_depth": golden_config["encoder_depth"] + 1}
    bad = store.publish(_state(wider, 1), {"val_dice": 0.9})
    meta_path = tmp_path / "versions" / bad / "metrics.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"], meta["base"]  # published before versions recorded their config: found when loading
    meta_path.write_text(json.dumps(meta))
    model, _ = segmenter.model()
    assert model is served and _equal(model.state_dict(), first)
    assert "does not fit the model config" in store._unusable(bad)

    store.rollback("base")
    model, _ = segmenter.model()
    assert model is served and _equal(model.state_dict(), base)
