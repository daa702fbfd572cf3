"""Active-learning loop on HC18: Dice on held-out images after each retrain against the number of labels saved.

The loop is the server's, run in one process so that two strategies can be compared on the same data and seeds:

1. start from the served model (here the golden tiny network's seeded weights, or ``--checkpoint``) and the same
   ``--start`` randomly chosen labeled images for every strategy;
2. each round the strategy picks ``--step`` more images to label from the unlabeled pool: ``uncertainty`` takes the
   highest :class:`lib.loop.uncertainty.UncertaintyScorer` scores under the model that serves now (what
   ``/activelearning/sam_uncertainty`` returns), ``random`` draws at random;
3. retrain from the served model on the labeled images (:func:`lib.training.loop.fit`, the trainer's recipe with small
   settings), a quarter of them held out for validation; promote the result only if its validation Dice (box prompt,
   :func:`lib.training.evaluation.evaluate_model`) is not lower than the served model's on the same validation labels;
4. measure the served model on ``--held-out`` images never labeled (box and 1/3 clicks) and go on.

It prints a table and writes ``benchmarks/results/active_learning.{png,json}``. Run::

    .venv/bin/python -m benchmarks.bench_active_learning [--pool 40 --held-out 16 --start 4 --step 4 --max-labels 16]

Data: ../shared/data/hc18 (fetal head ultrasound, CC BY 4.0), read in place.
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

from lib.io.checkpoint import load_model  # noqa: E402
from lib.loop.uncertainty import UncertaintyConfig, UncertaintyScorer  # noqa: E402
from lib.training.data import SamMed2DDataset, read_image, read_mask  # noqa: E402
from lib.training.evaluation import EvalSample, evaluate_model  # noqa: E402
from lib.training.loop import fit  # noqa: E402
from lib.training.recipe import recipe  # noqa: E402

SHARED = Path(os.environ.get("SAM_MED2D_SHARED", ROOT.parent / "shared"))
HC18 = SHARED / "data" / "hc18"
GOLDEN = SHARED / "spec" / "golden_tiny"
RESULTS = ROOT / "benchmarks" / "results"


def _samples(paths: list[Path]) -> list[EvalSample]:
    return [EvalSample(read_image(p), read_mask(HC18 / "masks" / p.name)[None], p.stem) for p in paths]


def _box_dice(model, samples: list[EvalSample], seed: int) -> float:
    return float(evaluate_model(model, samples, points=(), box=True, seed=seed)["dice"]["box"])


def run_strategy(
    name: str, args: argparse.Namespace, seed: int, pool: list[Path], held_out: list[EvalSample]
) -> list[dict]:
    rng = np.random.default_rng(seed)
    model = load_model(args.checkpoint, args.config)
    labeled = list(rng.choice(len(pool), args.start, replace=False))
    train_cfg = recipe(
        "continual",
        {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": 2,
            "masks_per_image": 1,
            "decoder_iterations": args.decoder_iterations,
            "seed": seed,
        },
    )
    rows = []
    version = 0
    while True:
        # retrain on what is labeled, validate on a quarter of it, promote only when validation Dice does not drop
        order = [pool[i] for i in labeled]
        n_val = max(1, len(order) // 4)
        val, train = _samples(order[:n_val]), order[n_val:]
        start = time.perf_counter()
        candidate = load_model(args.checkpoint, args.config)
        candidate.load_state_dict(model.state_dict())
        dataset = SamMed2DDataset([(p, [HC18 / "masks" / p.name]) for p in train], masks_per_image=1, seed=seed)
        fit(candidate, dataset, train_cfg)
        candidate.eval()
        served_val, candidate_val = _box_dice(model, val, seed), _box_dice(candidate, val, seed)
        promoted = candidate_val >= served_val
        if promoted:
            model, version = candidate, version + 1
        result = evaluate_model(model, held_out, points=(1, 3), seed=0)
        row = {
            "strategy": name,
            "seed": seed,
            "labels": len(labeled),
            "promoted": promoted,
            "version": version,
            "val_dice_served": served_val,
            "val_dice_candidate": candidate_val,
            "held_out_dice": result["dice"],
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"{name:12} seed {seed} labels {len(labeled):3d}  {'promoted' if promoted else 'kept    '} v{version}  "
            f"val {served_val:.3f}->{candidate_val:.3f}  held-out box {result['dice']['box']:.3f} "
            f"1pt {result['dice']['1 point']:.3f} 3pt {result['dice']['3 points']:.3f}  ({row['seconds']:.0f} s)",
            flush=True,
        )
        if len(labeled) >= args.max_labels:
            return rows
        unlabeled = [i for i in range(len(pool)) if i not in labeled]
        if name == "uncertainty":
            scorer = UncertaintyScorer(model.eval(), UncertaintyConfig(seed=seed))
            scores = {i: scorer.score(read_image(pool[i])).score for i in unlabeled}
            picks = sorted(unlabeled, key=lambda i: -scores[i])[: args.step]
        else:
            picks = list(rng.choice(unlabeled, min(args.step, len(unlabeled)), replace=False))
        labeled += picks


def aggregate(rows: list[dict], mode: str) -> dict[str, list[dict]]:
    """Per strategy and label count: mean, min and max over seeds of the held-out Dice of ``mode``."""
    out: dict[str, list[dict]] = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        counts = sorted({r["labels"] for r in rows if r["strategy"] == strategy})
        out[strategy] = []
        for n in counts:
            values = [r["held_out_dice"][mode] for r in rows if r["strategy"] == strategy and r["labels"] == n]
            out[strategy].append(
                {
                    "labels": n,
                    "mean": float(np.mean(values)),
                    "min": min(values),
                    "max": max(values),
                    "runs": len(values),
                }
            )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(rows[0]["held_out_dice"])
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), sharey=True)
    for ax, mode in zip(np.atleast_1d(axes), modes):
        for strategy, curve in aggregate(rows, mode).items():
            labels = [c["labels"] for c in curve]
            ax.plot(labels, [c["mean"] for c in curve], "o-", label=f"{strategy} (mean of {curve[0]['runs']} seeds)")
            ax.fill_between(labels, [c["min"] for c in curve], [c["max"] for c in curve], alpha=0.2)
        ax.set_title(f"held-out Dice, {mode}")
        ax.set_xlabel("labels saved")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Dice")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_active_learning", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", default=str(GOLDEN / "weights.pth"), help="starting weights")
    parser.add_argument("--config", default=str(GOLDEN / "meta.json"), help="network config (name or JSON)")
    parser.add_argument("--pool", type=int, default=40, help="unlabeled images the strategies choose from")
    parser.add_argument("--held-out", type=int, default=16, help="images never labeled, for the Dice curve")
    parser.add_argument("--start", type=int, default=4, help="labels before the first retrain (same for all)")
    parser.add_argument("--step", type=int, default=4, help="labels saved between retrains")
    parser.add_argument("--max-labels", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--decoder-iterations", type=int, default=2)
    parser.add_argument("--strategies", default="uncertainty,random")
    parser.add_argument("--seeds", default="0,1,2", help="one loop per seed (initial labels, training, random picks)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if not HC18.is_dir():
        print(f"error: HC18 data not found at {HC18} (it ships in the project's shared/ folder)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    images = sorted((HC18 / "images").glob("*_HC.png"))
    order = np.random.default_rng(1234).permutation(len(images))
    held_out_paths = [images[i] for i in order[: args.held_out]]
    pool = [images[i] for i in order[args.held_out : args.held_out + args.pool]]
    held_out = _samples(held_out_paths)
    print(
        f"HC18: pool {len(pool)}, held-out {len(held_out)}; start {args.start}, +{args.step} per round up to "
        f"{args.max_labels}; {args.epochs} epochs, lr {args.lr}, decoder iterations {args.decoder_iterations}; "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        for strategy in args.strategies.split(","):
            rows += run_strategy(strategy, args, seed, pool, held_out)
    modes = list(rows[0]["held_out_dice"])
    print("\n| strategy | labels | promoted runs | " + " | ".join(f"Dice {m} (mean [min, max])" for m in modes) + " |")
    print("|---|---:|---:|" + "---:|" * len(modes))
    curves = {m: aggregate(rows, m) for m in modes}
    for strategy in curves[modes[0]]:
        for i, point in enumerate(curves[modes[0]][strategy]):
            n = point["labels"]
            promoted = sum(r["promoted"] for r in rows if r["strategy"] == strategy and r["labels"] == n)
            cells = " | ".join(
                f"{curves[m][strategy][i]['mean']:.3f} [{curves[m][strategy][i]['min']:.3f}, "
                f"{curves[m][strategy][i]['max']:.3f}]"
                for m in modes
            )
            print(f"| {strategy} | {n} | {promoted}/{point['runs']} | {cells} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "active_learning.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    plot(rows, RESULTS / "active_learning.png")
    print(f"\nwrote {RESULTS / 'active_learning.png'} and {RESULTS / 'active_learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
