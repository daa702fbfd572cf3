"""Training benchmark: throughput of the simulated-annotator iteration and a learning curve on HC18.

Throughput (CPU, images/s, one process): the small model of the reference (encoder 192 wide, depth 6, 3 heads,
global attention in blocks 2 and 5, adapters, standard 256-wide decoder) and ViT-B, batch 2 images x 5 masks.

Learning curve: HC18 (../shared/data/hc18, one image per subject) split by subject into 160 training and 40
held-out images (seeded); the small model trained from scratch (seed 0, default init) for 5 epochs with the
reference's settings (batch 2, 5 masks per image, Adam 1e-4, 2 threads), then fine-tuned from its last epoch with
the app's ``continual`` recipe. After every epoch the held-out images are evaluated with the paper's protocol
(:mod:`lib.training.evaluation`: box, 1, 3 and 5 clicks, seed 0). Prints tables; writes ``benchmarks/results/
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

from lib.modeling.build import build_model  # noqa: E402
from lib.modeling.config import SamMed2DConfig  # noqa: E402
from lib.training.data import SamMed2DDataset, read_image, read_mask  # noqa: E402
from lib.training.evaluation import EvalSample, evaluate_model  # noqa: E402
from lib.training.iteration import SimulatedAnnotator  # noqa: E402
from lib.training.loop import fit  # noqa: E402
from lib.training.recipe import configure_cpu_math, make_optimizer, recipe  # noqa: E402

HC18 = Path(os.environ.get("SAM_MED2D_SHARED", ROOT.parent / "shared")) / "data" / "hc18"
RESULTS = ROOT / "benchmarks" / "results"
SMALL = SamMed2DConfig(encoder_embed_dim=192, encoder_depth=6, encoder_num_heads=3, encoder_global_attn_indexes=(2, 5))
# The reference: the published training loop, same config and data, on this machine (2 threads).
REFERENCE_IMAGES_PER_SECOND = 0.76
REFERENCE_DICE = {1: (0.674, 0.577, 0.671), 3: (0.762, 0.829, 0.836), 5: (0.874, 0.871, 0.900)}


def write_small_config(path: Path) -> Path:
    """:data:`SMALL` as a ``--conf model`` JSON file (the server builds it from its seeded initialisation)."""
    path.write_text(json.dumps({"config": SMALL.__dict__}, default=list))
    return path


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


def curve(
    epochs: int,
    finetune_epochs: int,
    train_pairs: list,
    test_pairs: list,
    out: Path,
    seed: int = 0,
    device: str = "cpu",
    loop: str = "ours",
    rows_json: Path | None = None,
) -> dict:
    """Held-out Dice after every epoch of the small model trained from scratch by ``loop`` (``ours`` or
    ``published``), then (ours only) fine-tuned with the ``continual`` recipe. Both loops are scored by the same
    evaluator (:func:`lib.training.evaluation.evaluate_model`, seed 0). ``rows_json`` is rewritten after every epoch, so
    a run stopped early still leaves its epochs."""
    samples = evaluation_samples(test_pairs)
    torch.manual_seed(seed)
    model = build_model(SMALL).to(device)
    rows: list[dict] = []

    def record(stage: str, epoch: int, history: dict | None = None) -> None:
        result = evaluate_model(model, samples, (1, 3, 5), seed=0)
        row = {"loop": loop, "seed": seed, "stage": stage, "epoch": epoch}
        row.update({k: float(v) for k, v in result["dice"].items()})
        if history is not None:
            row["images_per_second"] = history["images_per_second"][-1]
            row["train_loss"] = history["epoch_loss"][-1]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if rows_json is not None:
            rows_json.write_text(json.dumps({"curve": rows}, indent=1))

    record("scratch", 0)
    if loop == "published":
        history = _published_fit(model, train_pairs, epochs, seed, lambda e, h: record("scratch", e, h))
        return {"rows": rows, "scratch_history": history}
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


def _published_fit(model, train_pairs: list, epochs: int, seed: int, on_epoch) -> dict:
    """The published loop's epochs: shuffled batches of 2 images x 5 masks, Adam 1e-4 over every parameter."""
    import random

    from benchmarks.published_training_loop import load_batch, published_step

    random.seed(seed)
    np.random.seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    history: dict = {"epoch_loss": [], "images_per_second": []}
    for epoch in range(1, epochs + 1):
        order = np.random.permutation(len(train_pairs))
        losses, start = [], time.perf_counter()
        for i in range(0, len(order) - 1, 2):
            images, labels, boxes = load_batch(train_pairs, order[i : i + 2], SMALL)
            losses.append(published_step(model, optimizer, images.to(device), labels.to(device), boxes.to(device)))
        history["epoch_loss"].append(float(np.mean(losses)))
        history["images_per_second"].append(2 * len(losses) / (time.perf_counter() - start))
        on_epoch(epoch, history)
    return history


