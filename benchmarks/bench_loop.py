"""The learning loop as an annotator sees it: labels saved through REST, retraining, held-out Dice through REST.

Run: ``.venv/bin/python -m benchmarks.bench_loop [--labels 40 --retrain-after 20]`` (the active-learning loop) or
``.venv/bin/python -m benchmarks.bench_loop --mode train --labels 100 --train-params '{"max_epochs": 2}'`` (one
``POST /train`` on all saved labels).

Starts the real server (``monailabel start_server``) with the small SAM-Med2D of ``benchmarks/bench_training.py``
(encoder 192 wide, depth 6) from its seeded initialisation (no checkpoint) on a datastore of HC18 fetal-head
ultrasound images (``../shared/data/hc18``, CC BY 4.0), split by subject into a pool whose expert masks the annotator
saves and ``--held-out`` subjects that are never labelled. On the held-out images, a simulated annotator
(:class:`lib.loop.rest_annotator.RestAnnotator`) draws the box around the expert mask, then clicks 5 times (the most
interior pixel of the mask, then of the larger error region of the answer it got), with the server's default request
parameters, and scores every answer with Dice. That is measured before any label, and after each retraining run.

In ``loop`` mode the labels are saved one by one with ``PUT /datastore/label`` and the server retrains by itself
every ``--retrain-after`` labels (``--conf retrain_after_labels``); in ``train`` mode all labels are saved, then one
``POST /train/sam_med2d`` runs. Each row also shows the trainer's own validation (its held-out share of the saved
labels, decoded the way the server decodes): the served model's and the best epoch's mean Dice.

Prints a table; writes ``benchmarks/results/bench_loop_<mode>.json`` and a plot of Dice against labels saved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_training import HC18, RESULTS, hc18_split, write_small_config  # noqa: E402
from lib.loop.rest_annotator import RestAnnotator  # noqa: E402
from scripts.monailabel_server import server_log, start_server, stop_server  # noqa: E402

MODES = ("box", "1 point", "2 points", "3 points", "4 points", "5 points")


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 0


def retraining(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=60).json()["retraining"]


def wait_for_run(url: str, runs_before: int, timeout: float) -> dict:
    """Wait until the server has finished one more training run than ``runs_before``; returns its history entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = retraining(url)
        if state["running"] is None and len(state["history"]) > runs_before:
            return state["history"][-1]
        time.sleep(2)
    raise TimeoutError(f"no training run ended within {timeout:.0f} s; server log:\n{server_log(url)[-4000:]}")


def trainer_validation(model_dir: Path) -> dict:
    """The last run's own validation (``train_stats.json``): served model and best epoch, mean Dice and box Dice."""
    path = model_dir / "train" / "train_stats.json"
    if not path.is_file():
        return {}
    stats = json.loads(path.read_text())
    out: dict = {"val_images": stats.get("val_images")}
    if "served" in stats and "dice" in stats["served"]:
        out["served"] = stats["served"]["dice"]
    best = [e for e in stats.get("epochs", []) if e.get("epoch") == stats.get("best_epoch")]
    if best:
        out["best_epoch"] = best[0]["val"]["dice"]
    return out


