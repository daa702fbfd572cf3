"""The retraining scheduler of the active-learning loop: it runs inside the server and decides when to train.

Every ``retrain_poll_seconds`` it reads the final labels the datastore holds (label files' size and mtime, so labels
saved through ``PUT /datastore/label`` and labels copied in as files count alike), asks the trigger policy
(:class:`lib.loop.retraining.RetrainingController`) whether a run is due and, if so, starts one the way ``POST /train``
does: MONAI Label's background task runner, a subprocess that rebuilds the app, so inference keeps answering in the
server. It follows every train task, including manual ``/train`` requests, and records how each ended:

``promoted``       the trainer published a new version (its validation Dice was not lower than the served model's)
``not_promoted``   the run finished but the served model stayed (validation Dice dropped)
``failed``         the task exited with an error (the served model is untouched)
``stopped``        stopped through ``DELETE /train``

It also keeps the uncertainty scores current (``--conf uncertainty_refresh``): when unlabeled images lack a score
from the serving model (new images, a new version after a promotion or a rollback) and neither training nor scoring
runs, it scores them (checked at most every ``SCORING_BACKOFF_SECONDS``, once no click came for
``SCORING_IDLE_SECONDS``): on a thread of the server process at a lower priority, with the served model itself, one
image at a time (:meth:`InteractiveSegmenter.served_model`), so that no second copy of the weights is held.

Everything is logged (``Retraining: run N started (labels: 5 new final labels ...)`` / ``... ended: promoted;
serving v0002-...``) and shown in ``/info`` under ``retraining``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from apps.sam_med2d.activelearning import scores_missing
from apps.sam_med2d.monailabel_private import start_task, task_states
from lib.loop.retraining import (
    FAILED,
    NOT_PROMOTED,
    PROMOTED,
    STATE_FILE,
    STOPPED,
    RetrainingController,
    RetrainPolicy,
    Trigger,
)
from lib.serving.model_store import ModelStore

logger = logging.getLogger(__name__)

ACTIVE = ("SUBMITTED", "RUNNING")
SCORING_BACKOFF_SECONDS = 30.0
SCORING_IDLE_SECONDS = 30.0


def final_label_stamps(datastore: Datastore, refresh: bool = False) -> dict[str, str]:
    """``{image id: stamp}`` of every final label; the stamp changes when a label is replaced: the label file's size and
    mtime in a local datastore, the label id elsewhere (a DICOM SEG saved again is a new series; nothing is
    downloaded)."""
    if refresh:
        datastore.refresh()
    stamps: dict[str, str] = {}
    local = isinstance(datastore, LocalDatastore) and type(datastore).get_label_uri is LocalDatastore.get_label_uri
    for image_id in datastore.get_labeled_images():
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        if not local:
            stamps[image_id] = str(label_id)
            continue
        uri = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL) if label_id else ""
        try:
            stat = os.stat(uri)
            stamps[image_id] = f"{stat.st_size}:{stat.st_mtime_ns}"
        except (OSError, TypeError):
            stamps[image_id] = str(datastore.get_label_info(label_id, DefaultLabelTag.FINAL).get("ts", ""))
    return stamps


class RetrainingScheduler:
    """Starts training runs when the policy says so and records their outcome.

    Args:
        app: the MONAI Label app (its ``datastore()``, ``model_store`` and ``async_scoring``).
        policy: the triggers (from ``--conf retrain_*``).
        model: the train task to run.
        train_params: request parameters of the runs it starts (e.g. ``{"max_epochs": 2}``).
        rescore: scoring methods to start whenever :func:`apps.sam_med2d.activelearning.scores_missing` finds work.
        scoring_idle_seconds: start them only when no click came for this long (the app's ``segmenter``): scoring
            runs in a second process that would share the cores with the clicks (its priority is lowered too).
    """

    def __init__(
        self,
        app: Any,
        policy: RetrainPolicy,
        model: str,
        train_params: Mapping[str, Any] | None = None,
        rescore: tuple[str, ...] = (),
        scoring_idle_seconds: float = SCORING_IDLE_SECONDS,
    ) -> None:
        self.app = app
        self.scoring_idle_seconds = scoring_idle_seconds
        self.store: ModelStore = app.model_store
        self.model = model
        self.train_params = dict(train_params or {})
        self.rescore = rescore
        self.controller = RetrainingController(self.store.model_dir / STATE_FILE, policy)
        self._known_tasks: set[str] = set()
        self._last_scoring = 0.0
        # One long-lived scoring thread (started at the first run): a thread's first encode sets up per-thread
        # buffers (oneDNN, OpenMP, a malloc arena: about 50 MB) that a new thread per run would set up again.
        self._scoring_thread: threading.Thread | None = None
        self._scoring_requested = threading.Event()
        self._scoring_busy = False
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policy(self) -> RetrainPolicy:
        return self.controller.policy

    # ------------------------------------------------------------------------------------------------- the loop
    def start(self) -> None:
        """Start polling in a daemon thread (call once, in the server process only)."""
        if self._thread is not None:
            return
        p = self.policy
        logger.info(
            f"Retraining scheduler: after_labels={p.after_labels or 'off'}, interval_minutes="
            f"{p.interval_minutes or 'off'}, cron={p.cron or 'off'}, min_labels={p.min_labels}, model={self.model}, "
            f"params={self.train_params}; state in {self.controller.state_path}; serving {self.store.active_version()}"
        )
        self._thread = threading.Thread(target=self._loop, name="retraining-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("Retraining scheduler: poll failed (will retry)")
            self._stop.wait(self.policy.poll_seconds)

    def tick(self) -> dict[str, Any] | None:
        """One poll: follow train tasks, then start a run if one is due; returns the record of a run started."""
        with self._tick_lock:
            stamps: dict[str, str] | None = None

            def labels() -> dict[str, str]:  # read only when needed: on a DICOMweb datastore it queries the PACS
                nonlocal stamps
                if stamps is None:
                    refresh = not settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD
                    stamps = final_label_stamps(self.app.datastore(), refresh=refresh)
                return stamps

            self._follow(labels)
            busy = any(t.get("status") in ACTIVE for t in task_states("train"))
            record = None
            if self.policy.enabled or self.controller.queued:
                record = self.controller.begin(labels(), busy, self._launch, self.store.active_version())
            if record is None and not busy and not self.controller.running:
                self._refresh_scores()
            return record

    def _refresh_scores(self) -> None:
        """Start the scoring task when images lack a score from the serving model (not while training)."""
        if not self.rescore or time.monotonic() - self._last_scoring < SCORING_BACKOFF_SECONDS:
            return
        segmenter = getattr(self.app, "segmenter", None)
        if segmenter is not None and segmenter.idle_seconds() < self.scoring_idle_seconds:
            return
        if self._scoring_busy:
            return
        if any(t.get("status") in ACTIVE for t in task_states("scoring")):  # a POST /scoring run
            return
        self._last_scoring = time.monotonic()
        missing = scores_missing(self.store, self.app.datastore())
        if not missing:
            return
        logger.info(
            f"Retraining scheduler: {missing} unlabeled images lack a score from {self.store.active_version()}; "
            f"scoring ({', '.join(self.rescore)})"
        )
        # On a thread of this process, with the served model (background scoring): a subprocess would hold a second
        # copy of the weights while the server serves.
        self._scoring_busy = True
        if self._scoring_thread is None:
            self._scoring_thread = threading.Thread(target=self._scoring_loop, name="uncertainty-scoring", daemon=True)
            self._scoring_thread.start()
        self._scoring_requested.set()

    def _scoring_loop(self) -> None:
        while True:
            self._scoring_requested.wait()
            self._scoring_requested.clear()
            try:
                self._score()
            finally:
                self._scoring_busy = False

    def score_soon(self) -> None:
        """Check for missing scores at the next poll, without waiting out the back-off (still once idle)."""
        self._last_scoring = 0.0

    def _score(self) -> None:
        for method in self.rescore:
            try:
                self.app.scoring({"method": method, "background": True})
            except Exception:  # noqa: BLE001 (a failed scoring run is logged; the next idle moment retries)
                logger.exception(f"Uncertainty scoring ({method}) failed")

    def _launch(self, trigger: Trigger) -> str | None:
        """Start a train task as ``POST /train/<model>`` does; ``None`` when one is already running."""
        task, detail = start_task("train", {"model": self.model}, self.train_params)
        if task is None:
            logger.info(f"Retraining: {detail}")
            return None
        self._known_tasks.add(task["id"])
        return str(task["id"])

    # --------------------------------------------------------------------------------------------- bookkeeping
    def _follow(self, labels: Callable[[], Mapping[str, str]]) -> None:
        running = self.controller.running
        by_id = {t["id"]: t for t in task_states("train")}
        if running:
            task = by_id.get(running.get("task_id"))
            if task is None:
                self.controller.finished(FAILED, self.store.active_version(), message="its train task disappeared")
            elif task.get("status") not in ACTIVE:
                self._record_end(running, task)
            else:
                return
        for task_id, task in by_id.items():
            if task_id in self._known_tasks:
                continue
            self._known_tasks.add(task_id)
            if task.get("status") in ACTIVE and self.controller.running is None:
                params = {k: v for k, v in task.get("request", {}).items() if k not in ("model", "gpus", "bundle_path")}
                reason = f"manual /train request (params {params})" if params else "manual /train request"
                self.controller.started(Trigger("manual", reason), labels(), task_id, self.store.active_version())

    def _train_stats(self, running: Mapping[str, Any]) -> dict[str, Any]:
        """The train task's report of this run (``train_stats.json``), if it wrote one since the run started."""
        task = getattr(self.app, "_trainers", {}).get(self.model)
        try:
            stats = dict(task.stats()) if task is not None else {}
        except (OSError, ValueError):
            return {}
        return stats if float(stats.get("start_ts", 0)) >= float(running.get("started_ts", 0)) - 5 else {}

    def _record_end(self, running: Mapping[str, Any], task: Mapping[str, Any]) -> None:
        after = self.store.active_version()
        meta = self.store.published_meta()
        stats = self._train_stats(running)
        details = [str(line) for line in task.get("details", [])]
        status = task.get("status")
        metrics: dict[str, Any] = {}
        if stats.get("baseline"):
            metrics["baseline_val_dice"] = stats["baseline"]["dice"].get("mean")
        if stats.get("epochs"):
            means = [e["val"]["dice"]["mean"] for e in stats["epochs"] if e.get("val")]
            if means:
                metrics["best_val_dice"] = max(means)
        if status == "STOPPED":
            outcome, message = STOPPED, "stopped through DELETE /train"
        elif status != "DONE" or stats.get("status") == "failed":
            outcome = FAILED
            reason = stats.get("error") or " | ".join(details[-3:])
            message = f"train task failed; the served model is unchanged: {reason}"
        elif after != running.get("version_before") and meta.get("version") == after:
            outcome = PROMOTED
            published = meta.get("metrics", {})
            metrics.update(
                {k: published[k] for k in ("val_dice", "epoch", "train_images", "val_images") if k in published}
            )
            message = f"new version {after} serves" + (
                f": {stats['publish_reason']}" if "publish_reason" in stats else ""
            )
        else:
            outcome = NOT_PROMOTED
            message = "finished without publishing; the served model stays" + (
                f": {stats['publish_reason']}" if stats.get("publish_reason") else ""
            )
        self.controller.finished(outcome, after, metrics, message)

    # ------------------------------------------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """For ``/info``: what serves, the kept versions with metrics, the triggers, the run in progress and history."""
        return {
            "active_version": self.store.active_version(),
            "versions": self.store.list_versions(),
            **self.controller.summary(),
        }


def scheduler_from_conf(app: Any, model: str) -> RetrainingScheduler:
    """The scheduler the app starts, from ``--conf``: ``retrain_after_labels``, ``retrain_interval_minutes``,
    ``retrain_cron``, ``retrain_min_labels``, ``retrain_schedule_without_new_labels``, ``retrain_poll_seconds`` and
    ``retrain_params`` (JSON: request parameters of the runs it starts, e.g. ``{"max_epochs": 2}``); and
    ``uncertainty_refresh`` (``auto``: keep the uncertainty scores current when ``MONAI_LABEL_AUTO_UPDATE_SCORING`` is
    on, as it is by default; ``true`` / ``false``) and ``uncertainty_idle_seconds`` (default 30: scoring starts after
    that long without a click)."""
    policy = RetrainPolicy.from_conf(app.conf)
    raw = app.conf.get("retrain_params") or "{}"
    try:
        params = json.loads(raw)
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ValueError(f"--conf retrain_params {raw!r} must be a JSON object of train parameters: {err}") from err
    refresh = str(app.conf.get("uncertainty_refresh", "auto")).strip().lower()
    if refresh == "auto":  # follow MONAI Label's switch for its own scoring after /activelearning and /train calls
        keep_scores = bool(settings.MONAI_LABEL_AUTO_UPDATE_SCORING)
    elif refresh in ("true", "1", "yes", "false", "0", "no"):
        keep_scores = refresh in ("true", "1", "yes")
    else:
        raise ValueError(f"--conf uncertainty_refresh must be auto, true or false, got {refresh!r}")
    idle = float(app.conf.get("uncertainty_idle_seconds", SCORING_IDLE_SECONDS))
    rescore = ("sam_uncertainty",) if keep_scores else ()
    return RetrainingScheduler(app, policy, model, params, rescore=rescore, scoring_idle_seconds=idle)
