"""SAM-Med2D training: recipe configs, the dataset in the SAM-Med2D layout and the simulated-annotator iteration.

The iteration (:class:`SimulatedAnnotator`) is what the paper trains with. Per batch it makes
``1 + decoder_iterations`` optimizer steps:

1. the first prompt (a jittered box or one foreground point, 50/50 per batch) trains the encoder adapters, the
   prompt encoder and the mask decoder; the image is encoded once;
2. ``decoder_iterations`` (8) steps train the mask decoder alone on the detached embedding: each adds 1, 3, 5 or 9
   new clicks from the error region of the previous prediction and passes the previous mask (sigmoid of its 64x64
   logits) as a prompt; at one random step among the first seven, and at the last, the mask is the only prompt.

The loss (:class:`lib.losses.FocalDiceIoULoss`) is taken on the kept (highest predicted IoU) mask upsampled to the
input size. Frozen parameters get no gradient (``requires_grad`` off, gradients set to ``None``), so Adam leaves them
bit-identical. Under ``torch.distributed`` each process holds a contiguous share of the global batch and gradients
are averaged after every backward pass; :class:`lib.prompts.PromptRandom` gives each row the same prompts whatever
the split, so with ``loss_reduction="mask"`` a multi-process run matches a single process on the same total batch.
Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .decoding import ServedDecoding
from .losses import FocalDiceIoULoss
from .modeling import SamMed2D
from .preprocessing import PolicyName, preprocess_image
from .prompts import PromptRandom, error_clicks, jitter_boxes, largest_component_box, random_points

TRAIN_LAYOUT = "image2label_train.json"
TEST_LAYOUT = "label2image_test.json"


# --------------------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Everything a training run needs besides the network and the data.

    ``batch_size`` is images per process; each image contributes ``masks_per_image`` prompt rows.
    ``init`` says where the weights come from: ``"served"`` (the model inference serves now) or ``"checkpoint"``
    (``checkpoint``: any layout :func:`lib.checkpoint.load_model` reads, e.g. ``sam_vit_b_01ec64.pth``).
    """

    name: str = "continual"
    init: str = "served"
    checkpoint: str = ""
    model_config: str = "vit_b"
    epochs: int = 4
    lr: float = 1e-4
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.5
    image_size: int = 256
    masks_per_image: int = 5
    batch_size: int = 2
    num_gpus: int = 1
    decoder_iterations: int = 8
    point_choices: tuple[int, ...] = (1, 3, 5, 9)
    box_probability: float = 0.5
    box_max_shift: int = 5
    multimask: bool = True
    amp: bool = True
    focal_weight: float = 20.0
    loss_reduction: str = "batch"
    val_split: float = 0.2
    val_points: tuple[int, ...] = (1, 3, 5)
    val_max_images: int = 0
    min_mask_fraction: float = 100 / (256 * 256)
    seed: int = 0
    num_workers: int = 0

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> RecipeConfig:
        """A copy with some values replaced; strings (from a request or a command line) are converted."""
        if not overrides:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values = {key: _coerce(getattr(self, key), value, key) for key, value in overrides.items()}
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _coerce(default: Any, value: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in value)
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"training config {key}={value!r} is not a valid {type(default).__name__}") from err


RECIPES: dict[str, RecipeConfig] = {
    # The app's default: start from what is served, a few epochs on the saved labels, validate on a held-out share.
    "continual": RecipeConfig(),
    # The paper: from SAM ViT-B, 12 epochs, Adam 1e-4 halved at epochs 7 and 10, 5 masks, 50 images x 8 GPUs.
    "sam_med2d_paper": RecipeConfig(
        name="sam_med2d_paper",
        init="checkpoint",
        checkpoint="sam_vit_b_01ec64.pth",
        epochs=12,
        lr=1e-4,
        lr_milestones=(7, 10),
        batch_size=50,
        num_gpus=8,
        val_split=0.2,
        num_workers=8,
    ),
}


