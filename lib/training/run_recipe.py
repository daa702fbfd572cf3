"""Command-line training with the paper's recipe (or any recipe), one process or many through ``torchrun``.

    torchrun --nproc_per_node 8 -m lib.training.run_recipe --config sam_med2d_paper \\
        --data <dir in the SAM-Med2D layout> --checkpoint sam_vit_b_01ec64.pth --output runs/paper

    python -m lib.training.run_recipe --config continual --data <dir> --checkpoint sam-med2d_b.pth \\
        --model-config vit_b --set epochs=2 --set lr=5e-5 --output runs/ft

Each process trains on its share of every global batch (``batch_size`` images per process; NCCL on CUDA, gloo on
CPU), gradients are averaged after each of the nine optimizer steps per batch. After every epoch, rank 0 evaluates
the held-out split (``label2image_test.json``, the paper's protocol: box, 1, 3, 5 clicks) and writes
``epoch_NN.pt`` (a plain state dict), ``best.pt`` and ``metrics.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.common.atomic_files import write_json_atomic  # noqa: E402
from lib.io.checkpoint import load_model, save_state_dict  # noqa: E402
from lib.modeling.config import resolve_config  # noqa: E402
from lib.training.data import SamMed2DDataset, read_layout  # noqa: E402
from lib.training.evaluation import evaluate_model, format_table, samples_from_layout  # noqa: E402
from lib.training.loop import BestEpoch, fit  # noqa: E402
from lib.training.recipe import RECIPES, recipe  # noqa: E402


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.training.run_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sam_med2d_paper", choices=sorted(RECIPES), help="training recipe")
    parser.add_argument("--data", required=True, help="dataset folder in the SAM-Med2D layout")
    parser.add_argument("--checkpoint", help="starting weights (default: the recipe's checkpoint)")
    parser.add_argument("--model-config", default="vit_b", help="vit_b, vit_l, vit_h or a config JSON")
    parser.add_argument("--output", required=True, help="folder for checkpoints and metrics")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--no-cache", action="store_true", help="do not keep preprocessed images in memory")
    parser.add_argument("--progress", action="store_true", help="print the loss every 20 iterations")
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    try:
        config = recipe(args.config, parse_overrides(args.set))
        checkpoint = args.checkpoint or config.checkpoint
        config = config.with_overrides({"checkpoint": str(checkpoint), "model_config": str(args.model_config)})
        model_config = resolve_config(args.model_config)
        model = load_model(checkpoint, model_config, device=device)
        pairs = read_layout(args.data, "train")
        dataset = SamMed2DDataset(
            pairs,
            model_config.image_size,
            model_config.pixel_mean,
            model_config.pixel_std,
            masks_per_image=config.masks_per_image,
            seed=config.seed,
            cache=not args.no_cache,
        )
        output = Path(args.output)
        samples = []
        if rank == 0:
            output.mkdir(parents=True, exist_ok=True)
            try:
                samples = samples_from_layout(args.data, "test", config.val_max_images)
            except FileNotFoundError:
                print("no label2image_test.json: training without validation", flush=True)
        metrics: dict = {"recipe": config.to_dict(), "world_size": world, "epochs": []}
        best = BestEpoch(output / "best.pt")

        def on_epoch(epoch: int, engine) -> None:
            if rank != 0:
                return
            history = engine.state.history
            row = {
                "epoch": epoch,
                "loss": history["epoch_loss"][-1],
                "images_per_second": history["images_per_second"][-1],
            }
            save_state_dict(model, output / f"epoch_{epoch:02d}.pt")
            if samples:
                result = evaluate_model(model, samples, config.val_points, seed=config.seed)
                row["val_dice"] = result["dice"]
                print(format_table({f"epoch {epoch}": result}), flush=True)
                best.update(epoch, sum(result["dice"].values()) / len(result["dice"]), model)
            metrics["epochs"].append(row)
            write_json_atomic(output / "metrics.json", metrics)

        fit(model, dataset, config, on_epoch=on_epoch, rank=rank, world_size=world, progress=args.progress)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