def seed_study(args: argparse.Namespace) -> int:
    """Learning curves of both loops over several seeds, each (loop, seed) in its own process, ``--jobs`` at once."""
    import subprocess

    seeds = [int(s) for s in args.seeds.split(",")]
    loops = args.loops.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    jobs = [
        (loop, seed, RESULTS / f"curve_{loop}_seed{seed}_{args.device.replace(':', '')}.json")
        for seed in seeds
        for loop in loops
    ]
    running: list = []
    for loop, seed, path in jobs:
        while sum(p.poll() is None for p in running) >= args.jobs:
            time.sleep(1)
        command = [
            sys.executable,
            "-m",
            "benchmarks.bench_training",
            "--skip-throughput",
            "--loop",
            loop,
            "--seed",
            str(seed),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--epochs",
            str(args.epochs),
            "--finetune-epochs",
            "0",
            "--rows-json",
            str(path),
            "--train-images",
            str(args.train_images),
        ]
        with open(path.with_suffix(".log"), "w") as log:  # the child keeps its own descriptor
            running.append(subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + args.study_seconds if args.study_seconds else None
    for process in running:
        left = None if deadline is None else max(deadline - time.monotonic(), 1)
        try:
            process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            process.kill()  # the epochs it finished are in its rows file
    rows = [row for _, _, path in jobs if path.exists() for row in json.loads(path.read_text())["curve"]]
    report_seed_study(rows, args.device)
    return 0 if len(rows) == len(jobs) * (args.epochs + 1) else 1


def report_seed_study(rows: list[dict], device: str) -> None:
    """Tables (means over seeds, paired differences), the plot and the JSON of a seed study's rows."""
    summary = summarise_seeds(rows)
    print_seed_study(summary, device)
    paired = paired_differences(rows)
    print_paired(paired)
    plot_seed_study(summary, RESULTS / f"training_curve_seeds_{device.replace(':', '')}.png")
    (RESULTS / f"training_curve_seeds_{device.replace(':', '')}.json").write_text(
        json.dumps({"rows": rows, "summary": summary, "ours_minus_published": paired}, indent=1)
    )


MODES = ("box", "1 point", "3 points", "5 points")


def summarise_seeds(rows: list[dict]) -> dict:
    """``{loop: {epoch: {mode: [mean, sd, n]}}}`` over the seeds."""
    summary: dict = {}
    for loop in sorted({r["loop"] for r in rows}):
        per_epoch: dict = {}
        for epoch in sorted({r["epoch"] for r in rows if r["loop"] == loop}):
            chosen = [r for r in rows if r["loop"] == loop and r["epoch"] == epoch]
            per_epoch[epoch] = {
                m: [float(np.mean([r[m] for r in chosen])), float(np.std([r[m] for r in chosen])), len(chosen)]
                for m in MODES
            }
        summary[loop] = per_epoch
    return summary


def paired_differences(rows: list[dict]) -> dict:
    """``{epoch: {mode: [mean, standard error, n]}}`` of ours minus published, paired by seed (a seed gives both
    loops the same initial weights, so pairing removes the initialisation's share of the spread)."""
    by_key = {(r["loop"], r["seed"], r["epoch"]): r for r in rows}
    paired: dict = {}
    for epoch in sorted({r["epoch"] for r in rows}):
        seeds = [s for (loop, s, e) in by_key if loop == "ours" and e == epoch and ("published", s, e) in by_key]
        if len(seeds) < 2:
            continue
        paired[epoch] = {}
        for mode in MODES:
            diffs = np.array([by_key["ours", s, epoch][mode] - by_key["published", s, epoch][mode] for s in seeds])
            paired[epoch][mode] = [float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))), len(diffs)]
    return paired