def recipe(name: str, overrides: Mapping[str, Any] | None = None) -> RecipeConfig:
    """A named recipe (``continual``, ``sam_med2d_paper``) with optional overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown training config {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name].with_overrides(overrides)


# ------------------------------------------------------------------------------------------------ parameter groups
def parameter_groups(model: SamMed2D) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters by role: ``adapters``, ``prompt_encoder``, ``mask_decoder``, ``frozen_encoder``."""
    groups: dict[str, list[torch.nn.Parameter]] = {
        "adapters": [],
        "prompt_encoder": [],
        "mask_decoder": [],
        "frozen_encoder": [],
    }
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            groups["adapters" if ".Adapter." in name else "frozen_encoder"].append(param)
        elif name.startswith("prompt_encoder."):
            groups["prompt_encoder"].append(param)
        else:
            groups["mask_decoder"].append(param)
    return groups


def trainable_parameters(model: SamMed2D) -> list[torch.nn.Parameter]:
    """What the recipe ever trains: adapters, prompt encoder and mask decoder."""
    groups = parameter_groups(model)
    return groups["adapters"] + groups["prompt_encoder"] + groups["mask_decoder"]


def _train_only(model: SamMed2D, names: Sequence[str]) -> None:
    for group, params in parameter_groups(model).items():
        for param in params:
            param.requires_grad_(group in names)


def make_optimizer(model: SamMed2D, config: RecipeConfig) -> torch.optim.Adam:
    """Adam over the trainable groups (frozen encoder weights are not even handed to it).

    The fused implementation does the same arithmetic as the default one in a few kernels instead of a Python loop
    over hundreds of small tensors (5x faster per step on CPU; there are nine steps per batch).
    """
    return torch.optim.Adam(trainable_parameters(model), lr=config.lr, fused=True)


