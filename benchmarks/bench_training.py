"""Training benchmark: throughput of the simulated-annotator iteration and a learning curve on HC18.

Throughput (CPU, images/s, one process): the small model of the reference (encoder 192 wide, depth 6, 3 heads,
global attention in blocks 2 and 5, adapters, standard 256-wide decoder) and ViT-B, batch 2 images x 5 masks.

Learning curve: HC18 (../shared/data/hc18, one image per subject) split by subject into 160 training and 40
held-out images (seeded); the small model trained from scratch (seed 0, default init) for 5 epochs with the
reference's settings (batch 2, 5 masks per image, Adam 1e-4, 2 threads), then fine-tuned from its last epoch with
the app's ``continual`` recipe. After every epoch the held-out images are evaluated with the paper's protocol
(:mod:`lib.evaluation`: box, 1, 3 and 5 clicks, seed 0). Prints tables; writes ``benchmarks/results/
training_curve.png`` and ``training_curve.json``.

    .venv/bin/python -m benchmarks.bench_training                 # everything (about 15 min on 2 cores)
    .venv/bin/python -m benchmarks.bench_training --skip-curve    # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.build import build_model  # noqa: E402
from lib.config import SamMed2DConfig  # noqa: E402
from lib.evaluation import EvalSample, evaluate_model  # noqa: E402
from lib.training import (  # noqa: E402
    SamMed2DDataset,
    SimulatedAnnotator,
    configure_cpu_math,
    fit,
    make_optimizer,
    read_image,
    read_mask,
    recipe,
)

HC18 = ROOT.parent / "shared" / "data" / "hc18"
RESULTS = ROOT / "benchmarks" / "results"
SMALL = SamMed2DConfig(encoder_embed_dim=192, encoder_depth=6, encoder_num_heads=3, encoder_global_attn_indexes=(2, 5))
# The reference: the published training loop, same config and data, on this machine (2 threads).
REFERENCE_IMAGES_PER_SECOND = 0.76
REFERENCE_DICE = {1: (0.674, 0.577, 0.671), 3: (0.762, 0.829, 0.836), 5: (0.874, 0.871, 0.900)}


def hc18_split(held_out: int = 40, seed: int = 0) -> tuple[list, list]:
    """HC18 pairs split by subject (the numeric file prefix) into training and held-out lists."""
    images = sorted((HC18 / "images").glob("*.png"))
    subjects = sorted({p.name.split("_")[0] for p in images})
    order = np.random.default_rng(seed).permutation(len(subjects))
    held = {subjects[i] for i in order[:held_out]}
    pairs = [(p, [HC18 / "masks" / p.name]) for p in images]
    train = [pair for pair in pairs if pair[0].name.split("_")[0] not in held]
    test = [pair for pair in pairs if pair[0].name.split("_")[0] in held]
    return train, test


def _throughput_worker(variant: str, model_name: str, batches: int, threads: int, queue) -> None:
    """One measurement in a fresh process: ``ours`` or ``published`` loop, seconds per batch of 2 images x 5 masks."""
    import random

    from benchmarks.published_training_loop import load_batch, published_step

    torch.set_num_threads(threads)
    if variant == "ours":
        configure_cpu_math()  # part of our loop; the published loop runs with the process defaults
    config = SMALL if model_name == "small" else SamMed2DConfig()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = build_model(config)
    pairs, _ = hc18_split()
    pairs = pairs[: 2 * batches]
    times = []
    if variant == "ours":
        dataset = SamMed2DDataset(pairs, config.image_size, masks_per_image=5)
        dataset.prepare_all()  # pre-curated once (the trainer caches); the published loop's reading is not timed
        cfg = recipe("continual", {"batch_size": 2, "amp": False})
        optimizer = make_optimizer(model, cfg)
        annotator = SimulatedAnnotator(cfg)
        for i in range(batches):
            batch = torch.utils.data.default_collate([dataset[2 * i], dataset[2 * i + 1]])
            start = time.perf_counter()
            annotator(model, optimizer, batch["image"], batch["label"], batch["box"])
            times.append(time.perf_counter() - start)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for i in range(batches):
            images, labels, boxes = load_batch(pairs, [2 * i, 2 * i + 1], config)
            start = time.perf_counter()
            published_step(model, optimizer, images, labels, boxes)
            times.append(time.perf_counter() - start)
    queue.put(float(np.median(times[1:])))  # the first batch warms up allocators and oneDNN kernels


def throughput(model_name: str, batches: int, rounds: int, threads: int) -> dict:
    """Seconds per batch of both loops, alternating fresh processes so that both see the same machine load."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    seconds: dict[str, list[float]] = {"ours": [], "published": []}
    for _ in range(rounds):
        for variant in ("ours", "published"):
            queue = ctx.Queue()
            process = ctx.Process(target=_throughput_worker, args=(variant, model_name, batches, threads, queue))
            process.start()
            seconds[variant].append(queue.get())
            process.join()
    ours, published = float(np.median(seconds["ours"])), float(np.median(seconds["published"]))
    return {
        "model": model_name,
        "ours_images_per_second": 2 / ours,
        "published_images_per_second": 2 / published,
        "speedup": published / ours,
        "seconds": seconds,
    }


def evaluation_samples(pairs: list) -> list[EvalSample]:
    return [EvalSample(read_image(i), np.stack([read_mask(m) for m in ms]), str(i)) for i, ms in pairs]


