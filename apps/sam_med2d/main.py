"""MONAI Label app serving SAM-Med2D for interactive segmentation (Slicer, OHIF, REST).

    monailabel start_server --app apps/sam_med2d --studies <dir> --host 127.0.0.1 [--conf key value ...]

Conf keys (all optional):

``model``         ``vit_b`` (default) or a path to a config JSON (a ``meta.json`` with a ``config`` entry works)
``checkpoint``    base weights, any layout :func:`lib.io.checkpoint.load_model` reads; default: ``sam-med2d_b.pth`` (or
                  the only weights file) in ``model_dir``, downloaded there when absent and ``download`` is true
``model_dir``     where the served and published weights live (default ``apps/sam_med2d/model``)
``keep_versions`` published versions kept (default 5; the serving version and the base are never removed)
``adapters``      ``true`` (SAM-Med2D) or ``false`` (SAM-Med2D*, adapters switched off)
``device``        ``cpu``, ``cuda``, ``cuda:1``...; default cuda when available
``preprocessing`` ``evaluation`` (default; as the weights were trained) or ``predictor`` (the published predictor);
                  training data and validation follow it (one decoding rule,
:class:`lib.serving.decoding.ServedDecoding`) ``download``      ``true`` (default) / ``false``; ``download_url``
overrides where from ``seed``          seed of the random weights served when there is no checkpoint (default 0)
``cache_mb``      embedding cache size (default 256; about 330 image views of ViT-B)
``image_memory_mb`` loaded images kept for further clicks, at most this many MB of pixels (default 1024; the image
                  being clicked is always kept; volumes are kept in unnamed files of the server's temporary folder,
                  mapped, so they take page cache rather than the server's own memory)
``decode_threads`` intra-op threads of the per-click decoder (default 1; 0: torch's default)
``backend``       ``torch`` (default) or ``onnxruntime``: the per-click prompt encoder + mask decoder run by ONNX
                  Runtime (CPU; exported from the served weights when they load; same decoding rule and logits)
``decoder_graphs`` ``true`` (default) / ``false``: with the torch backend, each click's prompt encoder and decoder
                  replay TorchScript graphs recorded per prompt kind (the same logits bit for bit, without the Python
                  between the operations; about 2 MB a kind; ``false``: the eager modules)
``encoder_precision`` ``fp32`` (default), ``int8`` (dynamic quantisation of the encoder's linear layers, CPU with VNNI)
                  or ``bf16`` (the encoder's product weights held in bf16, autocast): faster encoding, slightly
                  different masks (``make bench`` prints both)
``encode_threads`` intra-op threads of the image encoder (default 0: torch's default, all cores; on a machine
                  shared with training or other services, fewer threads avoid OpenMP threads spinning against them)
``train_checkpoint`` weights the ``sam_med2d`` training task starts from (default: the served model); training
                  requests cannot name files (see ``docs/security.md``)
``api_token_file`` a file holding the shared token every request must send as ``Authorization: Bearer <token>``
                  (or the environment variable ``SAM_MED2D_API_TOKEN``); default: no token, serve on 127.0.0.1 only
``cors_origins``  comma-separated origins (``https://viewer.example.org``) whose pages may call the server; default
                  none (the OHIF served here is same-origin)
``max_*``         request bounds: ``max_image_pixels``, ``max_volume_voxels``, ``max_upload_mb``, ``max_points``,
                  ``max_state_mb``, ``max_id_chars``, ``max_request_threads`` (defaults in ``lib/guard/limits.py``,
                  sized for real CT/MR/US/X-ray)
``retrain_*``     active-learning retraining triggers (``retrain_after_labels``, ``retrain_interval_minutes``,
                  ``retrain_cron``, ``retrain_params``...) and ``uncertainty_*`` settings of the ``sam_uncertainty``
                  next-sample strategy: see ``docs/active_learning.md``
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from fastapi import HTTPException, Request  # noqa: E402
from fastapi.exception_handlers import http_exception_handler  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.exception import (  # noqa: E402
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from apps.sam_med2d.activelearning import active_learning_scoring, active_learning_strategies  # noqa: E402
from apps.sam_med2d.local_datastore import SafeLocalDatastore  # noqa: E402
from apps.sam_med2d.monailabel_private import running_server_app, wrap_running_app  # noqa: E402
from apps.sam_med2d.ohif_viewer import serve_viewer  # noqa: E402
from apps.sam_med2d.retraining_scheduler import RetrainingScheduler, scheduler_from_conf  # noqa: E402
from infers.sam_med2d import SamMed2DInfer  # noqa: E402
from lib.common.memory import bound_onednn_kernel_caches, fix_mmap_threshold  # noqa: E402
from lib.common.settings import RequestError, SettingError, conf_flag  # noqa: E402
from lib.guard.asgi_threads import ThreadedPaths  # noqa: E402
from lib.guard.http import GuardPolicy, HttpGuard  # noqa: E402
from lib.guard.limits import Limits  # noqa: E402
from lib.guard.train_request import check_train_params  # noqa: E402
from lib.io.published_weights import (  # noqa: E402
    PUBLISHED_URL,
    DownloadError,
    download_published_weights,
    find_local_weights,
    how_to_fetch,
)
from lib.modeling.config import SamMed2DConfig, resolve_config  # noqa: E402
from lib.serving.decoding import ServedDecoding  # noqa: E402
from lib.serving.interactive import InteractiveSegmenter  # noqa: E402
from lib.serving.model_store import ModelStore, TrainingInProgressError  # noqa: E402
from lib.serving.preprocessing import POLICIES  # noqa: E402
from trainers.sam_med2d_train import SamMed2DTrain  # noqa: E402

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
EXTRA_EXTENSIONS = ["*.dcm"]  # single-frame DICOM images in a local datastore
# Endpoints quick enough for the event loop; every other request runs on a worker thread (MONAI Label's endpoints
# do their blocking work inside ``async`` functions, which would stall every user for as long as one request takes).
DIRECT_PATHS = ("/info", "/static/", "/favicon.ico")


def _resolve_path(value: str) -> Path:
    """A conf path: as given (relative to the working directory), else relative to the app folder."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path.resolve()
    beside_app = APP_DIR / value
    return beside_app.resolve() if beside_app.exists() else path.resolve()


