"""The paper's evaluation protocol: box, then 1, 3 and 5 accumulated clicks, Dice per mask.

For every image (preprocessed with :func:`lib.preprocessing.preprocess_image`, encoded once, all its masks decoded
together as prompt rows):

* ``box``: the box around the mask's largest component in the input frame, no jitter, one decoding;
* ``N points``: one random foreground click, then ``N - 1`` more clicks, each drawn uniformly from the error region of
  the current prediction (:func:`lib.prompts.error_clicks`), accumulated, with the previous mask (sigmoid of its
  64x64 logits) as a prompt. The 3- and 5-point results are the same click sequence read at 3 and 5 clicks, which
  is how an annotator would continue.

Dice is measured per mask in the original image (logits mapped back with the frame geometry, threshold 0) and
averaged over masks. Draws come from a seeded :class:`lib.prompts.PromptRandom`, so two runs agree.

Command line (prints the paper's table for a checkpoint and a dataset in the SAM-Med2D layout)::

    python -m lib.evaluation --checkpoint sam-med2d_b.pth --data <dir> [--split test] [--config vit_b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import dice_per_mask
from .modeling import SamMed2D
from .preprocessing import PolicyName, preprocess_image
from .prompts import PromptRandom, error_clicks, largest_component_box, random_points


@dataclasses.dataclass
class EvalSample:
    """One image ``(H, W, 3)`` uint8 RGB with its masks ``(M, H, W)`` bool."""

    image: np.ndarray
    masks: np.ndarray
    name: str = ""


def mode_names(points: Sequence[int], box: bool = True) -> list[str]:
    return (["box"] if box else []) + [f"{n} point" + ("s" if n > 1 else "") for n in points]


@torch.no_grad()
def evaluate_model(
    model: SamMed2D,
    samples: Iterable[EvalSample],
    points: Sequence[int] = (1, 3, 5),
    box: bool = True,
    seed: int = 0,
    policy: PolicyName = "evaluation",
    multimask: bool = True,
) -> dict[str, object]:
    """Run the protocol; returns ``{"dice": {mode: mean}, "per_mask": {mode: [dice...]}, "masks": count, ...}``."""
    was_training = model.training
    model.eval()
    cfg = model.config
    rng = PromptRandom(seed)
    names = mode_names(points, box)
    per_mask: dict[str, list[float]] = {name: [] for name in names}
    most_points = max(points) if points else 0
    images = 0
    start = time.perf_counter()
    device = model.device
    for sample in samples:
        images += 1
        tensor, geometry = preprocess_image(
            sample.image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, policy, device=device
        )
        original = torch.as_tensor(np.asarray(sample.masks, dtype=bool), device=device)
        in_frame = geometry.masks_to_input(original[:, None].float())[:, 0] > 0
        embedding = model.encode(tensor)
        pe = model.prompt_encoder.get_dense_pe()

        def dice(low_res: torch.Tensor, original: torch.Tensor = original, geometry=geometry) -> list[float]:
            return dice_per_mask(geometry.masks_to_original(low_res.float()) > 0, original).tolist()

        if box:
            boxes = torch.as_tensor(np.stack([largest_component_box(m) for m in in_frame.cpu().numpy()]), device=device)
            low_res, _ = model.decode(embedding, boxes=boxes, multimask_output=multimask, image_pe=pe)
            per_mask["box"].extend(dice(low_res))
        if most_points:
            coords, labels = random_points(in_frame, rng, 1)
            coords, labels = coords.to(device), labels.to(device)
            mask_inputs = None
            for clicks in range(1, most_points + 1):
                if clicks > 1:
                    upsampled = F.interpolate(
                        low_res.float(), in_frame.shape[-2:], mode="bilinear", align_corners=False
                    )
                    new_coords, new_labels = error_clicks(upsampled[:, 0] > 0, in_frame, 1, rng)
                    coords = torch.cat([coords, new_coords.to(device)], dim=1)
                    labels = torch.cat([labels, new_labels.to(device)], dim=1)
                    mask_inputs = torch.sigmoid(low_res.float())
                low_res, _ = model.decode(embedding, coords, labels, None, mask_inputs, multimask, image_pe=pe)
                if clicks in points:
                    per_mask[names[len(names) - len(points) + list(points).index(clicks)]].extend(dice(low_res))
    model.train(was_training)
    return {
        "dice": {name: float(np.mean(v)) if v else float("nan") for name, v in per_mask.items()},
        "per_mask": per_mask,
        "masks": len(next(iter(per_mask.values()))) if per_mask else 0,
        "images": images,
        "seconds": time.perf_counter() - start,
        "seed": seed,
    }


def samples_from_layout(root: str | Path, split: str = "test", max_images: int = 0) -> list[EvalSample]:
    """Evaluation samples from a dataset in the SAM-Med2D layout (``test``: ``label2image_test.json``)."""
    from .training import read_image, read_layout, read_mask

    pairs = read_layout(root, split)
    if max_images:
        pairs = pairs[:max_images]
    return [
        EvalSample(read_image(image), np.stack([read_mask(m) for m in masks]), name=str(image))
        for image, masks in pairs
    ]


def format_table(results: dict[str, dict[str, object]]) -> str:
    """A text table: one row per evaluated model, Dice % per mode."""
    first = next(iter(results.values()))
    modes = list(first["dice"])
    header = f"| {'model':<28} | " + " | ".join(f"{m:>8}" for m in modes) + " | masks |"
    rule = "|" + "-" * 30 + "|" + "|".join("-" * 10 for _ in modes) + "|-------|"
    rows = [
        f"| {name:<28} | " + " | ".join(f"{100 * r['dice'][m]:8.2f}" for m in modes) + f" | {r['masks']:5d} |"
        for name, r in results.items()
    ]
    return "\n".join([header, rule, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(prog="python -m lib.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights (published, train-script, state dict or SAM)")
    parser.add_argument("--data", required=True, help="dataset folder in the SAM-Med2D layout")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="which layout JSON to read")
    parser.add_argument("--config", default="vit_b", help="model config: vit_b, vit_l, vit_h or a JSON path")
    parser.add_argument("--no-adapters", action="store_true", help="switch the adapters off (SAM-Med2D*)")
    parser.add_argument("--points", default="1,3,5", help="click counts to report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results (with per-mask Dice) to this file")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.config, device=args.device, adapters=not args.no_adapters)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        samples = samples_from_layout(args.data, args.split, args.max_images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    points = tuple(int(p) for p in args.points.split(",") if p)
    result = evaluate_model(model, samples, points, seed=args.seed)
    name = Path(args.checkpoint).name + (" (no adapters)" if args.no_adapters else "")
    print(f"{result['images']} images, {result['masks']} masks, seed {args.seed}, {result['seconds']:.1f} s")
    print(format_table({name: result}))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