def run(args: argparse.Namespace) -> list[dict]:
    pool, held = hc18_split(held_out=args.held_out, seed=0)
    pool = pool[: args.labels]
    held_cases = [(image.stem, read_mask(masks[0])) for image, masks in held]
    work = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    studies = work / "studies"
    studies.mkdir()
    for image, _ in pool + held:
        (studies / image.name).symlink_to(image)
    model_dir = work / "model"
    conf = {
        "model": write_small_config(work / "small.json"),
        "model_dir": model_dir,
        "download": "false",
        "device": "cpu",
        "retrain_poll_seconds": 1,
        "retrain_params": json.dumps(json.loads(args.train_params), separators=(",", ":")),
    }
    if args.mode == "loop":
        conf["retrain_after_labels"] = args.retrain_after
    # Scoring unlabeled images after every promotion would share the two cores with the measurements.
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    url = start_server("apps/sam_med2d", studies, conf, env=env)
    annotator = RestAnnotator(url)
    rows: list[dict] = []

    def measure(labels: int, run_entry: dict | None) -> None:
        start = time.perf_counter()
        result = annotator.held_out_dice(held_cases, clicks=5)
        row = {
            "labels": labels,
            "version": requests.get(f"{url}/info/", timeout=60).json()["sam_med2d"]["model_version"],
            "run": run_entry.get("status") if run_entry else None,
            "rest": result["dice"],
            "trainer": trainer_validation(model_dir) if run_entry else {},
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(format_row(row), flush=True)

    try:
        print(header(), flush=True)
        measure(0, None)
        runs = 0
        for n, (image, masks) in enumerate(pool, 1):
            annotator.save_label(image.stem, read_mask(masks[0]))
            if args.mode == "loop" and n % args.retrain_after == 0:
                entry = wait_for_run(url, runs, args.run_timeout)
                runs += 1
                measure(n, entry)
        if args.mode == "train":
            params = json.loads(args.train_params)
            response = requests.post(f"{url}/train/sam_med2d", json=params, timeout=60)
            response.raise_for_status()
            measure(len(pool), wait_for_run(url, runs, args.run_timeout))
    finally:
        stop_server(url)
    return rows


def header() -> str:
    cols = " | ".join(f"{m:>8}" for m in MODES)
    return (
        f"| labels | {'served':<28} | run          | {cols} | trainer: served / best epoch |\n"
        f"|-------:|{'-' * 30}|--------------|" + "|".join("-" * 10 for _ in MODES) + "|------------------------------|"
    )


def format_row(row: dict) -> str:
    cols = " | ".join(f"{row['rest'][m]:8.3f}" for m in MODES)
    trainer = row["trainer"]
    gate = ""
    if "served" in trainer and "best_epoch" in trainer:
        gate = f"{trainer['served']['mean']:.3f} / {trainer['best_epoch']['mean']:.3f}"
    return f"| {row['labels']:6d} | {row['version'][:28]:<28} | {str(row['run'] or ''):<12} | {cols} | {gate:<28} |"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["labels"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, style in (("box", "o-"), ("1 point", "s--"), ("3 points", "^-."), ("5 points", "d-")):
        ax.plot(labels, [r["rest"][mode] for r in rows], style, label=f"REST, {mode}")
    gate = [(r["labels"], r["trainer"]["best_epoch"]["mean"]) for r in rows if "best_epoch" in r["trainer"]]
    if gate:
        ax.plot(*zip(*gate, strict=True), "kx:", label="trainer's validation (mean)")
    ax.set_xlabel("labels saved through REST")
    ax.set_ylabel("held-out Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("loop", "train"), default="loop")
    parser.add_argument("--labels", type=int, default=40, help="labels the annotator saves")
    parser.add_argument("--retrain-after", type=int, default=20, help="loop mode: --conf retrain_after_labels")
    parser.add_argument("--held-out", type=int, default=30, help="held-out HC18 subjects, never labelled")
    parser.add_argument("--train-params", default="{}", help="training request / retrain_params (JSON)")
    parser.add_argument("--run-timeout", type=float, default=1800)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (its training too)")
    args = parser.parse_args(argv)
    if not (HC18 / "images").is_dir():
        print(f"error: HC18 not found at {HC18} (set SAM_MED2D_SHARED)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_loop_{args.mode}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    title = (
        f"small SAM-Med2D from its seeded init, HC18, {args.held_out} held-out subjects, REST default parameters\n"
        + (f"retrain every {args.retrain_after} labels" if args.mode == "loop" else f"POST /train {args.train_params}")
    )
    plot(rows, RESULTS / f"bench_loop_{args.mode}.png", title)
    print(f"rows: {out}; plot: {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
