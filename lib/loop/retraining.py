"""When to retrain: the trigger policy of the active-learning loop and its persistent state.

The server asks :meth:`RetrainingController.poll` every few seconds with the final labels the datastore holds now
(``{image id: stamp}``; a stamp changes when a label is saved again) and whether a training run is in progress. A run
is due when

* ``after_labels`` final labels are new or changed since the start of the last run (labels copied into the datastore
  as files count: the caller counts what the datastore holds, not what came through the API);
* ``interval_minutes`` have passed since the last run started (or since the state was created);
* a ``cron`` time (five fields, the server's local time: ``minute hour day-of-month month day-of-week``) has passed
  since the previous poll.

Never two runs at once: a trigger that fires while a run is in progress queues exactly one more run, started when the
current one ends. Scheduled triggers without any new label are skipped unless ``schedule_without_new_labels`` is set,
and nothing starts while fewer than ``min_labels`` final labels exist.

The state (labels seen at the last run, queued run, run in progress, history with reasons, outcomes and versions) is
one JSON file written atomically, so it survives a restart; a run that was in progress when the server stopped is
recorded as ``interrupted`` and queued again. Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lib.common.atomic_files import json_safe, write_json_atomic
from lib.common.settings import dataclass_from_conf

logger = logging.getLogger(__name__)

STATE_FILE = "retraining_state.json"
SCHEMA = 1
HISTORY_LIMIT = 200

# Outcomes of a run, as recorded in the history.
PROMOTED = "promoted"
NOT_PROMOTED = "not_promoted"
FAILED = "failed"
INTERRUPTED = "interrupted"
STOPPED = "stopped"


# ------------------------------------------------------------------------------------------------------------ cron
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def _parse_cron_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"cron {name}: step {step_text!r} is not a positive integer")
            step = int(step_text)
        if part == "*":
            start, stop = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ValueError(f"cron {name}: range {part!r} is not two integers")
            start, stop = int(a), int(b)
        elif part.isdigit():
            start = int(part)
            stop = start if step == 1 else high
        else:
            raise ValueError(f"cron {name}: {part!r} is not '*', a number, a range or a list")
        if not (low <= start <= high and low <= stop <= high) or start > stop:
            raise ValueError(f"cron {name}: {part!r} is outside {low}..{high}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclasses.dataclass(frozen=True)
class CronSchedule:
    """A five-field cron expression (``*``, numbers, ``a-b``, ``*/n``, ``a-b/n`` and lists; day of week 0 or 7 is
    Sunday), fields separated by spaces or ``_``. As in cron, when both day of month and day of week are restricted a
    day matching either one counts."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    day_restricted: bool
    weekday_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        fields = expression.replace("_", " ").split()  # "_" too: the monailabel launcher splits --conf on spaces
        if len(fields) != 5:
            raise ValueError(
                f"cron expression {expression!r} must have 5 fields (minute hour day-of-month month day-of-week)"
            )
        parsed = [_parse_cron_field(f, name, lo, hi) for f, (name, lo, hi) in zip(fields, _CRON_FIELDS)]
        weekdays = frozenset(d % 7 for d in parsed[4])
        return cls(expression, parsed[0], parsed[1], parsed[2], parsed[3], weekdays, fields[2] != "*", fields[4] != "*")

    def _day_matches(self, day: _dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def next_after(self, moment: _dt.datetime) -> _dt.datetime:
        """The first matching minute strictly after ``moment`` (naive local time in, naive local time out)."""
        start = moment.replace(second=0, microsecond=0) + _dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(366 * 8):  # covers every leap-day schedule
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        candidate = _dt.datetime.combine(day, _dt.time(hour, minute))
                        if candidate >= start:
                            return candidate
            day += _dt.timedelta(days=1)
        raise ValueError(f"cron expression {self.expression!r} never matches")


# ---------------------------------------------------------------------------------------------------------- policy
@dataclasses.dataclass(frozen=True)
class RetrainPolicy:
    """The retraining triggers, from the server's ``--conf`` (keys ``retrain_<field>``).

    Attributes:
        after_labels: retrain once this many final labels are new since the last run (0: off).
        interval_minutes: retrain this long after the last run started (0: off).
        cron: retrain at these times (empty: off).
        min_labels: never start with fewer final labels in the datastore.
        schedule_without_new_labels: let the interval and cron triggers start a run when no label is new.
        poll_seconds: how often the server checks the triggers.
    """

    after_labels: int = 0
    interval_minutes: float = 0.0
    cron: str = ""
    min_labels: int = 1
    schedule_without_new_labels: bool = False
    poll_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.after_labels < 0 or self.interval_minutes < 0 or self.min_labels < 0 or self.poll_seconds <= 0:
            raise ValueError(f"retraining settings must not be negative (poll_seconds > 0): {self}")
        if self.cron:
            CronSchedule.parse(self.cron)

    @property
    def enabled(self) -> bool:
        return bool(self.after_labels or self.interval_minutes or self.cron)

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], prefix: str = "retrain_") -> RetrainPolicy:
        """Read ``retrain_after_labels``, ``retrain_interval_minutes``, ``retrain_cron``, ``retrain_min_labels``,
        ``retrain_schedule_without_new_labels`` and ``retrain_poll_seconds``; a bad value raises a ValueError naming
        the key."""
        return dataclass_from_conf(cls, conf, prefix)


