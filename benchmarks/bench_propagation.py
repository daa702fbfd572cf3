"""Mask propagation through a volume: quality on a labelled brain volume, and seconds per slice.

Run: ``.venv/bin/python -m benchmarks.bench_propagation [--epochs 12] [--vit-b-slices 6]``

Quality, through the real server (``monailabel start_server``), on nilearn's MNI152 T1 template (2 mm, 99 x 117 x 95,
bundled with the nilearn wheel: no download) with its white matter probability map thresholded at 0.5 as the label:

1. the axial slices of the T1, as the server shows them (:meth:`lib.io.image_source.ImageSource.view`), are saved as
   pictures in the datastore; every second slice outside a held-out slab of ``2 * --slab + 1`` slices around the
   middle of the white matter has its label saved through ``PUT /datastore/label``;
2. ``POST /train/sam_med2d`` trains the golden_tiny network (64 wide, fast on CPU) from its seeded weights;
3. on the T1 volume itself, from the ground-truth box on the middle (held-out) slice, ``propagate: both``; 3D Dice
   against the label, next to (a) the same model given the ground-truth box on every slice (the ceiling) and (b) the
   middle slice alone (the floor); then the same walk for several ``propagate_min_iou`` (how the default was chosen).

Speed: the published ViT-B architecture (seeded weights: time does not depend on them) in-process, walking
``--vit-b-slices`` slices from a fresh cache with 2 threads: seconds per propagated slice, encoding included.

Prints both tables; writes ``benchmarks/results/bench_propagation.json`` and ``docs/images/propagation_mni152.png``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.io.image_source import read_image  # noqa: E402
from lib.loop.rest_annotator import RestAnnotator, infer_answer  # noqa: E402
from lib.serving.interactive import InteractiveSegmenter  # noqa: E402
from lib.serving.model_store import ModelStore  # noqa: E402
from lib.serving.prompt_inputs import PropagationRequest, parse_prompts  # noqa: E402
from scripts.monailabel_server import server_log, start_server, stop_server  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "spec" / "golden_tiny"
RESULTS = ROOT / "benchmarks" / "results"
PICTURE = ROOT / "docs" / "images" / "propagation_mni152.png"
VOLUME = "mni152_t1"
MIN_IOUS = (0.0, 0.3, 0.5, 0.7)


def mni152(folder: Path) -> tuple[Path, np.ndarray]:
    """The T1 template as NIfTI in ``folder`` and the ``(K, J, I)`` white matter label (probability > 0.5)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    path = folder / f"{VOLUME}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(t1.get_fdata(), dtype=np.float32), t1.affine), path)
    return path, np.asarray(wm.get_fdata()).transpose(2, 1, 0) > 0.5


def box_of(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def infer_volume(url: str, params: dict) -> tuple[np.ndarray, dict]:
    """``POST /infer/sam_med2d_box`` on the T1 volume -> the ``(K, J, I)`` bool label and the JSON result."""
    response = requests.post(
        f"{url}/infer/sam_med2d_box",
        params={"image": VOLUME},
        files={"params": (None, json.dumps({"result_extension": ".nii.gz", **params}))},
        timeout=600,
    )
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code} {response.text[:500]}")
    result, data, _ = infer_answer(response)
    label = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj).transpose(2, 1, 0) > 0
    return label, result


