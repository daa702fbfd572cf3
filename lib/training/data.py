"""Training data: the SAM-Med2D dataset layout (``image2label_train.json`` / ``label2image_test.json``), images
prepared once to the input frame, and each process's share of every global batch."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from lib.modeling.config import PIXEL_MEAN, PIXEL_STD
from lib.serving.preprocessing import PolicyName, preprocess_image
from lib.serving.prompts import largest_component_box

TRAIN_LAYOUT = "image2label_train.json"
TEST_LAYOUT = "label2image_test.json"


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
    """Put an RGB image and its masks into the input frame with :func:`lib.serving.preprocessing.preprocess_image`."""
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
        policy: preprocessing policy: the served one (:attr:`lib.serving.decoding.ServedDecoding.policy`).

    Items: ``image (3, S, S)`` float32, ``label (K, S, S)`` float32 0/1, ``box (K, 4)`` float32.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Sequence[Path]]],
        image_size: int = 256,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
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
