"""The reduced-precision encoders as an annotator gets them: held-out HC18 Dice through REST, per precision.

Run: ``.venv/bin/python -m benchmarks.bench_precision [--precisions fp32 int8 bf16] [--held-out 40]``

For each precision, starts the real server (``monailabel start_server``) with ``--conf encoder_precision`` on the
small SAM-Med2D that ``python -m benchmarks.bench_training`` trains on HC18 (``--checkpoint``; about 7 minutes on 2
cores) and a datastore of the held-out HC18 subjects (``../shared/data/hc18``, CC BY 4.0) it never saw. A simulated
annotator (:class:`lib.loop.rest_annotator.RestAnnotator`) draws the box around the expert mask, then clicks 5
times, with the server's default request parameters, and scores every answer with Dice against the expert mask.

Prints the mean Dice per prompt and its change against fp32 (the bar for a default-on precision: below 0.005) and
how long each annotation series took; writes ``benchmarks/results/bench_precision.json``.
``benchmarks/bench_model.py`` prints the same precisions' Dice change in one process with the paper's protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_loop import MODES, read_mask  # noqa: E402
from benchmarks.bench_model import HC18_CHECKPOINT  # noqa: E402
from benchmarks.bench_training import HC18, RESULTS, hc18_split, write_small_config  # noqa: E402
from lib.loop.rest_annotator import RestAnnotator  # noqa: E402
from scripts.monailabel_server import start_server, stop_server  # noqa: E402


def rest_dice(precision: str, checkpoint: Path, held_out: int, work: Path) -> dict:
    """Held-out Dice per prompt mode through a server with ``encoder_precision`` = ``precision``."""
    _, held = hc18_split(held_out=held_out, seed=0)
    studies = work / f"studies_{precision}"
    studies.mkdir()
    for image, _ in held:
        (studies / image.name).symlink_to(image)
    conf = {
        "model": write_small_config(work / "small.json"),
        "checkpoint": checkpoint,
        "model_dir": work / f"model_{precision}",
        "download": "false",
        "device": "cpu",
        "encoder_precision": precision,
    }
    # No start-up scoring: it would share the two cores with the annotator and change nothing it measures.
    url = start_server("apps/sam_med2d", studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        start = time.perf_counter()
        result = RestAnnotator(url).held_out_dice([(image.stem, read_mask(masks[0])) for image, masks in held])
        return {"dice": result["dice"], "images": len(held), "seconds": round(time.perf_counter() - start, 1)}
    finally:
        stop_server(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "bf16"])
    parser.add_argument("--held-out", type=int, default=40, help="held-out HC18 subjects (as bench_training's split)")
    parser.add_argument("--checkpoint", type=Path, default=HC18_CHECKPOINT, help="the small model bench_training wrote")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
    if not (HC18 / "images").is_dir():
        print(f"error: HC18 not found at {HC18} (set SAM_MED2D_SHARED)", file=sys.stderr)
        return 2
    if not args.checkpoint.is_file():
        print(f"error: no {args.checkpoint}: run `python -m benchmarks.bench_training` first", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    precisions = ["fp32", *(p for p in args.precisions if p != "fp32")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as work:
        for precision in precisions:
            result = results[precision] = rest_dice(precision, args.checkpoint, args.held_out, Path(work))
            print(f"{precision}: {result['images']} images in {result['seconds']} s", flush=True)
    print(f"\nheld-out HC18 Dice through REST ({args.held_out} subjects, default request parameters)\n")
    print("| encoder | " + " | ".join(f"{m:>8}" for m in MODES) + " | worst change |")
    print("|---|" + "---:|" * (len(MODES) + 1))
    fp32 = results["fp32"]["dice"]
    for precision, result in results.items():
        dice = result["dice"]
        cells = [f"{dice[m]:.4f}" + ("" if precision == "fp32" else f" ({dice[m] - fp32[m]:+.4f})") for m in MODES]
        worst = "" if precision == "fp32" else f"{min(dice[m] - fp32[m] for m in MODES):+.4f}"
        print(f"| {precision} | " + " | ".join(cells) + f" | {worst} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_precision.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