def configure_cpu_math() -> None:
    """Flush denormal floats to zero on CPU.

    Fresh adapters and small gradients produce denormals, and x86 CPUs handle them up to 10x slower (measured on the
    encoder backward pass); their values are below 1e-38 and do not matter to training. The setting is per thread
    and new threads inherit it, so call this before the first parallel operation of the process.
    """
    torch.set_flush_denormal(True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: RecipeConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate multiplied by ``lr_gamma`` at each milestone epoch (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)


# ---------------------------------------------------------------------------------------------------- the iteration
class SimulatedAnnotator:
    """The paper's training iteration on one batch: ``1 + config.decoder_iterations`` optimizer steps.

    Args:
        config: the recipe.
        loss_fn: loss on ``(R, 1, S, S)`` logits, targets and ``(R, 1)`` predicted IoU (default: the paper's).
        rng: prompt random numbers (seeded; rank-aware under ``torch.distributed``).
        decoding: the server's decoding rule: the previous mask enters as the server passes it.
    """

    def __init__(
        self,
        config: RecipeConfig,
        loss_fn: torch.nn.Module | None = None,
        rng: PromptRandom | None = None,
        decoding: ServedDecoding | None = None,
    ) -> None:
        self.config = config
        self.decoding = decoding or ServedDecoding()
        self.loss_fn = loss_fn or FocalDiceIoULoss(config.focal_weight, reduction=config.loss_reduction)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        self.rng = rng or PromptRandom(config.seed, rank=rank, world_size=world)

    def _autocast(self, device: torch.device):
        if self.config.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _optimise(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        optimizer.step()

    def __call__(
        self,
        model: SamMed2D,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
    ) -> dict[str, float]:
        """Train on one batch.

        Args:
            model: the network (train mode is set here).
            optimizer: holds (at least) the trainable parameters.
            images: ``(B, 3, S, S)`` normalised images.
            labels: ``(B, K, S, S)`` 0/1 masks, K per image.
            boxes: ``(B, K, 4)`` XYXY boxes of each mask's largest component (un-jittered), input frame.

        Returns:
            ``loss`` (mean over the steps), ``loss_first`` and ``loss_last``.
        """
        cfg = self.config
        device = images.device
        b, k, s, _ = labels.shape
        targets = labels.reshape(b * k, s, s).float()
        target_rows = targets[:, None]
        groups = parameter_groups(model)
        model.train()

        # Step 1: the first prompt; adapters, prompt encoder and decoder learn; the image is encoded once.
        _train_only(model, ("adapters", "prompt_encoder", "mask_decoder"))
        use_box = self.rng.uniform() < cfg.box_probability
        coords = point_labels = box_rows = None
        if use_box:
            box_rows = jitter_boxes(boxes.reshape(b * k, 4).float(), self.rng, cfg.box_max_shift)
        else:
            coords, point_labels = random_points(targets, self.rng, 1)
        with self._autocast(device):
            embeddings = model.encode(images)
            rows = embeddings.repeat_interleave(k, dim=0)
            low_res, iou = model.decode(rows, coords, point_labels, box_rows, None, cfg.multimask)
        logits = F.interpolate(low_res.float(), (s, s), mode="bilinear", align_corners=False)
        loss = self.loss_fn(logits, target_rows, iou)
        first_params = groups["adapters"] + groups["prompt_encoder"] + groups["mask_decoder"]
        self._optimise(loss, optimizer, first_params)
        losses = [float(loss.detach())]

        # Steps 2..: the decoder alone, on the detached embedding, with error-region clicks and the previous mask.
        _train_only(model, ("mask_decoder",))
        rows = rows.detach()
        mask_only_step = self.rng.integer(1, max(2, cfg.decoder_iterations - 1))
        previous_low_res = low_res.detach().float()
        previous = logits.detach()[:, 0] > 0
        for step in range(cfg.decoder_iterations):
            coords = point_labels = None
            if step != mask_only_step and step != cfg.decoder_iterations - 1:
                coords, point_labels = error_clicks(previous, targets, self.rng.choice(cfg.point_choices), self.rng)
            mask_inputs = self.decoding.mask_input(previous_low_res)
            with self._autocast(device):
                low_res, iou = model.decode(rows, coords, point_labels, None, mask_inputs, cfg.multimask)
            logits = F.interpolate(low_res.float(), (s, s), mode="bilinear", align_corners=False)
            loss = self.loss_fn(logits, target_rows, iou)
            self._optimise(loss, optimizer, groups["mask_decoder"])
            losses.append(float(loss.detach()))
            previous_low_res = low_res.detach().float()
            previous = logits.detach()[:, 0] > 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Report the loss of the whole (global) batch, not this process's share.
            shared = torch.tensor(losses, dtype=torch.float64)
            dist.all_reduce(shared)
            losses = (shared / dist.get_world_size()).tolist()
        return {"loss": float(np.mean(losses)), "loss_first": losses[0], "loss_last": losses[-1]}


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ``torch.distributed`` group (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def finish_together() -> None:
    """Wait for every process of the ``torch.distributed`` group (no-op in a single process).

    Called where training ends, before any process may tear the group down: a process that leaves the last
    collective first and destroys its gloo connections while a peer still flushes messages to it aborts the peer.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process the parameters of ``src`` (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src)


# --------------------------------------------------------------------------------------------------------- dataset
def resolve_layout_path(root: Path, relative: str) -> Path:
    """A path from a layout JSON: relative to ``root``; the published demo's prefix (``data_demo/``) is tolerated."""
    path = Path(relative)
    if path.is_absolute():
        return path
    parts = path.parts
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.exists():
            return candidate
    return root / path


def read_layout(root: str | Path, split: str = "train") -> list[tuple[Path, list[Path]]]:
    """``(image, [masks])`` pairs from ``image2label_train.json`` (train) or ``label2image_test.json`` (test)."""
    root = Path(root)
    name = TRAIN_LAYOUT if split == "train" else TEST_LAYOUT
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a dataset in the SAM-Med2D layout ({TRAIN_LAYOUT}, {TEST_LAYOUT})"
        )
    entries = json.loads(path.read_text())
    if split == "train":
        pairs = {image: list(masks) for image, masks in entries.items()}
    else:
        pairs = {}
        for mask, image in entries.items():
            pairs.setdefault(image, []).append(mask)
    return [
        (resolve_layout_path(root, image), [resolve_layout_path(root, m) for m in masks])
        for image, masks in pairs.items()
        if masks
    ]


def read_image(path: str | Path) -> np.ndarray:
    """An 8-bit image file -> ``(H, W, 3)`` uint8 RGB."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file -> ``(H, W)`` bool (any non-zero value is foreground)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 0


@dataclasses.dataclass
class PreparedImage:
    """One image in the input frame: ``image (3, S, S)`` float32 normalised, ``masks (M, S, S)`` uint8 0/1,
    ``boxes (M, 4)`` XYXY of each mask's largest component (input frame)."""

    image: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor


def prepare_image(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    image_size: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    policy: PolicyName = "evaluation",
) -> PreparedImage:
    """Put an RGB image and its masks into the input frame with :func:`lib.preprocessing.preprocess_image`."""
    tensor, geometry = preprocess_image(image, image_size, tuple(pixel_mean), tuple(pixel_std), policy)
    stacked = torch.as_tensor(np.stack([np.asarray(m, dtype=bool) for m in masks]))[:, None].float()
    if stacked.shape[-2:] != tuple(geometry.original_hw):
        raise ValueError(f"mask shape {tuple(stacked.shape[-2:])} differs from image shape {geometry.original_hw}")
    in_frame = geometry.masks_to_input(stacked)[:, 0] > 0
    boxes = torch.as_tensor(np.stack([largest_component_box(m) for m in in_frame.numpy()]))
    return PreparedImage(tensor[0], in_frame.to(torch.uint8), boxes)


class SamMed2DDataset(Dataset):
    """Training data in the SAM-Med2D layout: each item is one image with ``masks_per_image`` of its masks.

    Masks are drawn without replacement when an image has enough, else all of them plus random duplicates (as the
    paper says); the draw depends only on ``(seed, epoch, index)`` so every process and worker agrees.
    Images are preprocessed once and kept in memory when ``cache`` is set (cheap epochs for small sets).

    Args:
        pairs: ``(image path, [mask paths])``, e.g. from :func:`read_layout`.
        image_size, pixel_mean, pixel_std: from the model config.
        masks_per_image: K.
        seed: seed of the mask draw.
        cache: keep preprocessed images in memory.
        policy: preprocessing policy: the served one (:attr:`lib.decoding.ServedDecoding.policy`).

    Items: ``image (3, S, S)`` float32, ``label (K, S, S)`` float32 0/1, ``box (K, 4)`` float32.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Sequence[Path]]],
        image_size: int = 256,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        masks_per_image: int = 5,
        seed: int = 0,
        cache: bool = True,
        policy: PolicyName = "evaluation",
    ) -> None:
        self.policy = policy
        self.pairs = [(Path(i), [Path(m) for m in ms]) for i, ms in pairs]
        self.image_size = image_size
        self.pixel_mean = tuple(pixel_mean)
        self.pixel_std = tuple(pixel_std)
        self.masks_per_image = masks_per_image
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self._prepared: dict[int, PreparedImage] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prepared(self, index: int) -> PreparedImage:
        if index in self._prepared:
            return self._prepared[index]
        image_path, mask_paths = self.pairs[index]
        item = prepare_image(
            read_image(image_path),
            [read_mask(p) for p in mask_paths],
            self.image_size,
            self.pixel_mean,
            self.pixel_std,
            self.policy,
        )
        if self.cache:
            self._prepared[index] = item
        return item

    def prepare_all(self) -> None:
        """Preprocess every image now (with ``cache``), so that epochs only draw masks."""
        for index in range(len(self)):
            self.prepared(index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.prepared(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        count, k = item.masks.shape[0], self.masks_per_image
        if count >= k:
            chosen = rng.choice(count, k, replace=False)
        else:
            chosen = np.concatenate([np.arange(count), rng.choice(count, k - count, replace=True)])
        chosen = torch.as_tensor(chosen, dtype=torch.long)
        return {"image": item.image, "label": item.masks[chosen].float(), "box": item.boxes[chosen].float()}


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches from a seeded per-epoch permutation; each process takes its contiguous share of every batch.

    With ``world_size`` processes and ``batch_size`` images per process, the global batch is
    ``batch_size * world_size`` images, the same batch a single process with that batch size would see.
    The last incomplete global batch is dropped so all processes make the same number of steps.
    """

    def __init__(
        self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0
    ) -> None:
        if length < batch_size * world_size:
            raise ValueError(
                f"{length} training images are fewer than one global batch ({batch_size} x {world_size} processes)"
            )
        self.length = length
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        step = self.batch_size * self.world_size
        for start in range(0, len(self) * step, step):
            share = order[start + self.rank * self.batch_size : start + (self.rank + 1) * self.batch_size]
            yield share.tolist()


# ------------------------------------------------------------------------------------------------------ the engines
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
