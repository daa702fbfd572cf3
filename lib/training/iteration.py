"""The simulated-annotator iteration (:class:`SimulatedAnnotator`): what the paper trains with. Per batch it makes
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

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lib.modeling import SamMed2D
from lib.serving.decoding import ServedDecoding
from lib.serving.prompts import PromptRandom, error_clicks, jitter_boxes, random_points
from lib.training.distributed import average_gradients
from lib.training.losses import FocalDiceIoULoss
from lib.training.recipe import RecipeConfig, parameter_groups, train_only


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
        train_only(model, ("adapters", "prompt_encoder", "mask_decoder"))
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
        train_only(model, ("mask_decoder",))
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