def print_paired(paired: dict) -> None:
    print("\nOurs minus published, paired by seed: mean +- standard error (n seeds)")
    print("| epoch | n | box | 1 point | 3 points | 5 points |")
    print("|---|---|---|---|---|---|")
    for epoch, cells in paired.items():
        values = " | ".join(f"{cells[m][0]:+.3f} +- {cells[m][1]:.3f}" for m in MODES)
        print(f"| {epoch} | {cells['box'][2]} | {values} |")


def print_seed_study(summary: dict, device: str) -> None:
    print(f"\nHeld-out HC18 Dice (40 subjects), mean +- sd over seeds, small model from scratch, {device}")
    print("| epoch | loop | seeds | box | 1 point | 3 points | 5 points | reference (one published run, CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for epoch in sorted({e for per in summary.values() for e in per}):
        for loop, per_epoch in summary.items():
            if epoch not in per_epoch:
                continue
            cells = per_epoch[epoch]
            ref = REFERENCE_DICE.get(epoch)
            ref_text = " / ".join(f"{v:.3f}" for v in ref) + " (box/1/5)" if ref else "-"
            values = " | ".join(f"{cells[m][0]:.3f} +- {cells[m][1]:.3f}" for m in MODES)
            print(f"| {epoch} | {loop} | {cells['box'][2]} | {values} | {ref_text} |")


def plot_seed_study(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
    for ax, mode in zip(axes, ("box", "1 point", "5 points")):
        for (loop, per_epoch), colour in zip(summary.items(), ("C0", "C3")):
            epochs = sorted(per_epoch)
            mean = np.array([per_epoch[e][mode][0] for e in epochs])
            sd = np.array([per_epoch[e][mode][1] for e in epochs])
            ax.plot(epochs, mean, "o-", color=colour, label=f"{loop} (n={per_epoch[epochs[0]][mode][2]})")
            ax.fill_between(epochs, mean - sd, mean + sd, color=colour, alpha=0.15)
        index = ("box", "1 point", "5 points").index(mode)
        ref_epochs = sorted(REFERENCE_DICE)
        ax.plot(ref_epochs, [REFERENCE_DICE[e][index] for e in ref_epochs], "kx--", label="reference run")
        ax.set_title(mode)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out Dice (mean +- sd over seeds)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Small SAM-Med2D on HC18 from scratch: our loop against the published loop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


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
    parser.add_argument("--device", default="cpu", help="device of the learning curve (cpu, cuda)")
    parser.add_argument("--loop", choices=("ours", "published"), default="ours", help="training loop of the curve")
    parser.add_argument("--rows-json", default="", help="write the curve's report here (one seed-study job)")
    parser.add_argument("--seeds", default="", help="seed study: comma-separated seeds, each loop and seed a process")
    parser.add_argument("--loops", default="ours,published", help="seed study: loops to compare")
    parser.add_argument("--jobs", type=int, default=2, help="seed study: processes at once")
    parser.add_argument("--study-seconds", type=float, default=0, help="seed study: stop jobs after this long")
    parser.add_argument(
        "--merge-rows", default="", help="seed study: report the rows of these comma-separated JSON files (no training)"
    )
    args = parser.parse_args(argv)
    if not HC18.is_dir():
        print(f"HC18 not found at {HC18}: the benchmark needs ../shared/data/hc18", file=sys.stderr)
        return 2
    if args.merge_rows:
        merged = {}  # a later file's (loop, seed) replaces an earlier one's: a rerun that went further
        for name in args.merge_rows.split(","):
            document = json.loads(Path(name).read_text())
            file_rows = document.get("rows") or document.get("curve") or []
            for key in {(r["loop"], r["seed"]) for r in file_rows}:
                merged[key] = [r for r in file_rows if (r["loop"], r["seed"]) == key]
        RESULTS.mkdir(parents=True, exist_ok=True)
        report_seed_study([r for key in sorted(merged) for r in merged[key]], args.device)
        return 0
    if args.seeds:
        return seed_study(args)
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
        result = curve(
            args.epochs,
            args.finetune_epochs,
            train_pairs,
            test_pairs,
            RESULTS,
            args.seed,
            args.device,
            args.loop,
            Path(args.rows_json) if args.rows_json else None,
        )
        report["curve"] = result["rows"]
        if args.rows_json:
            return 0
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
