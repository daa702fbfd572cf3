"""How unsure SAM-Med2D is about an unlabeled image: the score behind the ``sam_uncertainty`` active-learning strategy.

An unlabeled image has no prompt, so the scorer picks one the way an annotator would start: a foreground click at the
centre of the image (medical images are mostly acquired with the structure of interest centred). The model's mask for
that click gives a seed box (around its largest component, :func:`lib.serving.prompts.largest_component_box`); when
that mask is empty the seed box is the central half of the image. Then ``num_prompts`` perturbed prompts are decoded on
the same embedding: half are the seed box jittered as in training (:func:`lib.serving.prompts.jitter_boxes`), half are
random foreground clicks on the seed mask (:func:`lib.serving.prompts.random_points`), all drawn from a seeded
:class:`lib.serving.prompts.PromptRandom` (the one prompt sampler of training and evaluation).

Two signals come out:

* ``disagreement``: ``1 - mean pairwise IoU`` of the masks from the perturbed prompts (0 when every prompt gives the
  same mask; near 1 when they do not overlap): a model that is sure of the structure finds it from any nearby prompt;
* ``1 - predicted IoU``: the model's own estimate of its mask quality, averaged over the prompts.

``score`` is one of them or their mean (``method``). Masks are compared in the model's input frame, restricted to the
image area (padding excluded). Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lib.common.atomic_files import write_json_atomic
from lib.modeling import SamMed2D
from lib.serving.decoding import ServedDecoding, decode_rows
from lib.serving.embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingKey
from lib.serving.preprocessing import FrameGeometry, preprocess_image
from lib.serving.prompts import PromptRandom, jitter_boxes, largest_component_box, random_points
from lib.training.metrics import iou_per_mask

METHODS = ("disagreement", "iou", "combined")


@dataclasses.dataclass(frozen=True)
class UncertaintyConfig:
    """How the score is taken.

    Attributes:
        num_prompts: perturbed prompts per image (at least 2; half boxes, half clicks).
        box_shift: largest box jitter in input-frame pixels (the jitter is also capped at half a box side).
        method: ``disagreement``, ``iou`` or ``combined`` (their mean).
        seed: seed of the prompt draws (same seed, same model, same image: same score).

    Prompts are decoded with the server's rule (:class:`lib.serving.decoding.ServedDecoding`), as a click would be.
    """

    num_prompts: int = 8
    box_shift: int = 16
    method: str = "combined"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 2:
            raise ValueError(f"uncertainty num_prompts must be at least 2, got {self.num_prompts}")
        if self.method not in METHODS:
            raise ValueError(f"uncertainty method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.box_shift < 0:
            raise ValueError(f"uncertainty box_shift must not be negative, got {self.box_shift}")


@dataclasses.dataclass
class UncertaintyScore:
    """The score of one image (higher: less sure) with its parts and the seed box (XYXY, input frame)."""

    score: float
    disagreement: float
    predicted_iou: float
    seed_box: list[float]
    seed_from_click: bool
    num_prompts: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mask_disagreement(masks: torch.Tensor) -> float:
    """``1 - mean pairwise IoU`` of ``(K, H, W)`` binary masks (K >= 2); two empty masks agree."""
    if masks.shape[0] < 2:
        raise ValueError("disagreement needs at least two masks")
    pairs = list(itertools.combinations(range(masks.shape[0]), 2))
    first = masks[[a for a, _ in pairs]]
    second = masks[[b for _, b in pairs]]
    return float(1.0 - iou_per_mask(first, second).mean())


class UncertaintyScorer:
    """Scores images with one model.

    Args:
        model: the served model (eval mode is set here).
        config: the scoring settings.
        decoding: the server's decoding rule (preprocessing policy, multimask, threshold).
        cache: optional embedding cache; with ``model_version`` set, embeddings are looked up and stored there.
        model_version: identity of the weights, part of every cache key.
    """

    def __init__(
        self,
        model: SamMed2D,
        config: UncertaintyConfig | None = None,
        decoding: ServedDecoding | None = None,
        cache: EmbeddingCache | None = None,
        model_version: str = "",
    ) -> None:
        self.model = model.eval()
        self.config = config or UncertaintyConfig()
        self.decoding = decoding or ServedDecoding()
        self.cache = cache
        self.model_version = model_version
        self._entry: CachedEmbedding | None = None

    def _embed(self, image: np.ndarray, image_id: str | None, content: str) -> CachedEmbedding:
        cfg = self.model.config
        policy = self.decoding.policy
        key = None
        if self.cache is not None and image_id is not None:
            key = EmbeddingKey(image_id, content, "", f"{policy}:{cfg.image_size}", self.model_version)
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        tensor, geometry = preprocess_image(
            image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, policy, device=self.model.device
        )
        with torch.no_grad():
            entry = CachedEmbedding(self.model.encode(tensor), geometry)
        if key is not None:
            self.cache.put(key, entry)
        return entry

    def _decode(self, coords, labels, boxes) -> tuple[torch.Tensor, torch.Tensor]:
        """Input-frame prompts -> ``(K, S, S)`` boolean masks and ``(K,)`` predicted IoU."""
        low_res, iou = decode_rows(self.model, self._entry, self.decoding, coords, labels, boxes)
        size = self.model.config.image_size
        logits = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
        return logits[:, 0] > self.decoding.threshold, iou.float()

    @torch.no_grad()
    def score(self, image: np.ndarray, image_id: str | None = None, content: str = "") -> UncertaintyScore:
        """Score an ``(H, W)`` or ``(H, W, 3)`` uint8 image (RGB).

        Args:
            image: the image as inference reads it.
            image_id, content: identify the image for the embedding cache (id and content fingerprint).
        """
        cfg = self.config
        size = self.model.config.image_size
        device = self.model.device
        self._entry = self._embed(image, image_id, content)
        geometry: FrameGeometry = self._entry.geometry
        h, w = geometry.original_hw
        area = geometry.masks_to_input(torch.ones(1, 1, h, w, device=device))[0, 0] > 0

        centre = torch.as_tensor(geometry.points_to_input(np.array([[[w / 2.0, h / 2.0]]])), dtype=torch.float32)
        seed_mask, _ = self._decode(centre.to(device), torch.ones(1, 1, dtype=torch.int64, device=device), None)
        seed_mask = seed_mask[0] & area
        seed_from_click = bool(seed_mask.any())
        if seed_from_click:
            seed_box = torch.as_tensor(largest_component_box(seed_mask.cpu().numpy()), device=device)
        else:
            x0, y0 = geometry.points_to_input(np.array([w / 4.0, h / 4.0]))
            x1, y1 = geometry.points_to_input(np.array([3 * w / 4.0, 3 * h / 4.0]))
            seed_box = torch.tensor([x0, y0, x1, y1], dtype=torch.float32, device=device)
            seed_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
            seed_mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            seed_mask &= area

        rng = PromptRandom(cfg.seed)
        num_boxes = cfg.num_prompts // 2
        num_clicks = cfg.num_prompts - num_boxes
        side = float(min(seed_box[2] - seed_box[0], seed_box[3] - seed_box[1]))
        shift = int(min(cfg.box_shift, max(side / 2.0, 0.0)))
        boxes = jitter_boxes(seed_box[None].repeat(num_boxes, 1).cpu(), rng, max_shift=shift, std=1.0)
        boxes = boxes.clamp(0, size).to(device)
        box_masks, box_iou = self._decode(None, None, boxes)
        coords, labels = random_points(seed_mask[None].repeat(num_clicks, 1, 1).cpu(), rng, 1)
        click_masks, click_iou = self._decode(coords.to(device), labels.to(device), None)

        masks = torch.cat([box_masks, click_masks]) & area
        predicted_iou = float(torch.cat([box_iou, click_iou]).clamp(0, 1).mean())
        disagreement = mask_disagreement(masks)
        if cfg.method == "disagreement":
            score = disagreement
        elif cfg.method == "iou":
            score = 1.0 - predicted_iou
        else:
            score = 0.5 * (disagreement + 1.0 - predicted_iou)
        return UncertaintyScore(
            score=float(score),
            disagreement=disagreement,
            predicted_iou=predicted_iou,
            seed_box=[float(v) for v in seed_box.cpu()],
            seed_from_click=seed_from_click,
            num_prompts=cfg.num_prompts,
        )


class UncertaintyScores:
    """The scores of a datastore's images, kept in one JSON file (written atomically) beside the served model.

    Layout: ``{"scores": {image id: {"score", "disagreement", "predicted_iou", "model_version", "content", "ts"}},
    "progress": {"model_version", "done", "total", "started_at", "finished_at"}}``. The scoring task (a background
    process) writes it; the strategy in the server reads it, never a half-written file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._read: tuple[tuple[int, int], dict[str, Any]] | None = None

    def _contents(self) -> dict[str, Any]:
        """The file's contents, parsed again only when it changed: ``/info`` asks for the progress, and MONAI Label
        asks for the whole ``/info`` on every click, while the file holds a score per image of the datastore."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return {"scores": {}, "progress": {}}
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._read is None or self._read[0] != stamp:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            self._read = (stamp, {"scores": dict(data.get("scores", {})), "progress": dict(data.get("progress", {}))})
        return self._read[1]

    def load(self) -> dict[str, Any]:
        """``{"scores": ..., "progress": ...}``, the caller's to change (entries are replaced, not edited)."""
        data = self._contents()
        return {"scores": dict(data["scores"]), "progress": dict(data["progress"])}

    def progress(self) -> dict[str, Any]:
        return dict(self._contents()["progress"])

    def save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path, data)