def curve(epochs: int, finetune_epochs: int, train_pairs: list, test_pairs: list, out: Path, seed: int = 0) -> dict:
    samples = evaluation_samples(test_pairs)
    torch.manual_seed(seed)
    model = build_model(SMALL)
    rows: list[dict] = []

    def record(stage: str, epoch: int, history: dict | None = None) -> None:
        result = evaluate_model(model, samples, (1, 3, 5), seed=0)
        row = {"stage": stage, "epoch": epoch, **{k: float(v) for k, v in result["dice"].items()}}
        if history is not None:
            row["images_per_second"] = history["images_per_second"][-1]
            row["train_loss"] = history["epoch_loss"][-1]
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("scratch", 0)
    dataset = SamMed2DDataset(train_pairs, SMALL.image_size, masks_per_image=5, seed=seed)
    dataset.prepare_all()
    scratch = recipe(
        "continual", {"epochs": epochs, "batch_size": 2, "lr": 1e-4, "amp": False, "val_split": 0, "seed": seed}
    )
    history = fit(
        model, dataset, scratch, on_epoch=_with_stats(lambda e, eng: record("scratch", e, eng)), progress=True
    )
    torch.save(model.state_dict(), out / f"small_hc18_scratch_seed{seed}.pt")
    if finetune_epochs > 0:
        finetune = recipe("continual", {"epochs": finetune_epochs, "batch_size": 2, "amp": False, "seed": seed + 1})
        fit(
            model,
            dataset,
            finetune,
            on_epoch=_with_stats(lambda e, eng: record("fine-tune", epochs + e, eng)),
            progress=True,
        )
    return {"rows": rows, "scratch_history": history}


def _with_stats(callback):
    """Adapt ``record(stage, epoch, history)`` to fit()'s ``on_epoch(epoch, engine)``."""

    def on_epoch(epoch: int, engine) -> None:
        callback(epoch, engine.state.history)

    return on_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--skip-curve", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="model init and training seed of the curve (split fixed)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds per loop (small model)")
    parser.add_argument("--models", default="small,vit_b", help="throughput models: small, vit_b or both")
    parser.add_argument("--train-images", type=int, default=0, help="use only N training images (quick check)")
    args = parser.parse_args(argv)
    if not HC18.is_dir():
        print(f"HC18 not found at {HC18}: the benchmark needs ../shared/data/hc18", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    configure_cpu_math()
    RESULTS.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = hc18_split()
    if args.train_images:
        train_pairs = train_pairs[: args.train_images]
    report: dict = {"threads": args.threads, "train_images": len(train_pairs), "held_out_images": len(test_pairs)}
    if not args.skip_throughput:
        plan = {"small": (6, args.rounds), "vit_b": (3, 1)}
        rows = [throughput(name, *plan[name], args.threads) for name in args.models.split(",")]
        report["throughput"] = rows
        load = os.getloadavg()[0]
        print(
            f"\nTraining throughput, CPU, {args.threads} threads, batch 2 images x 5 masks, 9 optimizer steps per batch"
        )
        print(f"(fresh process per measurement, alternating; median of batches 2..N; load average {load:.1f})")
        print("| model | ours img/s | published loop img/s | speedup | reference (published loop, quiet machine) |")
        print("|---|---|---|---|---|")
        for r in rows:
            ref = f"{REFERENCE_IMAGES_PER_SECOND:.2f}" if r["model"] == "small" else "-"
            print(
                f"| {r['model']} | {r['ours_images_per_second']:.3f} | {r['published_images_per_second']:.3f} | "
                f"{r['speedup']:.2f}x | {ref} |"
            )
    if not args.skip_curve:
        result = curve(args.epochs, args.finetune_epochs, train_pairs, test_pairs, RESULTS, args.seed)
        report["curve"] = result["rows"]
        print_curve(result["rows"])
        plot_curve(result["rows"], RESULTS / f"training_curve_seed{args.seed}.png")
    name = f"training_curve_seed{args.seed}.json" if not args.skip_curve else "training_throughput.json"
    (RESULTS / name).write_text(json.dumps(report, indent=1))
    return 0


def print_curve(rows: list[dict]) -> None:
    print("\nHeld-out HC18 Dice (40 subjects) by epoch; reference = published loop, same config and data")
    print("| stage | epoch | box | 1 point | 3 points | 5 points | train img/s | reference box / 1 pt / 5 pts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = REFERENCE_DICE.get(r["epoch"]) if r["stage"] == "scratch" else None
        ref_text = " / ".join(f"{v:.3f}" for v in ref) if ref else "-"
        speed = f"{r['images_per_second']:.2f}" if "images_per_second" in r else "-"
        print(
            f"| {r['stage']} | {r['epoch']} | {r['box']:.3f} | {r['1 point']:.3f} | {r['3 points']:.3f} | "
            f"{r['5 points']:.3f} | {speed} | {ref_text} |"
        )


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = [r["epoch"] for r in rows]
    for mode, colour in (("box", "C0"), ("1 point", "C1"), ("3 points", "C2"), ("5 points", "C3")):
        ax.plot(epochs, [r[mode] for r in rows], "o-", color=colour, label=f"ours: {mode}")
    ref_epochs = sorted(REFERENCE_DICE)
    for i, (mode, colour) in enumerate((("box", "C0"), ("1 point", "C1"), ("5 points", "C3"))):
        ax.plot(ref_epochs, [REFERENCE_DICE[e][i] for e in ref_epochs], "x--", color=colour, label=f"ref: {mode}")
    scratch_end = max(r["epoch"] for r in rows if r["stage"] == "scratch")
    ax.axvline(scratch_end + 0.5, color="grey", lw=0.8)
    ax.text(scratch_end + 0.6, 0.95, "fine-tune (continual)", fontsize=8, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out Dice (HC18, 40 subjects)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Small SAM-Med2D (192 wide, depth 6) on HC18: learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
