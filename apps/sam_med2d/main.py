"""MONAI Label app serving SAM-Med2D for interactive segmentation (Slicer, OHIF, REST).

    monailabel start_server --app apps/sam_med2d --studies <dir> [--conf key value ...]

Conf keys (all optional):

``model``         ``vit_b`` (default) or a path to a config JSON (a ``meta.json`` with a ``config`` entry works)
``checkpoint``    base weights, any layout :func:`lib.checkpoint.load_model` reads; default: ``sam-med2d_b.pth`` (or the
                  only weights file) in ``model_dir``, downloaded there when absent and ``download`` is true
``model_dir``     where the served and published weights live (default ``apps/sam_med2d/model``)
``adapters``      ``true`` (SAM-Med2D) or ``false`` (SAM-Med2D*, adapters switched off)
``device``        ``cpu``, ``cuda``, ``cuda:1``...; default cuda when available
``preprocessing`` ``evaluation`` (default; as the weights were trained) or ``predictor`` (the published predictor);
                  training data and validation follow it (one decoding rule, :class:`lib.decoding.ServedDecoding`)
``download``      ``true`` (default) / ``false``; ``download_url`` overrides where from
``seed``          seed of the random weights served when there is no checkpoint (default 0)
``cache_mb``      embedding cache size (default 256; about 330 image views of ViT-B)
``image_memory_mb`` loaded images kept in memory for further clicks, at most this many MB of pixels (default 1024;
                  the image being clicked is always kept)
``decode_threads`` intra-op threads of the per-click decoder (default 1; 0: torch's default)
``backend``       ``torch`` (default) or ``onnxruntime``: the per-click prompt encoder + mask decoder run by ONNX
                  Runtime (CPU; exported from the served weights when they load; same decoding rule and logits)
``encoder_precision`` ``fp32`` (default), ``int8`` (dynamic quantisation of the encoder's linear layers, CPU with VNNI)
                  or ``bf16`` (autocast): faster encoding, slightly different masks (``make bench`` prints both)
``encode_threads`` intra-op threads of the image encoder (default 0: torch's default, all cores; on a machine
                  shared with training or other services, fewer threads avoid OpenMP threads spinning against them)
``retrain_*``     active-learning retraining triggers (``retrain_after_labels``, ``retrain_interval_minutes``,
                  ``retrain_cron``, ``retrain_params``...) and ``uncertainty_*`` settings of the ``sam_uncertainty``
                  next-sample strategy: see ``docs/active_learning.md``
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402

from infers.sam_med2d import SamMed2DInfer  # noqa: E402
from lib.config import SamMed2DConfig, resolve_config  # noqa: E402
from lib.curation import CurationError, check_label  # noqa: E402
from lib.decoding import ServedDecoding  # noqa: E402
from lib.interactive import InteractiveSegmenter  # noqa: E402
from lib.model_store import ModelStore  # noqa: E402
from lib.preprocessing import POLICIES  # noqa: E402
from lib.prompt_inputs import InvalidRequestError  # noqa: E402
from lib.published_weights import (  # noqa: E402
    PUBLISHED_URL,
    DownloadError,
    download_published_weights,
    find_local_weights,
    how_to_fetch,
)
from trainers.active_learning import active_learning_scoring, active_learning_strategies  # noqa: E402
from trainers.retraining import RetrainingScheduler, scheduler_from_conf  # noqa: E402
from trainers.sam_med2d_train import SamMed2DTrain  # noqa: E402

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
EXTRA_EXTENSIONS = ["*.dcm"]  # single-frame DICOM images in a local datastore


def _flag(conf: dict[str, str], key: str, default: bool) -> bool:
    value = conf.get(key)
    return default if value is None else bool(strtobool(str(value)))


def _resolve_path(value: str) -> Path:
    """A conf path: as given (relative to the working directory), else relative to the app folder."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path.resolve()
    beside_app = APP_DIR / value
    return beside_app.resolve() if beside_app.exists() else path.resolve()