def quality(args: argparse.Namespace, work: Path) -> dict:
    studies = work / "studies"
    studies.mkdir()
    path, target = mni152(studies)
    source = read_image(path)
    present = np.flatnonzero(target.any(axis=(1, 2)))
    middle = int(present[len(present) // 2])
    train = [int(k) for k in present[::2] if abs(k - middle) > args.slab]
    for k in present:
        Image.fromarray(source.view(int(k))[:, :, 0]).save(studies / f"mni_z{k:03d}.png")
    conf = {
        "model": GOLDEN / "meta.json",
        "checkpoint": GOLDEN / "weights.pth",
        "model_dir": work / "model",
        "download": "false",
        "device": "cpu",
    }
    url = start_server("apps/sam_med2d", studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        annotator = RestAnnotator(url)
        for k in train:
            annotator.save_label(f"mni_z{k:03d}", target[k])
        params = {"max_epochs": args.epochs, "lr": 1e-3, "val_split": 0.2, "train_batch_size": 4}
        start = time.perf_counter()
        response = requests.post(f"{url}/train/sam_med2d?run_sync=true", json=params, timeout=3600)
        if response.status_code != 200:
            raise RuntimeError(f"training failed: {response.text[:500]}\n{server_log(url)[-3000:]}")
        train_seconds = time.perf_counter() - start

        result = evaluate(url, source, target, middle, args.slab)
    finally:
        stop_server(url)
    return {"train_slices": len(train), "train_seconds": round(train_seconds, 1), **result}


def evaluate(url: str, source, target: np.ndarray, middle: int, slab: int) -> dict:
    """Ceiling, floor and propagation (for each of :data:`MIN_IOUS`) on the served model; draws the picture."""
    present = np.flatnonzero(target.any(axis=(1, 2)))
    ceiling = np.zeros_like(target)
    for k in present:
        mask, _ = infer_volume(url, {"box": box_of(target[k]), "slice": int(k), "client_id": f"c{k}"})
        ceiling[k] = mask[k]
    first = {"box": box_of(target[middle]), "slice": middle, "reset": True}
    floor, _ = infer_volume(url, {**first, "client_id": "floor"})
    walks = {}
    for min_iou in MIN_IOUS:
        label, result = infer_volume(
            url, {**first, "client_id": f"walk{min_iou}", "propagate": "both", "propagate_min_iou": min_iou}
        )
        walks[min_iou] = (label, result["propagation"])
    default = walks[0.5]
    plot(source, target, default[0], ceiling, default[1], middle)
    held = [k for k in present if abs(k - middle) <= slab]
    return {
        "structure_slices": [int(present[0]), int(present[-1])],
        "start_slice": middle,
        "dice": {
            "ceiling (GT box every slice)": dice(ceiling, target),
            "propagation (one box, default)": dice(default[0], target),
            "floor (one slice)": dice(floor, target),
        },
        "dice_held_out_slab": {
            "ceiling (GT box every slice)": dice(ceiling[held], target[held]),
            "propagation (one box, default)": dice(default[0][held], target[held]),
            "floor (one slice)": dice(floor[held], target[held]),
        },
        "min_iou_sweep": [
            {
                "min_iou": m,
                "dice": dice(label, target),
                "slices": len(p["slices"]),
                "stops": [(s["direction"], s["reason"], s["slice"]) for s in p["stops"]],
                "review_first": p["review_first"],
            }
            for m, (label, p) in walks.items()
        ],
        "per_slice": [{**s, "dice": dice(default[0][s["slice"]], target[s["slice"]])} for s in default[1]["slices"]],
    }


def plot(source, target: np.ndarray, label: np.ndarray, ceiling: np.ndarray, propagation: dict, middle: int) -> None:
    """Six slices of the walk (T1, ground truth outline, propagated mask) and per-slice Dice with predicted IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    listed = [s["slice"] for s in propagation["slices"]]
    review = propagation["review_first"]
    picks = {listed[0], listed[len(listed) // 4], middle, listed[3 * len(listed) // 4], listed[-1], review}
    picks = sorted(picks - {None})
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(3 * (len(picks) + 1), 3.4))
    ious = {s["slice"]: s["iou"] for s in propagation["slices"]}
    for ax, k in zip(axes, picks, strict=False):
        ax.imshow(source.view(k)[:, :, 0], cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(~label[k], label[k]), cmap="autumn", alpha=0.45, origin="lower")
        ax.contour(target[k], levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
        tag = " (start)" if k == middle else " (review first)" if k == review else ""
        ax.set_title(f"slice {k}{tag}\nIoU pred {ious[k]:.2f}, Dice {dice(label[k], target[k]):.2f}", fontsize=8)
        ax.axis("off")
    present = np.flatnonzero(target.any(axis=(1, 2)))
    ax = axes[-1]
    ax.plot(present, [dice(label[k], target[k]) for k in present], label="propagation Dice")
    ax.plot(present, [dice(ceiling[k], target[k]) for k in present], label="GT box Dice", linestyle="--")
    ax.plot(listed, [ious[k] for k in listed], label="predicted IoU", linestyle=":")
    ax.axvline(middle, color="gray", linewidth=0.6)
    ax.set_xlabel("slice k")
    ax.legend(fontsize=7)
    fig.suptitle("MNI152 white matter: red = propagated from one box on the start slice, green = ground truth")
    fig.tight_layout()
    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PICTURE, dpi=90)


def vit_b_speed(slices: int, work: Path) -> dict:
    """Seconds per propagated slice with ViT-B on 2 threads, every slice encoded (fresh cache)."""
    torch.set_num_threads(2)
    path, target = mni152(work)
    segmenter = InteractiveSegmenter(ModelStore(work / "vit_b", "vit_b"), encode_threads=2)
    source, _ = segmenter.source(str(path))
    middle = int(np.flatnonzero(target.any(axis=(1, 2))).mean())
    prompts = parse_prompts({"box": box_of(target[middle]), "slice": middle}, source.view_hw, source.num_slices)
    walk = PropagationRequest(direction="up", max_slices=slices, min_iou=0.0, max_area_ratio=1e9)
    start = time.perf_counter()
    result = segmenter.segment_volume(source, prompts, walk, reset=True)
    return {
        "slices": len(result.slices) - 1,
        "seconds_per_slice": result.seconds_per_slice,
        "first_slice_seconds": round(sum(result.first.timings_ms.values()) / 1000, 3),
        "total_seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--slab", type=int, default=6, help="held-out slices each side of the start slice")
    parser.add_argument("--vit-b-slices", type=int, default=6)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_propagation_"))
    speed = vit_b_speed(args.vit_b_slices, work)
    print(f"ViT-B, 2 threads, CPU: {speed['seconds_per_slice']} s per propagated slice over {speed['slices']} slices")
    results = {"vit_b_speed": speed, "quality": quality(args, work)}
    q = results["quality"]
    print(f"\nMNI152 white matter, start slice {q['start_slice']}, trained on {q['train_slices']} slices")
    print(f"{'3D Dice':34s} {'whole structure':>16s} {'held-out slab':>14s}")
    for name, value in q["dice"].items():
        print(f"{name:34s} {value:16.3f} {q['dice_held_out_slab'][name]:14.3f}")
    print(f"\n{'propagate_min_iou':>18s} {'3D Dice':>8s} {'slices':>7s}  stops")
    for row in q["min_iou_sweep"]:
        print(f"{row['min_iou']:18.1f} {row['dice']:8.3f} {row['slices']:7d}  {row['stops']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_propagation.json").write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