@dataclasses.dataclass(frozen=True)
class Trigger:
    """Why a run starts: ``kind`` is ``labels``, ``interval``, ``cron``, ``queued`` or ``manual``."""

    kind: str
    reason: str


# ----------------------------------------------------------------------------------------------------------- state
def _iso(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).isoformat(timespec="seconds")


def _fresh_state(now: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "created": now,
        "labels_at_last_run": {},
        "last_run_started": None,
        "last_interval_reference": now,
        "last_cron_check": now,
        "queued": None,
        "running": None,
        "history": [],
        "runs_started": 0,
    }


class RetrainingController:
    """The trigger policy with its persistent, thread-safe state.

    Args:
        state_path: the JSON state file (e.g. ``<model dir>/retraining_state.json``).
        policy: the triggers.
        clock: seconds since the epoch (injectable so tests can move time).
    """

    def __init__(self, state_path: str | Path, policy: RetrainPolicy, clock: Callable[[], float] = time.time) -> None:
        self.state_path = Path(state_path)
        self.policy = policy
        self.clock = clock
        self._cron = CronSchedule.parse(policy.cron) if policy.cron else None
        self._lock = threading.RLock()
        self._state = self._load()
        self._recover()

    # ---------------------------------------------------------------------------------------------- persistence
    def _load(self) -> dict[str, Any]:
        now = self.clock()
        if not self.state_path.is_file():
            return _fresh_state(now)
        try:
            state = json.loads(self.state_path.read_text())
            if not isinstance(state, dict) or state.get("schema") != SCHEMA:
                raise ValueError(f"schema {state.get('schema') if isinstance(state, dict) else None!r}")
        except ValueError as err:
            broken = self.state_path.with_suffix(f".broken-{int(now)}.json")
            os.replace(self.state_path, broken)
            logger.error(f"Retraining: unreadable state {self.state_path} ({err}); kept as {broken}, starting afresh")
            return _fresh_state(now)
        fresh = _fresh_state(now)
        return {**fresh, **state}

    def _save(self) -> None:
        self._state["history"] = self._state["history"][-HISTORY_LIMIT:]
        write_json_atomic(self.state_path, self._state)

    def _recover(self) -> None:
        """A run recorded as in progress cannot be: its process died with the previous server. Queue it again."""
        with self._lock:
            running = self._state.get("running")
            if running:
                running.update(
                    status=INTERRUPTED,
                    ended_at=_iso(self.clock()),
                    message="the server stopped while this run was in progress",
                )
                self._state["history"].append(running)
                self._state["running"] = None
                if not self._state.get("queued"):
                    self._state["queued"] = {
                        "reason": f"rerun of interrupted run {running['run']}",
                        "since": self.clock(),
                    }
                logger.warning(f"Retraining: run {running['run']} was interrupted by a server restart; queued again")
            self._save()

    # ---------------------------------------------------------------------------------------------------- queries
    @property
    def running(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._state["running"]) if self._state["running"] else None

    @property
    def queued(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._state["queued"]) if self._state["queued"] else None

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._state["history"]]

    def new_labels(self, labels: Mapping[str, str]) -> list[str]:
        """Images whose final label is new or changed since the last run started."""
        with self._lock:
            seen = self._state["labels_at_last_run"]
            return sorted(image for image, stamp in labels.items() if seen.get(image) != str(stamp))

    def next_scheduled(self) -> float | None:
        """When the interval or cron trigger fires next (seconds since the epoch), or ``None``."""
        with self._lock:
            times = []
            if self.policy.interval_minutes:
                times.append(self._interval_reference() + self.policy.interval_minutes * 60)
            if self._cron:
                last = _dt.datetime.fromtimestamp(self._state["last_cron_check"])
                times.append(self._cron.next_after(last).timestamp())
            return min(times) if times else None

    def summary(self) -> dict[str, Any]:
        """What an administrator reads in ``/info``: the policy, the run in progress, the queue and recent runs."""
        with self._lock:
            next_at = self.next_scheduled()
            return {
                "policy": dataclasses.asdict(self.policy),
                "enabled": self.policy.enabled,
                "running": self.running,
                "queued": self.queued,
                "labels_at_last_run": len(self._state["labels_at_last_run"]),
                "last_run_started": _iso(self._state["last_run_started"]) if self._state["last_run_started"] else None,
                "next_scheduled": _iso(next_at) if next_at else None,
                "runs_started": self._state["runs_started"],
                "history": self.history()[-10:],
            }

    # ---------------------------------------------------------------------------------------------------- triggers
    def _interval_reference(self) -> float:
        return max(self._state["last_run_started"] or 0.0, self._state["last_interval_reference"])

    def _fired(self, labels: Mapping[str, str], now: float) -> Trigger | None:
        """The trigger that fires now, if any (advances the schedule references of the triggers it consumes)."""
        new = self.new_labels(labels)
        scheduled: Trigger | None = None
        if self.policy.interval_minutes and now - self._interval_reference() >= self.policy.interval_minutes * 60:
            self._state["last_interval_reference"] = now
            scheduled = Trigger("interval", f"interval of {self.policy.interval_minutes:g} min elapsed")
        if self._cron:
            last = _dt.datetime.fromtimestamp(self._state["last_cron_check"])
            due = self._cron.next_after(last)
            self._state["last_cron_check"] = now
            if due.timestamp() <= now:
                scheduled = scheduled or Trigger("cron", f"cron '{self.policy.cron}' time {due.isoformat()} reached")
        if self.policy.after_labels and len(new) >= self.policy.after_labels:
            return Trigger(
                "labels", f"{len(new)} new final labels since the last run (threshold {self.policy.after_labels})"
            )
        if scheduled and not new and not self.policy.schedule_without_new_labels:
            logger.info(f"Retraining: {scheduled.reason}, but no final label is new since the last run; skipped")
            return None
        if scheduled and new:
            return Trigger(scheduled.kind, f"{scheduled.reason}; {len(new)} new final labels")
        return scheduled

    def poll(self, labels: Mapping[str, str], busy: bool) -> Trigger | None:
        """Evaluate the triggers; returns the trigger of a run to start now, or ``None``.

        Args:
            labels: ``{image id: stamp}`` of every final label in the datastore now.
            busy: a training run (ours or a manual ``/train``) is in progress.
        """
        with self._lock:
            now = self.clock()
            fired = self._fired(labels, now)
            if busy or self._state["running"]:
                if fired and not self._state["queued"]:
                    self._state["queued"] = {"reason": fired.reason, "since": now}
                    logger.info(f"Retraining: {fired.reason} while a run is in progress; one more run queued")
                self._save()
                return None
            if len(labels) < self.policy.min_labels:
                if fired or self._state["queued"]:
                    logger.info(
                        f"Retraining: not started, {len(labels)} final labels < retrain_min_labels "
                        f"{self.policy.min_labels}"
                    )
                self._save()
                return None
            if self._state["queued"]:
                queued = self._state["queued"]
                self._save()
                return Trigger("queued", f"queued: {queued['reason']}")
            self._save()
            return fired

    # ---------------------------------------------------------------------------------------------------- run life
    def started(
        self, trigger: Trigger, labels: Mapping[str, str], task_id: str | None, version_before: str
    ) -> dict[str, Any]:
        """Record that a run started (the labels it sees become the reference for the next label trigger)."""
        with self._lock:
            now = self.clock()
            new = self.new_labels(labels)
            self._state["runs_started"] += 1
            record = {
                "run": self._state["runs_started"],
                "task_id": task_id,
                "trigger": trigger.kind,
                "reason": trigger.reason,
                "started_at": _iso(now),
                "started_ts": now,
                "labels": len(labels),
                "new_labels": len(new),
                "version_before": version_before,
                "status": "running",
            }
            self._state["running"] = record
            self._state["labels_at_last_run"] = {k: str(v) for k, v in labels.items()}
            self._state["last_run_started"] = now
            if trigger.kind != "manual":
                self._state["queued"] = None
            self._save()
            logger.info(
                f"Retraining: run {record['run']} started ({trigger.kind}: {trigger.reason}); "
                f"{len(labels)} final labels, serving {version_before}"
            )
            return dict(record)

    def begin(
        self,
        labels: Mapping[str, str],
        busy: bool,
        launch: Callable[[Trigger], str | None],
        version_before: str,
    ) -> dict[str, Any] | None:
        """Poll and, when a run is due, launch it and record it, all under one lock: two callers never both start.

        ``launch(trigger)`` starts the run and returns its task id, or ``None`` when it found a run already in
        progress (a manual ``/train`` that started a moment ago); then the run is queued instead.
        """
        with self._lock:
            trigger = self.poll(labels, busy)
            if trigger is None:
                return None
            task_id = launch(trigger)
            if task_id is None:
                if not self._state["queued"]:
                    self._state["queued"] = {"reason": trigger.reason, "since": self.clock()}
                self._save()
                logger.info(f"Retraining: {trigger.reason}, but a run is in progress; one more run queued")
                return None
            return self.started(trigger, labels, task_id, version_before)

    def finished(
        self,
        status: str,
        version_after: str,
        metrics: Mapping[str, Any] | None = None,
        message: str = "",
    ) -> dict[str, Any] | None:
        """Record how the run in progress ended: ``promoted``, ``not_promoted``, ``failed`` or ``stopped``."""
        with self._lock:
            record = self._state["running"]
            if not record:
                return None
            record.update(
                status=status,
                ended_at=_iso(self.clock()),
                version_after=version_after,
                metrics=json_safe(dict(metrics or {})),
                message=message,
            )
            self._state["history"].append(record)
            self._state["running"] = None
            self._save()
            log = logger.warning if status in (FAILED, STOPPED) else logger.info
            log(
                f"Retraining: run {record['run']} ended: {status}; serving {version_after}"
                + (f"; {message}" if message else "")
            )
            return dict(record)
