"""The published SAM-Med2D training loop, re-expressed over this project's modules: the throughput baseline.

What ``bench_training.py`` compares against, run in the same conditions: per batch, images read from disk and
resized (the published dataset does this in ``__getitem__``), the published forward math
(:mod:`benchmarks.published_reference`), the embedding repeated per mask, the prompt encoder under ``no_grad`` in the
decoder steps, the published loss (``log(p + 1e-12)``), the best mask gathered row by row, clicks drawn by a
per-point NumPy loop, and Adam (default implementation) over every model parameter. Same recipe, same
arithmetic; not a test oracle.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import published_reference
from lib.modeling import SamMed2D
from lib.training.data import prepare_image, read_image, read_mask


def published_loss(pred: torch.Tensor, mask: torch.Tensor, pred_iou: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(pred)
    num_pos = mask.sum()
    num_neg = mask.numel() - num_pos
    loss_pos = -0.25 * mask * (1 - p) ** 2 * torch.log(p + 1e-12)
    loss_neg = -0.75 * (1 - mask) * p**2 * torch.log(1 - p + 1e-12)
    focal = (loss_pos.sum() + loss_neg.sum()) / (num_pos + num_neg + 1e-12)
    inter = (p * mask).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + mask.sum() + 1)
    iou = (inter + 1e-7) / (p.sum() + mask.sum() - inter + 1e-7)
    return 20 * focal + dice + torch.mean((iou - pred_iou) ** 2)


def _decode(model: SamMed2D, embeddings, coords, labels, boxes, masks, grad_prompt: bool):
    points = (coords, labels) if coords is not None else None
    with torch.set_grad_enabled(grad_prompt and torch.is_grad_enabled()):
        sparse, dense = model.prompt_encoder(points, boxes, masks)
    low_res, iou = published_reference.decode_all_masks(model, embeddings, sparse, dense)
    low_res, iou = low_res[:, 1:], iou[:, 1:]
    values, indexes = torch.max(iou, dim=1)
    low_res = torch.stack([low_res[i : i + 1, idx] for i, idx in enumerate(indexes)], 0)
    masks = F.interpolate(low_res, (256, 256), mode="bilinear", align_corners=False)
    return masks, low_res, values[:, None]


def _select_random_points(pred: torch.Tensor, gt: torch.Tensor, point_num: int):
    device = gt.device
    pred, gt = pred.data.cpu().numpy(), gt.data.cpu().numpy()
    error = np.zeros_like(pred)
    error[pred != gt] = 1
    batch_points, batch_labels = [], []
    for j in range(error.shape[0]):
        one_pred, one_gt, one_error = pred[j].squeeze(0), gt[j].squeeze(0), error[j].squeeze(0)
        indices = np.argwhere(one_error == 1)
        if indices.shape[0] == 0:
            indices = np.random.randint(0, 256, size=(point_num, 2))
        selected = indices[np.random.choice(indices.shape[0], point_num, replace=True)].reshape(-1, 2)
        points, labels = [], []
        for y, x in selected:
            label = 1 if one_pred[y, x] == 0 and one_gt[y, x] == 1 else 0
            points.append((x, y))
            labels.append(label)
        batch_points.append(points)
        batch_labels.append(labels)
    points = torch.as_tensor(np.array(batch_points), dtype=torch.float, device=device)
    return points, torch.as_tensor(np.array(batch_labels), device=device)


def load_batch(pairs, indexes, config, masks_per_image: int = 5):
    """What the published dataset does per item: read the files, resize, draw masks, boxes from the mask."""
    images, labels, boxes = [], [], []
    for i in indexes:
        image_path, mask_paths = pairs[i]
        chosen = random.choices(mask_paths, k=masks_per_image)
        item = prepare_image(
            read_image(image_path),
            [read_mask(p) for p in chosen],
            config.image_size,
            config.pixel_mean,
            config.pixel_std,
        )
        images.append(item.image)
        labels.append(item.masks.float())
        boxes.append(item.boxes)
    return torch.stack(images), torch.stack(labels), torch.stack(boxes)


def published_step(model: SamMed2D, optimizer, images, labels, boxes, iterations: int = 8) -> float:
    b, k, s, _ = labels.shape
    labels = labels.reshape(b * k, 1, s, s)
    boxes = boxes.reshape(b * k, 4)
    use_box = random.random() > 0.5
    for name, value in model.image_encoder.named_parameters():
        value.requires_grad = "Adapter" in name
    embeddings = published_reference.encode(model.image_encoder, images)
    embeddings = torch.cat([embeddings[i].repeat(k, 1, 1, 1) for i in range(b)], dim=0)
    coords = point_labels = None
    if use_box:
        box_rows = boxes + torch.randint(-5, 5, (b * k, 1)).float().repeat(1, 4).to(boxes.device)
    else:
        box_rows = None
        coords = torch.stack([torch.nonzero(m[0])[random.randrange(int(m.sum()))].flip(0) for m in labels])[:, None]
        coords = coords.float()
        point_labels = torch.ones(b * k, 1, dtype=torch.int, device=labels.device)
    masks, low_res, iou = _decode(model, embeddings, coords, point_labels, box_rows, None, True)
    loss = published_loss(masks, labels, iou)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    embeddings = embeddings.detach().clone()
    for name, value in model.named_parameters():
        value.requires_grad = "image_encoder" not in name
    mask_only = np.random.randint(1, iterations - 1)
    coords, point_labels = _select_random_points(
        (torch.sigmoid(masks) > 0.5).float(), labels, random.choice([1, 3, 5, 9])
    )
    mask_inputs = torch.sigmoid(low_res.detach())
    for step in range(iterations):
        if step == mask_only or step == iterations - 1:
            coords = point_labels = None
        masks, low_res, iou = _decode(model, embeddings, coords, point_labels, None, mask_inputs, False)
        loss = published_loss(masks, labels, iou)
        loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        if step != iterations - 1:
            pred = (torch.sigmoid(masks.detach()) > 0.5).float()
            coords, point_labels = _select_random_points(pred, labels, random.choice([1, 3, 5, 9]))
            mask_inputs = torch.sigmoid(low_res.detach())
    return float(loss.detach())
