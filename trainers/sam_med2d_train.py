"""The SAM-Med2D train task: continue adapter fine-tuning on the labels annotators save.

A MONAI Label :class:`BasicTrainTask` whose ignite iteration is the paper's simulated annotator
(:class:`lib.training.iteration.SimulatedAnnotator`: first prompt box or point, then 8 decoder-only steps with
error-region clicks). One run:

1. curates the datastore's final labels like the paper (:mod:`lib.training.curation`: volumes cut into slices, one mask
   per class and connected component, small masks dropped) into the run's cache folder, and splits them by image into
   training and held-out validation labels (``val_split``);
2. starts from the served model (:class:`lib.serving.model_store.ModelStore`) or, for the paper's recipe, a checkpoint;
3. validates the model that serves now, the starting weights (when they differ) and every epoch's weights on the
   held-out labels, decoded exactly as the server decodes (:class:`lib.serving.decoding.ServedDecoding` and
   :func:`lib.serving.decoding.decode_view`, the function a click runs; :mod:`lib.training.evaluation`: box, then 1, 3,
   5 clicks of the deterministic interior-point annotator with the previous mask), writes everything to
``train_stats.json``; 4. at the very end, publishes the best epoch through ``ModelStore.publish`` (a plain state dict,
   written atomically, kept with its metrics) only if its mean validation Dice is not lower than that of the model
   serving at that moment (re-validated when another version started serving during the run, e.g. after a rollback).
   A run that fails or is stopped publishes nothing, so the served model stays as it was.

Request / config keys (all optional; values may be strings): ``recipe`` (``continual`` or ``sam_med2d_paper``),
``max_epochs``, ``train_batch_size`` (images per process), ``val_split``, ``lr``, ``masks_per_image``,
``decoder_iterations``, ``seed``, ``val_max_images``, ``loss_reduction``, ``multi_gpu`` and ``gpus`` (``"0,1"``; on
a machine without CUDA the processes run on CPU with the gloo backend), and any other :class:`RecipeConfig` field.
Run folders live in ``<model_dir>/train/<name>`` (``best.pt`` there is a plain state dict; nothing in it is served).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from apps.sam_med2d.monailabel_private import TrainTaskHooks
from lib.common.atomic_files import write_json_atomic
from lib.common.settings import parse_bool
from lib.io.checkpoint import load_model, read_state_dict
from lib.serving.decoding import ServedDecoding
from lib.serving.model_store import ModelStore
from lib.training.curation import CurationError, iter_curated, split_cases, stem, write_slices
from lib.training.data import SamMed2DDataset, read_image, read_mask
from lib.training.distributed import broadcast_parameters, finish_together
from lib.training.evaluation import EvalSample, evaluate_model
from lib.training.iteration import SimulatedAnnotator
from lib.training.loop import BestEpoch, EpochLoop, iteration_update, make_train_loader
from lib.training.losses import FocalDiceIoULoss
from lib.training.recipe import RECIPES, RecipeConfig, configure_cpu_math, make_optimizer, make_scheduler, recipe

logger = logging.getLogger(__name__)

# Request keys that map onto recipe fields under another name (MONAI Label's usual names).
_RENAMED = {"max_epochs": "epochs", "train_batch_size": "batch_size"}
_ROLLBACK_WINS = "the served model changed during the run (a rollback to {}): the rollback stands, nothing published"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) and value else value


class SamMed2DTrain(TrainTaskHooks, BasicTrainTask):
    """Fine-tune the served SAM-Med2D on the saved labels with the paper's interactive recipe.

    Args:
        model_store: the served weights (the run starts from them and publishes through them).
        decoding: the server's decoding rule: training data is prepared with its preprocessing, validation decodes
            with it (the app passes the one its infer tasks use).
        recipe_name: default recipe (``continual``); a request may pick another.
        overrides: default recipe overrides (e.g. from the app's ``--conf``).
        description: shown in ``/info``.
    """

    def __init__(
        self,
        model_store: ModelStore,
        decoding: ServedDecoding | None = None,
        recipe_name: str = "continual",
        overrides: dict[str, Any] | None = None,
        description: str = "Adapter fine-tuning of SAM-Med2D on saved labels (the paper's simulated-annotator recipe)",
    ) -> None:
        self.model_store = model_store
        self.decoding = decoding or ServedDecoding()
        self.skipped_labels: list[dict[str, str]] = []  # {"image", "label", "reason"} of the run being prepared
        self.recipe_name = recipe_name
        self.default_recipe = recipe(recipe_name, overrides)
        runs_dir = Path(model_store.model_dir) / "train"
        r = self.default_recipe
        config = {
            "recipe": [recipe_name] + [n for n in RECIPES if n != recipe_name],
            "max_epochs": r.epochs,
            "train_batch_size": r.batch_size,
            "val_split": r.val_split,
            "lr": r.lr,
            "masks_per_image": r.masks_per_image,
            "decoder_iterations": r.decoder_iterations,
            "seed": r.seed,
            "val_max_images": r.val_max_images,
            "multi_gpu": False,
            "gpus": "all",
            "dataset": ["Dataset"],
            "dataloader": ["DataLoader"],
            "tracking": ["None"],
        }
        super().__init__(
            model_dir=str(runs_dir),
            description=description,
            config=config,
            amp=False,  # the iteration runs its own bf16 autocast on CUDA
            load_path=None,
            publish_path=None,
            stats_path=str(runs_dir / "train_stats.json"),
            n_saved=1,
            tracking=None,
        )

    # ------------------------------------------------------------------ request -> recipe
    def recipe_for(self, request: dict[str, Any]) -> RecipeConfig:
        """The recipe a request asks for: its ``recipe`` plus the keys it sets explicitly."""
        name = str(_first(request.get("recipe", self.recipe_name)))
        explicit = set(request.get("_explicit", request.keys()))
        fields = set(RecipeConfig.__dataclass_fields__)
        overrides = {}
        for key in explicit:
            target = _RENAMED.get(key, key)
            if target in fields and target != "name" and key in request:
                overrides[target] = _first(request[key]) if not isinstance(request[key], list | tuple) else request[key]
        base = self.default_recipe if name == self.recipe_name else recipe(name)
        return base.with_overrides(overrides)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        request = dict(request)
        request["_explicit"] = sorted(request)
        if not torch.cuda.is_available():
            configure_cpu_math()  # before the first parallel op: threads created later inherit the setting
        self.recipe_for(request)  # reject unknown recipes and bad values before anything runs
        multi = parse_bool(_first(request.get("multi_gpu", self._config["multi_gpu"])), "multi_gpu")
        request["multi_gpu"] = multi
        if multi and not torch.cuda.is_available():
            # Processes on CPU talk over gloo through a rendezvous file (MONAI Label defaults to NCCL).
            request.setdefault("distributed_backend", "gloo")
            request.setdefault("distributed_url", f"file://{tempfile.mktemp(prefix='sam_med2d_dist_')}")
        # One run at a time whatever starts it (REST, run_sync in the server, the scheduler): runs share train/ and
        # each one's publish decision assumes the served model is the one it validated against.
        with self.model_store.training_lock():
            return super().__call__(request, datastore)

    # ------------------------------------------------------------------ data
    def pre_process(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """Curate the final labels into the run's cache folder; one record per curated 2D image."""
        cache = Path(self.get_cache_dir(request)) / "curated"
        config = self.recipe_for(request)
        records: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        items = datastore.datalist()
        for item in items:
            case = stem(item["image"])
            try:
                slices = iter_curated([(case, item["image"], item["label"])], min_fraction=config.min_mask_fraction)
                written = write_slices(slices, cache)
            except (CurationError, OSError, ValueError) as err:
                skipped.append({"image": case, "label": Path(item["label"]).name, "reason": str(err)})
                continue
            if not written:
                reason = f"no labelled region of at least {config.min_mask_fraction:.4%} of the image"
                skipped.append({"image": case, "label": Path(item["label"]).name, "reason": reason})
            for record in written:
                records.append(
                    {
                        "case": record["case"],
                        "image": str(cache / record["image"]),
                        "masks": [str(cache / m) for m in record["masks"]],
                    }
                )
        # Named in the run's train_stats.json (and so in /info) as well as in the log: never dropped silently.
        self.skipped_labels = skipped
        reasons = [f"{s['image']}: {s['reason']}" for s in skipped]
        for message in reasons:
            logger.warning(f"Training skips a label it cannot use: {message}")
        if not records:
            raise ValueError(
                f"nothing to train on: {len(items)} final labels in the datastore, none with a usable mask"
                + (f" ({'; '.join(reasons)})" if reasons else "")
            )
        logger.info(f"Curated {len(items)} final labels into {len(records)} training images ({cache})")
        return records

    def partition_datalist(self, context: Context, shuffle: bool = False) -> tuple[list, list]:
        """Hold out a share of the labelled images (by source image, so slices of a volume stay together).

        The parent's ``train()`` calls this first, so the run's recipe and world size are put on the context here.
        """
        config = context.recipe = self._recipe
        context.distributed_world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if context.device.type == "cpu":
            configure_cpu_math()
        torch.manual_seed(config.seed)
        train_cases, val_cases = split_cases([r["case"] for r in context.datalist], config.val_split, config.seed)
        train = [r for r in context.datalist if r["case"] in train_cases]
        val = [r for r in context.datalist if r["case"] in val_cases]
        logger.info(f"{context.local_rank} - training images: {len(train)}; held-out validation images: {len(val)}")
        return train, val

    # ------------------------------------------------------------------ network, optimizer, loss
    def network(self, context: Context) -> torch.nn.Module:
        config = context.recipe
        if config.init == "checkpoint":
            return load_model(
                config.checkpoint, self.model_store.config, device=context.device, adapters=self.decoding.adapters
            )
        return self.model_store.load(context.device)

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        return make_optimizer(context.network, context.recipe)

    def loss_function(self, context: Context) -> torch.nn.Module:
        return FocalDiceIoULoss(context.recipe.focal_weight, reduction=context.recipe.loss_reduction)

    def train_iteration_update(self, context: Context):
        annotator = SimulatedAnnotator(context.recipe, self.loss_function(context), decoding=self.decoding)
        return iteration_update(annotator)

    # ------------------------------------------------------------------ MONAI Label hooks
    def train_pre_transforms(self, context: Context) -> list:
        return []  # SamMed2DDataset puts images and masks into the model's input frame (lib.serving.preprocessing)

    def train_post_transforms(self, context: Context) -> list:
        return []

    def val_inferer(self, context: Context) -> None:
        return None  # validation prompts the model like an annotator (lib.training.evaluation), not a sliding window

    def train(self, rank: int, world_size: int, request: dict[str, Any], datalist: list) -> dict[str, Any]:
        request = copy.deepcopy(request)
        self._recipe = self.recipe_for(request)
        return super().train(rank, world_size, request, datalist)

    def create_network(self, context: Context) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        # No DistributedDataParallel wrapper: the iteration makes nine optimizer steps per batch on different
        # parameter groups and averages gradients itself (lib.training.distributed.average_gradients).
        context.network = self.network(context)
        broadcast_parameters(context.network)
        return context.network, self.optimizer(context)

    def create_trainer(self, context: Context) -> SupervisedTrainer:
        config = context.recipe
        rank, world = context.local_rank, context.distributed_world
        dataset = SamMed2DDataset(
            [(Path(r["image"]), [Path(m) for m in r["masks"]]) for r in context.train_datalist],
            self.model_store.config.image_size,
            self.model_store.config.pixel_mean,
            self.model_store.config.pixel_std,
            masks_per_image=config.masks_per_image,
            seed=config.seed,
            policy=self.decoding.policy,
        )
        if len(dataset) < config.batch_size * world:
            smaller = max(1, len(dataset) // world)
            logger.info(f"{len(dataset)} training images: batch size {config.batch_size} -> {smaller} per process")
            config = context.recipe = config.with_overrides({"batch_size": smaller})
        loader = make_train_loader(dataset, config, rank, world)
        trainer = SupervisedTrainer(
            device=context.device,
            max_epochs=config.epochs,
            train_data_loader=loader,
            network=context.network,
            optimizer=context.optimizer,
            loss_function=self.loss_function(context),
            iteration_update=self.train_iteration_update(context),
            amp=False,
            decollate=False,
        )
        publisher = ValidateAndPublish(self, context)
        EpochLoop(
            dataset,
            loader,
            make_scheduler(context.optimizer, config),
            world,
            on_epoch=publisher.epoch_completed,
            on_iteration=publisher.log_iteration,
        ).attach(trainer)
        publisher.attach(trainer)
        return trainer

    def finalize(self, context: Context) -> None:
        """Stats and publishing are :class:`ValidateAndPublish`'s; MONAI Label's publisher is not attached."""


class ValidateAndPublish:
    """Validation decoded as the server decodes, train stats, and the promotion gate at the end of a successful run.

    The gate compares the best epoch with the model that serves when the run ends, on the same held-out labels: the
    starting weights differ from it when a run starts from a checkpoint, and the served version may change during the
    run (a rollback), so the served model is validated in its own right.
    """

    def __init__(self, task: SamMed2DTrain, context: Context) -> None:
        self.task = task
        self.context = context
        self.config: RecipeConfig = context.recipe
        self.rank = context.local_rank
        self.best = BestEpoch(Path(context.output_dir) / "best.pt")
        self.samples: list[EvalSample] = []
        self.stats: dict[str, Any] = {}
        self.served_key = ""

    def attach(self, engine: SupervisedTrainer) -> None:
        """Run-level events; the epochs reach :meth:`epoch_completed` through the :class:`EpochLoop`."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    @property
    def model(self) -> torch.nn.Module:
        return self.context.network

    def _validate(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        result = evaluate_model(
            model if model is not None else self.model,
            self.samples,
            self.config.val_points,
            seed=self.config.seed,
            decoding=self.task.decoding,
            clicks="interior",
        )
        dice = dict(result["dice"])
        dice["mean"] = float(np.mean(list(result["dice"].values())))
        return {
            "dice": dice,
            "masks": result["masks"],
            "images": result["images"],
            "seconds": result["seconds"],
            "per_mask": result["per_mask"],
            "mask_images": result["mask_images"],
        }

    def _validate_served(self) -> dict[str, Any]:
        """The model serving now, validated like the epochs (loaded apart when the run did not start from it)."""
        store = self.task.model_store
        self.served_key = store.version_key()
        version = store.active_version()
        if self.config.init == "served" and "baseline" in self.stats and self.stats["served"]["key"] == self.served_key:
            return {**self.stats["baseline"], "version": version, "key": self.served_key}
        served = store.load(self.context.device)
        try:
            return {**self._validate(served), "version": version, "key": self.served_key}
        finally:
            del served

    def _write_stats(self) -> None:
        if self.rank == 0:
            write_json_atomic(self.task._stats_path, self.stats)

    def started(self, engine: SupervisedTrainer) -> None:
        ctx = self.context
        store = self.task.model_store
        self.stats = {
            "status": "running",
            "run_id": ctx.run_id,
            "start_ts": int(ctx.start_ts),
            "recipe": self.config.to_dict(),
            "decoding": self.task.decoding.to_dict(),
            "world_size": ctx.distributed_world,
            "train_images": len(ctx.train_datalist),
            "val_images": len(ctx.val_datalist),
            "served_before": store.active_version(),
            "served": {"version": store.active_version(), "key": store.version_key()},
            "labels_skipped": len(self.task.skipped_labels),
            "skipped_labels": self.task.skipped_labels,
            "epochs": [],
        }
        if self.rank != 0:
            return
        val = ctx.val_datalist[: self.config.val_max_images] if self.config.val_max_images else ctx.val_datalist
        self.samples = [
            EvalSample(read_image(r["image"]), np.stack([read_mask(m) for m in r["masks"]]), r["case"]) for r in val
        ]
        if self.samples:
            self.stats["baseline"] = self._validate()
            self.stats["served"] = self._validate_served()
            logger.info(f"Validation of the starting weights: {self._table(self.stats['baseline'])}")
            if self.config.init != "served":
                logger.info(f"Validation of the served model: {self._table(self.stats['served'])}")
        self._write_stats()

    def log_iteration(self, engine: SupervisedTrainer) -> None:
        out = engine.state.output
        if self.rank == 0 and (engine.state.iteration % 10 == 0 or engine.state.iteration == 1):
            logger.info(
                f"Epoch {engine.state.epoch}/{engine.state.max_epochs} iteration {engine.state.iteration}: "
                f"loss {out['loss']:.4f} (first prompt {out['loss_first']:.4f}, last {out['loss_last']:.4f})"
            )

    def epoch_completed(self, epoch: int, engine: SupervisedTrainer) -> None:
        history = engine.state.history
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": history["epoch_loss"][-1],
            "images_per_second": history["images_per_second"][-1],
            "lr": history["lr"][-1],
        }
        if self.rank == 0 and self.samples:
            row["val"] = self._validate()
            logger.info(f"Epoch {epoch} validation: {self._table(row['val'])}")
            if self.best.update(epoch, row["val"]["dice"]["mean"], self.model):
                self.stats["best_metric"], self.stats["best_epoch"] = self.best.score, epoch
        self.stats["epochs"].append(row)
        self._write_stats()

    def completed(self, engine: SupervisedTrainer) -> None:
        finish_together()  # before MONAI Label destroys the process group after the run
        if self.rank != 0:
            return
        store = self.task.model_store
        self.stats["status"] = "completed"
        if not self.samples:
            self.stats["published"] = None
            self.stats["publish_reason"] = "no held-out labels to validate on (needs at least two labelled images)"
        elif store.version_key() != self.served_key:  # a rollback during the run (one run at a time): it wins
            self.stats["published"] = None
            self.stats["publish_reason"] = _ROLLBACK_WINS.format(store.active_version())
        else:
            served = self.stats["served"]
            best = next(r for r in self.stats["epochs"] if r["epoch"] == self.stats["best_epoch"])
            best_mean, served_mean = best["val"]["dice"]["mean"], served["dice"]["mean"]
            if best_mean < served_mean:
                self.stats["published"] = None
                self.stats["publish_reason"] = (
                    f"validation Dice would drop: best epoch {best['epoch']} {best_mean:.4f} < served model "
                    f"{served['version']} {served_mean:.4f}; served model kept"
                )
            else:
                metrics = {
                    "val_dice": best["val"]["dice"],
                    "served_val_dice": served["dice"],
                    "served_version": served["version"],
                    "baseline_val_dice": self.stats["baseline"]["dice"],
                    "epoch": best["epoch"],
                    "run_id": self.stats["run_id"],
                    "recipe": self.config.name,
                    "train_images": self.stats["train_images"],
                    "val_images": self.stats["val_images"],
                    "decoding": self.task.decoding.to_dict(),
                }
                version = store.publish(read_state_dict(self.best.path)[0], metrics, if_serving=self.served_key)
                self.stats["published"] = version
                self.stats["publish_reason"] = (
                    f"validation Dice {best_mean:.4f} (epoch {best['epoch']}) >= served model {served['version']} "
                    f"{served_mean:.4f}"
                    if version
                    else _ROLLBACK_WINS.format(store.active_version())
                )
        self.stats["served_after"] = store.active_version()
        self.stats["total_time"] = time.time() - self.context.start_ts
        logger.info(f"Training finished: {self.stats['publish_reason']}; serving {self.stats['served_after']}")
        self._write_stats()

    def failed(self, engine: SupervisedTrainer, error: BaseException) -> None:
        if self.rank == 0:
            self.stats["status"] = "failed"
            self.stats["error"] = f"{type(error).__name__}: {error}"
            self.stats["published"] = None
            self.stats["served_after"] = self.task.model_store.active_version()
            self._write_stats()
        raise error

    @staticmethod
    def _table(result: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items()) + f" ({result['masks']} masks)"
