"""Which image to label next: the SAM-Med2D uncertainty scoring task and strategy (plus MONAI Label's ``random`` and
``first``), part of the active-learning loop.

* :class:`SamUncertaintyScoring` (``/scoring/sam_uncertainty``) scores every unlabeled image with the served model
  (:class:`lib.loop.uncertainty.UncertaintyScorer`), in MONAI Label's background scoring process, and keeps the scores
  in ``<model dir>/uncertainty_scores.json`` with its progress. An image already scored with the same model version and
  content is skipped, so a rerun after new labels costs nothing and a rerun after a promotion rescores everything.
  Volumes are scored on their middle slice.
* :class:`SamUncertaintyStrategy` (``/activelearning/sam_uncertainty``) returns the unlabeled image the served model
  is least sure about. Images handed out in the last ``hold_seconds`` come last (two annotators get different images).
  Scores of an older model version are used only when none of the current one exist yet; with no score at all it
  falls back to the first unlabeled image and says so in the answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.common.memory import release_freed_memory
from lib.common.settings import conf_flag, dataclass_from_conf
from lib.io.image_source import ImageReadError, fingerprint, read_scored_view
from lib.loop.uncertainty import UncertaintyConfig, UncertaintyScorer, UncertaintyScores
from lib.modeling import SamMed2D
from lib.serving.decoding import ServedDecoding
from lib.serving.interactive import InteractiveSegmenter, torch_threads
from lib.serving.model_store import ModelStore

logger = logging.getLogger(__name__)

NAME = "sam_uncertainty"
SCORES_FILE = "uncertainty_scores.json"
BACKGROUND_NICE = 10


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SamUncertaintyScoring(ScoringMethod):
    """Scores the unlabeled images of the datastore with the served model.

    Args:
        model_store: the served weights.
        config: scoring settings (prompts, method, seed).
        device: where the model runs.
        decoding: the server's decoding rule (the one inference uses).
        threads: torch CPU threads of the scoring process (few, so inference keeps its cores).
        score_remote: also score a DICOMweb (PACS) datastore; off by default because scoring reads every unlabeled
            series, which on a PACS means downloading all of them.
        served: returns the server's :class:`InteractiveSegmenter`. A ``background`` request (the retraining
            scheduler's, on a thread of the server process) then scores with the served model itself, one image at a
            time under :meth:`InteractiveSegmenter.served_model`, at a lower priority, instead of loading a second
            copy of the weights; other requests (``POST /scoring``, run by MONAI Label in a subprocess) load the model.
    """

    def __init__(
        self,
        model_store: ModelStore,
        config: UncertaintyConfig | None = None,
        device: str = "cpu",
        decoding: ServedDecoding | None = None,
        threads: int = 1,
        score_remote: bool = False,
        served: Callable[[], InteractiveSegmenter] | None = None,
    ) -> None:
        super().__init__("SAM-Med2D uncertainty of unlabeled images (disagreement of perturbed prompts, predicted IoU)")
        self.model_store = model_store
        self.config = config or UncertaintyConfig()
        self.device = device
        self.decoding = decoding or ServedDecoding()
        self.threads = threads
        self.score_remote = score_remote
        self.served = served
        self.scores = UncertaintyScores(model_store.model_dir / SCORES_FILE)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": dict(vars(self.config)), "progress": self.scores.progress()}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if self.model_store.serving_path() is None:
            logger.warning(
                "Uncertainty scoring skipped: no trained weights serve (scores of random weights mean nothing)"
            )
            return {"model_version": self.model_store.active_version(), "scored": 0, "skipped": "no trained weights"}
        if isinstance(datastore, DICOMWebDatastore) and not self.score_remote:
            logger.warning(
                "Uncertainty scoring skipped on a DICOMweb datastore: it would download every unlabeled series "
                "(--conf uncertainty_on_pacs true to score anyway)"
            )
            return {"model_version": self.model_store.active_version(), "scored": 0, "skipped": "DICOMweb datastore"}
        in_server = bool(request.get("background")) and self.served is not None
        if request.get("background") and hasattr(os, "nice") and os.nice(0) < BACKGROUND_NICE:
            # this thread (Linux: nice is per thread) and the threads it starts yield the cores to clicks
            os.nice(BACKGROUND_NICE - os.nice(0))
        # Fewer threads, in the server's scoring thread as in a scoring process: a core stays free for clicks, and a
        # small OpenMP team keeps few per-thread buffers (53 MB less resident in the server with one thread than two).
        threads = self.threads if self.device == "cpu" and self.threads > 0 else None
        version = self.model_store.active_version()
        version_key = self.model_store.version_key()
        images = sorted(datastore.get_unlabeled_images())
        data = self.scores.load()
        todo = []
        for image_id in images:
            entry = data["scores"].get(image_id)
            if not (
                entry
                and entry.get("model_key") == version_key
                and entry.get("content") == _content(datastore, image_id)
            ):
                todo.append(image_id)
        data["progress"] = {
            "model_version": version,
            "done": len(images) - len(todo),
            "total": len(images),
            "started_at": _now_iso(),
            "finished_at": None,
        }
        self.scores.save(data)
        logger.info(
            f"Uncertainty scoring with model {version}: {len(todo)} of {len(images)} unlabeled images need a score"
        )
        if not todo:
            data["progress"]["finished_at"] = _now_iso()
            self.scores.save(data)
            return {"model_version": version, "scored": 0, "total": len(images)}

        loaded = None if in_server else self.model_store.load(self.device)

        def model_for_one_image() -> contextlib.AbstractContextManager[SamMed2D]:
            return self.served().served_model() if in_server else contextlib.nullcontext(loaded)  # type: ignore[misc]

        start = last_save = time.perf_counter()
        failed = 0
        for count, image_id in enumerate(todo, 1):
            if in_server and self.model_store.version_key() != version_key:
                logger.info("Uncertainty scoring stopped: the served weights changed; the scheduler scores again")
                break
            path = datastore.get_image_uri(image_id)
            try:
                view, content = read_scored_view(path)
                with model_for_one_image() as model, torch_threads(threads):
                    result = UncertaintyScorer(model, self.config, self.decoding).score(view)
                data["scores"][image_id] = {
                    **result.to_dict(),
                    "model_version": version,
                    "model_key": version_key,
                    "content": content,
                    "ts": int(time.time()),
                }
            except ImageReadError as exc:
                failed += 1
                # kept with the model key so it is not retried until the model or the file changes
                data["scores"][image_id] = {
                    "error": str(exc),
                    "model_key": version_key,
                    "content": _content(datastore, image_id),
                }
                logger.warning(f"Uncertainty scoring: {image_id} skipped: {exc}")
            data["progress"]["done"] = len(images) - len(todo) + count
            if time.perf_counter() - last_save >= 1.0:  # progress at most once a second: the file holds every score
                self.scores.save(data)
                last_save = time.perf_counter()
            logger.info(
                f"Uncertainty scoring: {count}/{len(todo)} {image_id} -> "
                f"{data['scores'].get(image_id, {}).get('score', float('nan')):.4f} "
                f"({(time.perf_counter() - start) / count:.2f} s/image)"
            )
        data["progress"]["finished_at"] = _now_iso()
        self.scores.save(data)
        if in_server:
            release_freed_memory()  # the images read and the encoder's work space, freed on this thread's heap
        return {"model_version": version, "scored": len(todo) - failed, "failed": failed, "total": len(images)}


def _content(datastore: Datastore, image_id: str) -> str | None:
    path = datastore.get_image_uri(image_id)
    return fingerprint(path) if path else None


class SamUncertaintyStrategy(Strategy):
    """Next sample: the unlabeled image with the highest uncertainty score under the served model.

    Args:
        model_store: the served weights (whose version the scores must match).
        hold_seconds: an image handed out more recently than this comes after all others.
    """

    def __init__(self, model_store: ModelStore, hold_seconds: float = 300.0) -> None:
        super().__init__("The unlabeled image SAM-Med2D is least sure about (run /scoring/sam_uncertainty first)")
        self.model_store = model_store
        self.hold_seconds = hold_seconds
        self.scores = UncertaintyScores(model_store.model_dir / SCORES_FILE)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", NAME)
        key = self.model_store.version_key()
        data = self.scores.load()
        scores = data["scores"]
        scored = {i: scores[i] for i in images if "score" in scores.get(i, {})}
        current = {i: e for i, e in scored.items() if e.get("model_key") == key}
        stale = {i: e for i, e in scored.items() if i not in current}
        pool, freshness = (current, "current") if current else (stale, "stale") if stale else ({}, "none")
        now = time.time()

        def recently_served(image_id: str) -> bool:
            served = datastore.get_image_info(image_id).get("strategy", {}).get(strategy, {}).get("ts", 0)
            return now - served < self.hold_seconds

        if not pool:
            image = sorted(images)[0]
            logger.info(f"{NAME}: no uncertainty scores yet; first unlabeled image {image}")
            return {"id": image, "score_source": "none (no scores yet; run /scoring/sam_uncertainty)"}
        ranked = sorted(pool, key=lambda i: (recently_served(i), -float(pool[i]["score"]), i))
        image = ranked[0]
        entry = pool[image]
        logger.info(
            f"{NAME}: {image} (score {entry['score']:.4f}, model {entry.get('model_version')}, {freshness} scores, "
            f"{len(pool)} scored of {len(images)} unlabeled)"
        )
        return {
            "id": image,
            NAME: float(entry["score"]),
            "disagreement": entry.get("disagreement"),
            "predicted_iou": entry.get("predicted_iou"),
            "scored_with": entry.get("model_version"),
            "score_source": freshness,
            "scored_images": len(pool),
            "unlabeled_images": len(images),
        }


def uncertainty_config_from_conf(conf: Mapping[str, Any]) -> UncertaintyConfig:
    """``uncertainty_num_prompts``, ``uncertainty_box_shift``, ``uncertainty_method``, ``uncertainty_seed`` from
    ``--conf`` (a bad value raises a ValueError naming the key)."""
    return dataclass_from_conf(UncertaintyConfig, conf, "uncertainty_")


def active_learning_strategies(conf: Mapping[str, Any], model_store: ModelStore) -> dict[str, Strategy]:
    """The app's ``/activelearning`` strategies: ``sam_uncertainty``, ``random`` and ``first``."""
    hold = float(conf.get("uncertainty_hold_seconds", 300))
    return {NAME: SamUncertaintyStrategy(model_store, hold_seconds=hold), "random": Random(), "first": First()}


