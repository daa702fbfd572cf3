"""The retraining trigger policy and its persistent state (lib.loop.retraining), with a clock the test moves."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest

from lib.loop.retraining import (
    INTERRUPTED,
    NOT_PROMOTED,
    PROMOTED,
    CronSchedule,
    RetrainingController,
    RetrainPolicy,
)


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def labels(n: int, stamp: str = "1") -> dict[str, str]:
    return {f"img{i:03d}": stamp for i in range(n)}


def controller(tmp_path, clock=None, **policy) -> RetrainingController:
    return RetrainingController(tmp_path / "state.json", RetrainPolicy(**policy), clock=clock or Clock())


def test_label_trigger_fires_at_threshold_and_counts_changed_labels(tmp_path):
    ctl = controller(tmp_path, after_labels=3)
    assert ctl.poll(labels(2), busy=False) is None
    trigger = ctl.poll(labels(3), busy=False)
    assert trigger is not None and trigger.kind == "labels" and "3 new final labels" in trigger.reason
    ctl.started(trigger, labels(3), "task-1", "base")
    ctl.finished(PROMOTED, "v0001")
    # the three labels seen by the run are no longer new; re-saving two of them and adding one is three new
    assert ctl.poll(labels(3), busy=False) is None
    resaved = {**labels(4), "img000": "2", "img001": "2"}
    assert ctl.new_labels(resaved) == ["img000", "img001", "img003"]
    assert ctl.poll(resaved, busy=False).kind == "labels"


def test_trigger_during_a_run_queues_exactly_one_more(tmp_path):
    ctl = controller(tmp_path, after_labels=2)
    first = ctl.poll(labels(2), busy=False)
    ctl.started(first, labels(2), "task-1", "base")
    # two more labels arrive while the run trains: queued, not started; further labels do not queue a second one
    assert ctl.poll(labels(4), busy=True) is None
    assert ctl.queued is not None
    assert ctl.poll(labels(8), busy=True) is None
    ctl.finished(NOT_PROMOTED, "base", {"val_dice": 0.1, "loss": float("nan")}, "validation Dice dropped")
    queued = ctl.poll(labels(8), busy=False)
    assert queued is not None and queued.kind == "queued"
    ctl.started(queued, labels(8), "task-2", "base")
    assert ctl.queued is None
    ctl.finished(PROMOTED, "v0001", {"val_dice": 0.5})
    assert ctl.poll(labels(8), busy=False) is None
    history = ctl.history()
    assert [h["status"] for h in history] == [NOT_PROMOTED, PROMOTED]
    assert [h["trigger"] for h in history] == ["labels", "queued"]
    assert history[1]["version_before"] == "base" and history[1]["version_after"] == "v0001"
    assert history[0]["metrics"] == {"val_dice": 0.1, "loss": None}  # a diverged run's NaN is served as null


def test_busy_with_a_manual_run_blocks_start(tmp_path):
    ctl = controller(tmp_path, after_labels=1)
    assert ctl.poll(labels(1), busy=True) is None
    assert ctl.running is None and ctl.queued is not None


def test_min_labels_holds_back_any_trigger(tmp_path):
    clock = Clock()
    ctl = controller(tmp_path, clock, interval_minutes=1, min_labels=3, schedule_without_new_labels=True)
    clock.now += 120
    assert ctl.poll(labels(2), busy=False) is None
    clock.now += 120
    assert ctl.poll(labels(3), busy=False).kind == "interval"


def test_interval_trigger_and_skip_without_new_labels(tmp_path):
    clock = Clock()
    ctl = controller(tmp_path, clock, interval_minutes=10)
    assert ctl.poll(labels(2), busy=False) is None
    clock.now += 9 * 60
    assert ctl.poll(labels(2), busy=False) is None
    clock.now += 61
    trigger = ctl.poll(labels(2), busy=False)
    assert trigger.kind == "interval"
    ctl.started(trigger, labels(2), "t1", "base")
    ctl.finished(PROMOTED, "v0001")
    # ten more minutes without a new label: skipped by default
    clock.now += 11 * 60
    assert ctl.poll(labels(2), busy=False) is None
    assert ctl.next_scheduled() == pytest.approx(clock.now + 10 * 60)


def test_cron_parsing_and_next_time():
    every_quarter = CronSchedule.parse("*/15 * * * *")
    assert every_quarter.next_after(dt.datetime(2026, 1, 1, 10, 7, 30)) == dt.datetime(2026, 1, 1, 10, 15)
    assert every_quarter.next_after(dt.datetime(2026, 1, 1, 10, 15)) == dt.datetime(2026, 1, 1, 10, 30)
    nightly_weekdays = CronSchedule.parse("30 2 * * 1-5")
    # Friday 2026-01-02 03:00 -> Monday 2026-01-05 02:30
    assert nightly_weekdays.next_after(dt.datetime(2026, 1, 2, 3, 0)) == dt.datetime(2026, 1, 5, 2, 30)
    underscored = CronSchedule.parse("30_2_*_*_1-5")  # as written through the monailabel launcher
    assert underscored.next_after(dt.datetime(2026, 1, 2, 3, 0)) == dt.datetime(2026, 1, 5, 2, 30)
    sunday = CronSchedule.parse("0 0 * * 7")
    assert sunday.next_after(dt.datetime(2026, 1, 1)) == dt.datetime(2026, 1, 4)
    for bad in ("* * * *", "61 * * * *", "*/0 * * * *", "a * * * *", "5-1 * * * *"):
        with pytest.raises(ValueError, match="cron"):
            CronSchedule.parse(bad)


def test_cron_trigger_fires_once_per_time(tmp_path):
    start = dt.datetime(2026, 1, 1, 10, 0, 30).timestamp()
    clock = Clock(start)
    ctl = controller(tmp_path, clock, cron="*/5 * * * *")
    clock.now = start + 60
    assert ctl.poll(labels(1), busy=False) is None
    clock.now = dt.datetime(2026, 1, 1, 10, 5, 1).timestamp()
    trigger = ctl.poll(labels(1), busy=False)
    assert trigger.kind == "cron" and "10:05" in trigger.reason
    ctl.started(trigger, labels(1), "t1", "base")
    ctl.finished(PROMOTED, "v0001")
    clock.now += 30
    assert ctl.poll(labels(2), busy=False) is None


def test_policy_from_conf_reads_keys_and_names_bad_values():
    policy = RetrainPolicy.from_conf(
        {"retrain_after_labels": "5", "retrain_cron": "0 3 * * *", "retrain_schedule_without_new_labels": "true"}
    )
    assert policy.after_labels == 5 and policy.cron == "0 3 * * *" and policy.schedule_without_new_labels
    assert policy.enabled and not RetrainPolicy().enabled
    with pytest.raises(ValueError, match="retrain_after_labels"):
        RetrainPolicy.from_conf({"retrain_after_labels": "five"})
    with pytest.raises(ValueError, match="cron"):
        RetrainPolicy.from_conf({"retrain_cron": "every night"})


def test_state_survives_restart_and_interrupted_run_is_queued_again(tmp_path):
    clock = Clock()
    ctl = controller(tmp_path, clock, after_labels=2)
    trigger = ctl.poll(labels(2), busy=False)
    ctl.started(trigger, labels(2), "t1", "base")
    ctl.finished(PROMOTED, "v0001", {"val_dice": 0.7})
    ctl.started(ctl.poll(labels(4), busy=False), labels(4), "t2", "v0001")
    # the server dies here; a new one reads the same file
    again = controller(tmp_path, clock, after_labels=2)
    history = again.history()
    assert [h["status"] for h in history] == [PROMOTED, INTERRUPTED]
    assert again.running is None and "interrupted run 2" in again.queued["reason"]
    assert again.new_labels(labels(4)) == []
    restart = again.poll(labels(4), busy=False)
    assert restart.kind == "queued"
    assert json.loads((tmp_path / "state.json").read_text())["runs_started"] == 2


def test_unreadable_state_is_kept_aside_not_fatal(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    ctl = controller(tmp_path, after_labels=1)
    assert ctl.history() == []
    assert list(tmp_path.glob("state.broken-*.json"))
    assert json.loads((tmp_path / "state.json").read_text())["schema"] == 1


def test_concurrent_callers_never_start_two_runs(tmp_path):
    ctl = controller(tmp_path, after_labels=1)
    launched: list[str] = []
    barrier = threading.Barrier(8)

    def launch(trigger):
        time.sleep(0.01)  # a slow start widens any race
        launched.append(trigger.reason)
        return f"task-{len(launched)}"

    def caller():
        barrier.wait()
        for _ in range(20):
            ctl.begin(labels(3), busy=False, launch=launch, version_before="base")

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(launched) == 1
    assert ctl.running["task_id"] == "task-1"


def test_launcher_that_finds_a_run_in_progress_queues(tmp_path):
    ctl = controller(tmp_path, after_labels=1)
    assert ctl.begin(labels(1), busy=False, launch=lambda trigger: None, version_before="base") is None
    assert ctl.running is None and ctl.queued is not None
    record = ctl.begin(labels(1), busy=False, launch=lambda trigger: "t9", version_before="base")
    assert record["trigger"] == "queued" and record["task_id"] == "t9"
