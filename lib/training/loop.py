"""The one training loop: an ignite engine running the simulated-annotator iteration epoch by epoch, with its
images/s accounting. The command line (:mod:`lib.training.run_recipe`), the benchmarks and the server's train
task all run it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

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
    from ignite.engine import Engine, Events

    if model.device.type == "cpu":
        configure_cpu_math()
    broadcast_parameters(model)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    annotator = SimulatedAnnotator(config)
    loader = make_train_loader(dataset, config, rank, world_size)
    engine = Engine(iteration_update(annotator, model, optimizer))
    history: dict[str, Any] = {"epoch_loss": [], "epoch_seconds": [], "images_per_second": []}
    engine.state.history = history
    state: dict[str, Any] = {}

    @engine.on(Events.EPOCH_STARTED)
    def _start_epoch(engine: Engine) -> None:
        loader.batch_sampler.set_epoch(engine.state.epoch - 1)
        dataset.set_epoch(engine.state.epoch - 1)
        state.update(losses=[], images=0, start=None)

    @engine.on(Events.ITERATION_STARTED)
    def _start_clock(engine: Engine) -> None:
        if state["start"] is None:  # the first batch's data loading (and caching) is not training speed
            state["start"] = time.perf_counter()

    @engine.on(Events.ITERATION_COMPLETED)
    def _record(engine: Engine) -> None:
        state["losses"].append(engine.state.output["loss"])
        state["images"] += engine.state.output["images"] * world_size
        if progress and rank == 0 and engine.state.iteration % 20 == 0:
            print(
                f"epoch {engine.state.epoch} iter {engine.state.iteration}: loss {engine.state.output['loss']:.4f}",
                flush=True,
            )

    @engine.on(Events.EPOCH_COMPLETED)
    def _end_epoch(engine: Engine) -> None:
        seconds = time.perf_counter() - state["start"]
        history["epoch_loss"].append(float(np.mean(state["losses"])))
        history["epoch_seconds"].append(seconds)
        history["images_per_second"].append(state["images"] / seconds if seconds > 0 else float("nan"))
        scheduler.step()
        if on_epoch is not None:
            on_epoch(engine.state.epoch, engine)

    engine.run(loader, max_epochs=config.epochs)
    finish_together()
    return history