def active_learning_scoring(
    conf: Mapping[str, Any],
    model_store: ModelStore,
    device: str,
    decoding: ServedDecoding,
    served: Callable[[], InteractiveSegmenter] | None = None,
) -> dict[str, ScoringMethod]:
    """The app's ``/scoring`` methods: ``sam_uncertainty``."""
    threads = int(conf.get("uncertainty_threads", 1))
    config = uncertainty_config_from_conf(conf)
    score_remote = conf_flag(conf, "uncertainty_on_pacs", False)
    scoring = SamUncertaintyScoring(
        model_store,
        config,
        device=device,
        decoding=decoding,
        threads=threads,
        score_remote=score_remote,
        served=served,
    )
    return {NAME: scoring}


def scores_missing(model_store: ModelStore, datastore: Datastore) -> int:
    """How many unlabeled images have no score from the serving model (content changes are the scoring task's to
    find; this check only reads the scores file)."""
    if model_store.serving_path() is None:
        return 0  # untrained weights: nothing worth scoring (SamUncertaintyScoring skips them too)
    key = model_store.version_key()
    scores = UncertaintyScores(model_store.model_dir / SCORES_FILE).load()["scores"]
    return sum(1 for i in datastore.get_unlabeled_images() if scores.get(i, {}).get("model_key") != key)