class CheckedLocalDatastore(LocalDatastore):
    """The local datastore, refusing at save time (422) a label that training could not pair with its image pixel
    for pixel (:func:`lib.curation.check_label`): the annotator learns it now, not from a run that skips it."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_uri = self.get_image_uri(image_id)
        if image_uri:  # an unknown image is the parent's 404
            try:
                check_label(image_uri, label_filename, image_id)
            except CurationError as exc:
                raise HTTPException(422, f"label not saved: {exc}") from exc
        return super().save_label(image_id, label_filename, label_tag, label_info)


class SamMed2DApp(MONAILabelApp):
    """SAM-Med2D interactive segmentation: ``sam_med2d_points`` and ``sam_med2d_box`` (2D images and volume slices).

    Attributes:
        conf: the ``--conf`` values.
        network_config: the :class:`SamMed2DConfig` served.
        model_store: the :class:`ModelStore` of the served weights (trainers publish through it).
        segmenter: the :class:`InteractiveSegmenter` shared by the infer tasks.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.conf = dict(conf or {})
        self.network_config: SamMed2DConfig = resolve_config(self.conf.get("model", "vit_b"))
        model_dir = _resolve_path(self.conf.get("model_dir", str(APP_DIR / "model")))
        self.download = _flag(self.conf, "download", True)
        self.checkpoint = self._checkpoint(model_dir)
        policy = self.conf.get("preprocessing", "evaluation")
        if policy not in POLICIES:
            raise ValueError(f"--conf preprocessing must be one of {POLICIES}, got {policy!r}")
        adapters = _flag(self.conf, "adapters", True)
        # How prompts become masks, for serving, the trainer's validation and gate, and uncertainty scoring.
        self.decoding = ServedDecoding(policy=policy, adapters=adapters)  # type: ignore[arg-type]
        self.model_store = ModelStore(
            model_dir,
            self.network_config,
            base_checkpoint=self.checkpoint,
            adapters=adapters,
            seed=int(self.conf.get("seed", 0)),
        )
        device = self.conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.segmenter = InteractiveSegmenter(
            self.model_store,
            device=device,
            decoding=self.decoding,
            cache_bytes=int(float(self.conf.get("cache_mb", 256)) * 2**20),
            max_source_bytes=int(float(self.conf.get("image_memory_mb", 1024)) * 2**20),
            decode_threads=int(self.conf.get("decode_threads", 1)) or None,
            encode_threads=int(self.conf.get("encode_threads", 0)) or None,
            backend=self.conf.get("backend", "torch"),
            encoder_precision=self.conf.get("encoder_precision", "fp32"),
        )
        self.weights_warning: str | None = None
        self.retraining: RetrainingScheduler | None = None  # started in on_init_complete (server process only)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=self.conf,
            name="SAM-Med2D",
            description="Interactive segmentation with SAM-Med2D (points, boxes, previous mask) on 2D images and "
            "slices of 3D volumes",
            version="1.0",
        )

    def _checkpoint(self, model_dir: Path) -> Path | None:
        value = self.conf.get("checkpoint")
        if value:
            path = _resolve_path(value)
            if not path.is_file():
                raise FileNotFoundError(f"--conf checkpoint {value}: no such file ({path})")
            return path
        return find_local_weights(model_dir)

    # ------------------------------------------------------------------ tasks
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        extensions += [e for e in EXTRA_EXTENSIONS if e not in extensions]
        return CheckedLocalDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_remote_datastore(self) -> Datastore:
        """DICOMweb: the app's datastore (CT/MR/US listing, DICOM SEG labels; see dicomweb.py); XNAT/DSA as is."""
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        from apps.sam_med2d.dicomweb import init_dicomweb_datastore

        return init_dicomweb_datastore(self.studies, self.conf)

    def init_infers(self) -> dict[str, InferTask]:
        return {
            "sam_med2d_points": SamMed2DInfer(lambda: self.segmenter, "points", info_extra=self.weights_info),
            "sam_med2d_box": SamMed2DInfer(lambda: self.segmenter, "box", info_extra=self.weights_info),
        }

    def init_strategies(self) -> dict[str, Any]:
        return active_learning_strategies(self.conf, self.model_store)

    def init_scoring_methods(self) -> dict[str, Any]:
        return active_learning_scoring(self.conf, self.model_store, str(self.segmenter.device), self.decoding)

    def init_trainers(self) -> dict[str, TrainTask]:
        """``sam_med2d``: adapter fine-tuning on the saved labels (``--conf train_recipe``: ``continual`` default)."""
        recipe_name = self.conf.get("train_recipe", "continual")
        return {"sam_med2d": SamMed2DTrain(self.model_store, self.decoding, recipe_name=recipe_name)}

    # ------------------------------------------------------------ server life
    def on_init_complete(self) -> None:
        """Server start: fetch the published weights if needed, then load the model so the first click only encodes."""
        # MONAI Label starts scoring every unlabeled image here, in a second process with its own copy of the weights,
        # competing with the first clicks; the retraining scheduler starts it once no click came for a while.
        auto_scoring, self._auto_update_scoring = self._auto_update_scoring, False
        super().on_init_complete()
        self._auto_update_scoring = auto_scoring
        store = self.model_store
        if store.serving_path() is None and self.download and not self.conf.get("checkpoint"):
            try:
                url = self.conf.get("download_url", PUBLISHED_URL)
                store.base_checkpoint = download_published_weights(
                    store.model_dir, url=url, verify_config=self.network_config
                )
                self.checkpoint = store.base_checkpoint
            except DownloadError as exc:
                logger.error("Could not download the published SAM-Med2D weights: %s", exc)
        if store.serving_path() is None:
            self.weights_warning = (
                f"PREDICTIONS COME FROM UNTRAINED (random, seed {store.seed}) WEIGHTS: no SAM-Med2D checkpoint was "
                f"found in {store.model_dir}. To fix: {how_to_fetch(store.model_dir)}."
            )
            banner = "!" * 100
            logger.warning("\n%s\n%s\n%s", banner, self.weights_warning, banner)
        self.segmenter.warm_up()
        mismatch = store.published_mismatch()
        if mismatch:
            banner = "!" * 100
            logger.warning(
                "\n%s\nNOT SERVING THE PUBLISHED MODEL in %s: %s. Serving the base weights instead; the next promoted "
                "run publishes a version for this configuration (or start with the config and checkpoint it was "
                "trained from).\n%s",
                banner,
                store.model_dir,
                mismatch,
                banner,
            )
        self._start_retraining()
        logger.info("SAM-Med2D ready: %s", self.weights_info())

    def _start_retraining(self) -> None:
        """Start the active-learning scheduler: retrains on accrued labels per ``--conf retrain_*``."""
        scheduler = scheduler_from_conf(self, "sam_med2d")
        if "sam_med2d" not in self._trainers:
            if scheduler.policy.enabled:
                logger.warning("Retraining triggers are set but the sam_med2d train task is not available; ignored")
            return
        self.retraining = scheduler
        scheduler.start()

    def weights_info(self) -> dict[str, Any]:
        store = self.model_store
        serving = store.serving_path()
        info: dict[str, Any] = {
            "model_version": store.active_version(),
            "weights": str(serving) if serving else None,
            "trained_weights": serving is not None,
            "model": self.conf.get("model", "vit_b"),
            "adapters": store.adapters,
            "preprocessing": self.decoding.policy,
            "decoding": {**self.decoding.to_dict(), "rule": self.decoding.describe()},
        }
        mismatch = store.published_mismatch()
        if mismatch:
            info["published_not_served"] = f"{mismatch}; serving the base weights"
        if serving is None and self.weights_warning:
            info["warning"] = self.weights_warning
        if self.segmenter.last_load_error:
            info["load_error"] = self.segmenter.last_load_error
        return info

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["sam_med2d"] = {**self.weights_info(), **self.segmenter.stats()}
        if self.retraining is not None:
            meta["retraining"] = self.retraining.info()
        return meta

    # ---------------------------------------------------------------- errors
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAILabelApp.infer, with bad requests answered 4xx (the endpoint turns HTTPException into its status)."""
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; available: {sorted(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore if datastore else self.datastore()
            if not store.get_image_uri(image):
                raise HTTPException(404, f"unknown image {image!r}: not in the datastore and not a file on the server")
        try:
            return super().infer(request, datastore)
        except InvalidRequestError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        except MONAILabelException as exc:
            if exc.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(400, exc.msg) from exc
            raise
