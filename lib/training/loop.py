"""The one training loop: an ignite engine running the simulated-annotator iteration epoch by epoch, with its
images/s accounting. The command line (:mod:`lib.training.run_recipe`), the benchmarks and the server's train
task all run it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.io.checkpoint import save_state_dict
from lib.modeling import SamMed2D
from lib.training.data import SamMed2DDataset, ShardedBatchSampler
from lib.training.distributed import broadcast_parameters, finish_together
from lib.training.iteration import SimulatedAnnotator
from lib.training.recipe import RecipeConfig, configure_cpu_math, make_optimizer, make_scheduler


def iteration_update(
    annotator: SimulatedAnnotator,
    model: SamMed2D | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
):
    """An ignite process function ``(engine, batch) -> output`` running :class:`SimulatedAnnotator` on a batch.

    Works as MONAI's ``SupervisedTrainer(iteration_update=...)`` (the network, optimizer and device are taken from
    the engine) and as a plain ``ignite.engine.Engine`` process function (pass them here).
    """

    def update(engine: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        network = model if model is not None else engine.network
        network = getattr(network, "module", network)  # never through a DistributedDataParallel wrapper's forward
        opt = optimizer if optimizer is not None else engine.optimizer
        dev = torch.device(device) if device is not None else network.device
        out = annotator(network, opt, batch["image"].to(dev), batch["label"].to(dev), batch["box"].to(dev))
        out["images"] = int(batch["image"].shape[0])
        return out

    return update


def make_train_loader(
    dataset: SamMed2DDataset, config: RecipeConfig, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """A loader of this process's share of every global batch (see :class:`ShardedBatchSampler`)."""
    sampler = ShardedBatchSampler(len(dataset), config.batch_size, rank, world_size, shuffle=True, seed=config.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, persistent_workers=False
    )


class EpochLoop:
    """What every training run does around the iteration, attached to any ignite engine (a plain ``Engine`` in
    :func:`fit`, MONAI's ``SupervisedTrainer`` in the server's train task).

    Per epoch: the sampler and the dataset are told the epoch (prompts and shuffling are seeded by it), the clock
    starts at the first batch (its data loading and caching are not training speed), losses and images are counted
    over all processes, the learning rate steps, and ``on_epoch(epoch, engine)`` runs (validation, checkpoints).
    ``engine.state.history`` holds ``epoch_loss``, ``epoch_seconds``, ``images_per_second`` and ``lr`` per epoch.
    """

    def __init__(
        self,
        dataset: SamMed2DDataset,
        loader: torch.utils.data.DataLoader,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        world_size: int = 1,
        on_epoch: Callable[[int, Any], None] | None = None,
        on_iteration: Callable[[Any], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.loader = loader
        self.scheduler = scheduler
        self.world_size = world_size
        self.on_epoch = on_epoch
        self.on_iteration = on_iteration
        self.history: dict[str, list[float]] = {
            "epoch_loss": [],
            "epoch_seconds": [],
            "images_per_second": [],
            "lr": [],
        }
        self._losses: list[float] = []
        self._images = 0
        self._start: float | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.state.history = self.history
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Any) -> None:
        self.loader.batch_sampler.set_epoch(engine.state.epoch - 1)
        self.dataset.set_epoch(engine.state.epoch - 1)
        self._losses, self._images, self._start = [], 0, None

    def iteration_started(self, engine: Any) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def iteration_completed(self, engine: Any) -> None:
        self._losses.append(engine.state.output["loss"])
        self._images += engine.state.output["images"] * self.world_size
        if self.on_iteration is not None:
            self.on_iteration(engine)

    def epoch_completed(self, engine: Any) -> None:
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        self.history["epoch_loss"].append(float(np.mean(self._losses)) if self._losses else float("nan"))
        self.history["epoch_seconds"].append(seconds)
        self.history["images_per_second"].append(self._images / seconds if seconds > 0 else float("nan"))
        self.history["lr"].append(self.scheduler.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        if self.on_epoch is not None:
            self.on_epoch(engine.state.epoch, engine)


class BestEpoch:
    """The one best-epoch selection: the epoch with the highest validation score (the first of equals), its
    weights written to ``path`` as a plain state dict."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.epoch: int | None = None
        self.score = -math.inf

    def update(self, epoch: int, score: float, model: torch.nn.Module) -> bool:
        """Keep ``model``'s weights if ``score`` beats every earlier epoch's; returns whether it did."""
        if not score > self.score:
            return False
        self.epoch, self.score = epoch, score
        save_state_dict(model, self.path)
        return True


def fit(
    model: SamMed2D,
    dataset: SamMed2DDataset,
    config: RecipeConfig,
    on_epoch: Any = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` for ``config.epochs`` epochs with an ignite engine; returns timing and loss history.

    ``on_epoch(epoch, engine)`` runs after each epoch (validation, checkpoints; ``engine.state.history`` holds
    the losses and speeds so far); the learning rate schedule steps per epoch. Under ``torch.distributed`` each
    process passes its rank and the world size.
    """
    from ignite.engine import Engine

    if model.device.type == "cpu":
        configure_cpu_math()
    broadcast_parameters(model)
    optimizer = make_optimizer(model, config)
    annotator = SimulatedAnnotator(config)
    loader = make_train_loader(dataset, config, rank, world_size)
    engine = Engine(iteration_update(annotator, model, optimizer))

    def print_progress(engine: Engine) -> None:
        if rank == 0 and engine.state.iteration % 20 == 0:
            print(f"epoch {engine.state.epoch} iter {engine.state.iteration}: loss {engine.state.output['loss']:.4f}")

    loop = EpochLoop(
        dataset,
        loader,
        make_scheduler(optimizer, config),
        world_size,
        on_epoch=on_epoch,
        on_iteration=print_progress if progress else None,
    )
    loop.attach(engine)
    engine.run(loader, max_epochs=config.epochs)
    finish_together()
    return loop.history