async def _client_errors(request: Request, exc: Exception) -> Response:
    """Errors MONAI Label's endpoints let through as 500s although the request caused them: a form field that is not
    JSON (``params``, ``info``), an id that is not in the datastore, MONAI Label's own ``INVALID_INPUT``. Anything
    else stays a 500 with its traceback in the log."""
    if isinstance(exc, json.JSONDecodeError):
        return JSONResponse({"detail": f"a form field is not JSON: {exc}"}, status_code=400)
    if isinstance(exc, ImageNotFoundException | LabelNotFoundException):
        return JSONResponse({"detail": exc.msg}, status_code=404)
    if isinstance(exc, MONAILabelException) and exc.error == MONAILabelError.INVALID_INPUT:
        return JSONResponse({"detail": exc.msg}, status_code=400)
    raise exc


# What MONAI Label's endpoints answer with an explicit 500 for a request that lacks something (a client error).
_INPUT_500S = (
    "Neither Image nor File not Session ID input is provided",
    "DICOM SEG format is not supported in a non-DICOM datastore",
)


async def _input_500s_as_400(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 500 and exc.detail in _INPUT_500S:
        exc = StarletteHTTPException(400, exc.detail)
    return await http_exception_handler(request, exc)


def _sweep(folder: Path, max_age_s: float = 900.0, every_s: float = 60.0) -> None:
    """Remove request files older than ``max_age_s``: MONAI Label removes an upload after a successful answer only,
    so every refused upload would otherwise stay on disk for the server's lifetime."""
    while True:
        time.sleep(every_s)
        cutoff = time.time() - max_age_s
        for path in list(folder.iterdir()):
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _private_request_dir() -> Path:
    """A new temporary folder (mode 0700) for this server process's request files; those of servers no longer
    running are removed (uvicorn ends by re-raising SIGTERM, so a server cannot remove its own at exit)."""
    prefix = "sam_med2d_requests_"
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*_*"):
        pid = old.name.removeprefix(prefix).split("_")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}_")).resolve()


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
        self.limits = Limits.from_conf(self.conf)
        self.upload_dir: Path | None = None  # the server's private temporary folder (request uploads), once serving
        self.network_config: SamMed2DConfig = resolve_config(self.conf.get("model", "vit_b"))
        model_dir = _resolve_path(self.conf.get("model_dir", str(APP_DIR / "model")))
        self.download = conf_flag(self.conf, "download", True)
        self.checkpoint = self._checkpoint(model_dir)
        policy = self.conf.get("preprocessing", "evaluation")
        if policy not in POLICIES:
            raise ValueError(f"--conf preprocessing must be one of {POLICIES}, got {policy!r}")
        adapters = conf_flag(self.conf, "adapters", True)
        # How prompts become masks, for serving, the trainer's validation and gate, and uncertainty scoring.
        self.decoding = ServedDecoding(policy=policy, adapters=adapters)  # type: ignore[arg-type]
        self.model_store = ModelStore(
            model_dir,
            self.network_config,
            base_checkpoint=self.checkpoint,
            adapters=adapters,
            seed=int(self.conf.get("seed", 0)),
            keep_versions=int(self.conf.get("keep_versions", 5)),
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
            limits=self.limits,
            decoder_graphs=conf_flag(self.conf, "decoder_graphs", True),
        )
        self.weights_warning: str | None = None
        self._weights_info: tuple[tuple, dict[str, Any]] | None = None
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
        return SafeLocalDatastore(
            self.studies,
            extensions=extensions,
            limits=self.limits,
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
        return active_learning_scoring(
            self.conf, self.model_store, str(self.segmenter.device), self.decoding, lambda: self.segmenter
        )

    def init_trainers(self) -> dict[str, TrainTask]:
        """``sam_med2d``: adapter fine-tuning on the saved labels (``--conf train_recipe``: ``continual`` default;
        ``--conf train_checkpoint``: start from those weights instead of the served ones)."""
        start = self.conf.get("train_checkpoint")
        overrides = {"init": "checkpoint", "checkpoint": str(_resolve_path(start))} if start else None
        recipe_name = self.conf.get("train_recipe", "continual")
        return {
            "sam_med2d": SamMed2DTrain(self.model_store, self.decoding, recipe_name=recipe_name, overrides=overrides)
        }

    # ------------------------------------------------------------ server life
    def on_init_complete(self) -> None:
        """Server start: guard the HTTP server, fetch the published weights if needed, then load the model so the
        first click only encodes."""
        # MONAI Label starts scoring every unlabeled image here, competing with the first clicks; the retraining
        # scheduler scores once no click came for a while (see async_scoring).
        auto_scoring, self._auto_update_scoring = self._auto_update_scoring, False
        super().on_init_complete()
        self._auto_update_scoring = auto_scoring
        self._guard_http_server()
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
        # The server's process only (not the training subprocess): an encode's freed activations go back to the
        # system instead of staying resident (lib.common.memory.fix_mmap_threshold), and the compiled kernels of
        # the clicks' many product shapes are bounded, before the warm-up runs the first product.
        fix_mmap_threshold()
        bound_onednn_kernel_caches()
        self.segmenter.warm_up()
        mismatch = store.published_mismatch()
        if mismatch:
            banner = "!" * 100
            logger.warning(
                "\n%s\nNOT SERVING THE PUBLISHED MODEL in %s: %s. Serving %s instead; the next promoted run "
                "publishes a version for this configuration (or start with the config and checkpoint it was "
                "trained from).\n%s",
                banner,
                store.model_dir,
                mismatch,
                store.active_version(),
                banner,
            )
        self._start_retraining()
        logger.info("SAM-Med2D ready: %s", self.weights_info())

    def _guard_http_server(self) -> None:
        """Put :class:`lib.guard.http.HttpGuard` in front of every endpoint of the running MONAI Label server, and
        :class:`lib.guard.asgi_threads.ThreadedPaths` behind it (``--conf max_request_threads`` requests at once).

        Only in the server process (MONAI Label's FastAPI app is loaded there; training and scoring subprocesses
        build this app without it). Request uploads then go to a private temporary folder, the one place outside the
        datastore an ``image`` path may point to.
        """
        app = running_server_app()
        if app is None:
            return
        token = os.environ.get("SAM_MED2D_API_TOKEN", "")
        if self.conf.get("api_token_file"):
            token = _resolve_path(self.conf["api_token_file"]).read_text().strip()
            if not token:
                raise ValueError(f"--conf api_token_file {self.conf['api_token_file']}: the file is empty")
        origins = [o.strip().rstrip("/") for o in self.conf.get("cors_origins", "").split(",") if o.strip()]
        origins += [str(o).rstrip("/") for o in settings.MONAI_LABEL_CORS_ORIGINS]
        policy = GuardPolicy(
            token=token,
            origins=tuple(origins),
            max_body_bytes=self.limits.upload_bytes,
            health={"name": self.name, "version": self.version, "status": "ok", "authentication": "bearer token"},
            body_checks={"/train": self._check_train_request},
        )
        for error in (json.JSONDecodeError, MONAILabelException):
            app.add_exception_handler(error, _client_errors)
        app.add_exception_handler(StarletteHTTPException, _input_500s_as_400)
        serve_viewer(app)  # at /ohif/, in place of MONAI Label's OHIF, when built
        # MONAI Label's infer endpoint logs every request whole at INFO (to the console and its log file): clicks
        # log at WARNING, as the infer task's stages do (SamMed2DInfer.__call__).
        logging.getLogger("monailabel.endpoints.infer").setLevel(logging.WARNING)
        threads = self.limits.request_threads
        wrap_running_app(app, lambda stack: HttpGuard(ThreadedPaths(stack, DIRECT_PATHS, threads), policy))
        self.upload_dir = _private_request_dir()
        tempfile.tempdir = str(self.upload_dir)  # MONAI Label's endpoints write uploads with tempfile's defaults
        threading.Thread(target=_sweep, args=(self.upload_dir,), name="request-files", daemon=True).start()
        logger.info(
            "HTTP guard: token %s, cross-origin callers %s, bodies up to %g MB",
            "required" if token else "not required",
            origins or "none",
            self.limits.upload_mb,
        )

    def _check_train_request(self, path: str, params: Any) -> None:
        """``POST /train/<model>`` (params of that task) or ``POST /train/`` (``{model: params}``)."""
        model = path.removeprefix("/train").strip("/")
        if model:
            if model in self._trainers:
                check_train_params(params, self._trainers[model].config())
            return
        for name, task_params in (params or {}).items() if isinstance(params, dict) else [("", params)]:
            if name not in self._trainers:
                raise RequestError(f"POST /train/ takes {{model: params}}; {name!r} is not a training task", 422)
            check_train_params(task_params, self._trainers[name].config())

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
        """What serves (``/info`` and every click's result), described again only when it changed: MONAI Label asks
        for the whole ``/info`` on every click (three times this) besides the click's own result."""
        store = self.model_store
        key = (store.version_key(), store.current_version(), self.segmenter.last_load_error, self.weights_warning)
        if self._weights_info is None or self._weights_info[0] != key:
            self._weights_info = (key, self._describe_weights())
        return dict(self._weights_info[1])

    def _describe_weights(self) -> dict[str, Any]:
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
            info["published_not_served"] = f"{mismatch}; serving {store.active_version()}"
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

    def async_scoring(self, method: str | None, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """MONAI Label queues the scoring methods after every ``/activelearning`` and ``/train`` call, each run in a
        subprocess with its own copy of the weights. With the retraining scheduler keeping the scores current, it
        scores instead: in this process with the served model, once no click came for a while. ``POST /scoring``
        still runs MONAI Label's task."""
        scheduler = self.retraining
        if scheduler is not None and scheduler.rescore and (method is None or method in scheduler.rescore):
            scheduler.score_soon()
            return {}
        return super().async_scoring(method, params)

    # ---------------------------------------------------------------- errors
    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAILabelApp.train, with a second concurrent run (``run_sync`` beside another run) answered 409."""
        try:
            return super().train(request)
        except TrainingInProgressError as exc:
            raise HTTPException(409, str(exc)) from exc

    def _inside_server_folders(self, path: str, store: Datastore) -> bool:
        """Whether ``path`` (symbolic links resolved) is in the datastore, a session or this server's uploads."""
        real = Path(os.path.realpath(path))
        roots = [getattr(store, "root", None), self.upload_dir]
        if self.sessions() is not None:
            roots.append(Path(self.sessions().store_path).resolve())
        return any(root is not None and real.is_relative_to(root) for root in roots)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAILabelApp.infer, with bad requests answered 4xx (the endpoint turns HTTPException into its status)."""
        model = request.get("model")
        if model and model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; available: {sorted(self._infers)}")
        image = request.get("image")
        if isinstance(image, str):
            store = datastore if datastore else self.datastore()
            if os.path.exists(image):
                if not self._inside_server_folders(image, store):
                    raise HTTPException(
                        403, "image paths must be inside the datastore; send the image's id or upload the file"
                    )
            elif not store.get_image_uri(image):
                raise HTTPException(404, f"unknown image {image[:200]!r}: not in the datastore")
        try:
            return super().infer(request, datastore)
        except SettingError as exc:  # a RequestError carries its own 4xx
            raise HTTPException(getattr(exc, "status", 400), str(exc)) from exc
        except MONAILabelException as exc:
            if exc.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(400, exc.msg) from exc
            raise
