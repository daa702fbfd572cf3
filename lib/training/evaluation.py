"""The paper's evaluation protocol, decoded exactly as the server decodes: box, then 1, 3 and 5 accumulated clicks.

For every image (preprocessed and encoded once, with the server's :class:`lib.serving.decoding.ServedDecoding`), each
mask is prompted the way an annotator prompts the server, in the image's own pixels, and decoded by
:func:`lib.serving.decoding.decode_view`, the function a click on the server runs:

* ``box``: the box around the mask's largest component, no jitter, one decoding;
* ``N points``: one foreground click, then ``N - 1`` more, each from the error region of the current prediction,
  accumulated, with the previous mask as a prompt (as the server keeps it for a client). The 3- and 5-point results
  are the same click sequence read at 3 and 5 clicks, which is how an annotator would continue.

Clicks come from one of two simulated annotators (:mod:`lib.serving.prompts`): ``random`` (the paper's: drawn uniformly
from the mask, then from the error region, from a seeded :class:`lib.serving.prompts.PromptRandom`) or ``interior``
(deterministic: the most interior pixel of the mask, then of the larger error region, as a careful annotator clicks;
what the promotion gate and ``benchmarks/bench_loop.py`` use). Dice is measured per mask in the original image and
averaged over masks.

Command line (prints the paper's table for a checkpoint and a dataset in the SAM-Med2D layout)::

    python -m lib.training.evaluation --checkpoint sam-med2d_b.pth --data <dir> \\
        [--split test] [--config vit_b] [--clicks random]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from lib.common.atomic_files import write_json_atomic
from lib.modeling import SamMed2D
from lib.serving.decoding import ServedDecoding, decode_view, prompt_independent_inputs, view_mask
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.preprocessing import preprocess_image
from lib.serving.prompts import PromptRandom, error_clicks, interior_clicks, largest_component_box, random_points
from lib.training.metrics import dice_per_mask

CLICKERS = ("random", "interior")


@dataclasses.dataclass
class EvalSample:
    """One image ``(H, W, 3)`` uint8 RGB with its masks ``(M, H, W)`` bool."""

    image: np.ndarray
    masks: np.ndarray
    name: str = ""


def mode_names(points: Sequence[int], box: bool = True) -> list[str]:
    return (["box"] if box else []) + [f"{n} point" + ("s" if n > 1 else "") for n in points]


def next_click(
    prediction: torch.Tensor, target: torch.Tensor, clicker: str, rng: PromptRandom
) -> tuple[np.ndarray, int]:
    """The simulated annotator's next click on an ``(H, W)`` prediction (all false before the first click) of an
    ``(H, W)`` target: ``(x, y)`` pixel and label (1 foreground, 0 background)."""
    if clicker == "interior":
        coords, labels = interior_clicks(prediction[None], target[None])
    elif not prediction.any():
        coords, labels = random_points(target[None], rng, 1)
    else:
        coords, labels = error_clicks(prediction[None], target[None], 1, rng)
    return coords[0, 0].cpu().numpy(), int(labels[0, 0])


def _dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(dice_per_mask(prediction[None], target[None])[0])


@torch.no_grad()
def evaluate_model(
    model: SamMed2D,
    samples: Iterable[EvalSample],
    points: Sequence[int] = (1, 3, 5),
    box: bool = True,
    seed: int = 0,
    decoding: ServedDecoding | None = None,
    clicks: str = "random",
) -> dict[str, object]:
    """Run the protocol.

    Returns ``{"dice": {mode: mean}, "per_mask": {mode: [dice...]}, "mask_images": [sample name per mask],
    "masks": count, "images": count, "seconds": s, "seed": seed, "clicks": clicks}``.
    """
    if clicks not in CLICKERS:
        raise ValueError(f"clicks must be one of {CLICKERS}, got {clicks!r}")
    decoding = decoding or ServedDecoding()
    was_training = model.training
    model.eval()
    cfg = model.config
    rng = PromptRandom(seed)
    names = mode_names(points, box)
    point_names = dict(zip(points, names[len(names) - len(points) :], strict=True))
    per_mask: dict[str, list[float]] = {name: [] for name in names}
    mask_images: list[str] = []
    most_points = max(points) if points else 0
    images = 0
    start = time.perf_counter()
    device = model.device
    for sample in samples:
        images += 1
        tensor, geometry = preprocess_image(
            sample.image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, decoding.policy, device=device
        )
        features = model.encode(tensor)
        entry = CachedEmbedding(features, geometry, prompt_independent_inputs(model, features))
        for target_np in np.asarray(sample.masks, dtype=bool):
            mask_images.append(sample.name)
            target = torch.as_tensor(target_np, device=device)
            if box:
                low_res, _ = decode_view(model, entry, decoding, box=largest_component_box(target_np))
                per_mask["box"].append(_dice(view_mask(geometry, low_res, decoding)[0], target))
            coords: list[np.ndarray] = []
            labels: list[int] = []
            prediction = torch.zeros_like(target)
            low_res = None
            for count in range(1, most_points + 1):
                xy, label = next_click(prediction, target, clicks, rng)
                coords.append(xy)
                labels.append(label)
                low_res, _ = decode_view(model, entry, decoding, np.stack(coords), np.array(labels), None, low_res)
                prediction = view_mask(geometry, low_res, decoding)[0]
                if count in point_names:
                    per_mask[point_names[count]].append(_dice(prediction, target))
    model.train(was_training)
    return {
        "dice": {name: float(np.mean(v)) if v else float("nan") for name, v in per_mask.items()},
        "per_mask": per_mask,
        "mask_images": mask_images,
        "masks": len(mask_images),
        "images": images,
        "seconds": time.perf_counter() - start,
        "seed": seed,
        "clicks": clicks,
    }


def samples_from_layout(root: str | Path, split: str = "test", max_images: int = 0) -> list[EvalSample]:
    """Evaluation samples from a dataset in the SAM-Med2D layout (``test``: ``label2image_test.json``)."""
    from lib.training.data import read_image, read_layout, read_mask

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
    from lib.io.checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(prog="python -m lib.training.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights (published, train-script, state dict or SAM)")
    parser.add_argument("--data", required=True, help="dataset folder in the SAM-Med2D layout")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="which layout JSON to read")
    parser.add_argument("--config", default="vit_b", help="model config: vit_b, vit_l, vit_h or a JSON path")
    parser.add_argument("--no-adapters", action="store_true", help="switch the adapters off (SAM-Med2D*)")
    parser.add_argument("--points", default="1,3,5", help="click counts to report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clicks", default="random", choices=CLICKERS, help="the simulated annotator's clicks")
    parser.add_argument("--preprocessing", default="evaluation", help="preprocessing policy, as the server's --conf")
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
    decoding = ServedDecoding(policy=args.preprocessing, adapters=not args.no_adapters)
    result = evaluate_model(model, samples, points, seed=args.seed, decoding=decoding, clicks=args.clicks)
    name = Path(args.checkpoint).name + (" (no adapters)" if args.no_adapters else "")
    print(f"{result['images']} images, {result['masks']} masks, seed {args.seed}, {result['seconds']:.1f} s")
    print(format_table({name: result}))
    if args.json:
        write_json_atomic(args.json, {"checkpoint": args.checkpoint, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
