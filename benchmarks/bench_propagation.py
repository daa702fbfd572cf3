"""Mask propagation through a volume: quality on a labelled brain volume, the choice of its stop thresholds, and
seconds per slice.

Run: ``.venv/bin/python -m benchmarks.bench_propagation [--structure brain|white_matter] [--epochs 12] [--lr 1e-4]
[--slab 5] [--vit-b-slices 6]``

Quality, through the real server (``monailabel start_server``), on nilearn's MNI152 T1 template (2 mm, 99 x 117 x 95,
bundled with the nilearn wheel: no download) with nilearn's MNI152 brain mask (``--structure brain``) or white matter
map (probability > 0.5, ``white_matter``) as the label:

1. the axial slices of the T1, as the server shows them (:meth:`lib.io.image_source.ImageSource.view`), are saved as
   pictures in the datastore; two slabs of ``2 * --slab + 1`` slices are held out (``tune`` around the first third of
   the structure, ``test`` around the second third) and every other slice with the structure has its label saved through
   ``PUT /datastore/label``;
2. ``POST /train/sam_med2d`` trains the small SAM-Med2D of ``benchmarks/bench_training.py`` (encoder 192 wide, depth
   6) from its seeded initialisation, ``--epochs`` epochs of the ``continual`` recipe;
3. on the T1 volume itself: from the ground-truth box on the middle of the tuning slab, ``propagate: both`` for every
   ``propagate_min_iou`` x ``propagate_max_area_ratio`` of :data:`MIN_IOUS` x :data:`AREA_RATIOS`, and the best
   (:func:`choose`); from the ground-truth box on the middle of the test slab, the walk with that choice, 3D Dice
   against the label next to the same model given the ground-truth box on every slice (the issue's ceiling) and the
   start slice alone (the floor), over the whole structure and over the test slab.

Speed: the published ViT-B architecture (seeded weights: time does not depend on them) in-process, walking
``--vit-b-slices`` slices from a fresh cache with 2 threads: seconds per propagated slice, encoding included.

Prints the tables; writes ``benchmarks/results/bench_propagation_<structure>.json`` and
``docs/images/propagation_mni152_<structure>.png``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
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

from benchmarks.bench_loop import trainer_validation  # noqa: E402
from benchmarks.bench_training import write_small_config  # noqa: E402
from lib.io.image_source import read_image  # noqa: E402
from lib.loop.rest_annotator import RestAnnotator, infer_answer  # noqa: E402
from lib.serving.interactive import InteractiveSegmenter  # noqa: E402
from lib.serving.model_store import ModelStore  # noqa: E402
from lib.serving.prompt_inputs import PropagationRequest, parse_prompts  # noqa: E402
from lib.serving.prompts import mask_box  # noqa: E402
from scripts.monailabel_server import server_log, start_server, stop_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images"
VOLUME = "mni152_t1"
MIN_IOUS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
AREA_RATIOS = (1.5, 2.0, 3.0)
# Thresholds whose tuning Dice is within this of the best are taken as equal; the highest of them is chosen (the walk
# that stops soonest where the model doubts, for the same Dice).
DICE_TIE = 0.005
# Labels on the T1 template (nilearn.datasets -> a NIfTI image, > 0.5 inside): the brain mask (the template is
# skull-stripped, so its outline is the edge of the picture's content) and white matter (probability map), whose
# outline the picture shows only through contrast.
STRUCTURES = {
    "brain": lambda datasets: datasets.load_mni152_brain_mask(resolution=2),
    "white_matter": lambda datasets: datasets.load_mni152_wm_template(resolution=2),
}


def mni152(folder: Path, structure: str) -> tuple[Path, np.ndarray]:
    """The T1 template as NIfTI in ``folder`` and the ``(K, J, I)`` label of :data:`STRUCTURES` ``structure``."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    label = STRUCTURES[structure](datasets)
    path = folder / f"{VOLUME}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(t1.get_fdata(), dtype=np.float32), t1.affine), path)
    return path, np.asarray(label.get_fdata()).transpose(2, 1, 0) > 0.5


def box_of(mask: np.ndarray) -> list[int]:
    """The request's box around a slice's label (lib.serving.prompts.mask_box, as integers)."""
    return [int(v) for v in mask_box(mask)]


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


def held_out_slabs(present: np.ndarray, slab: int) -> dict[str, list[int]]:
    """Two slabs of ``2 * slab + 1`` slices never labelled: ``tune`` around the first third of the structure (where
    the thresholds are chosen) and ``test`` around the second third (where the reported numbers start)."""
    centres = {"tune": int(present[len(present) // 3]), "test": int(present[2 * len(present) // 3])}
    return {name: [int(k) for k in present if abs(k - centre) <= slab] for name, centre in centres.items()}


def quality(args: argparse.Namespace, work: Path) -> dict:
    studies = work / "studies"
    studies.mkdir()
    path, target = mni152(studies, args.structure)
    source = read_image(path)
    present = np.flatnonzero(target.any(axis=(1, 2)))
    slabs = held_out_slabs(present, args.slab)
    held = set(slabs["tune"]) | set(slabs["test"])
    train = [int(k) for k in present if k not in held]
    for k in present:
        Image.fromarray(source.view(int(k))[:, :, 0]).save(studies / f"mni_z{k:03d}.png")
    model_dir = work / "model"
    conf = {"model": write_small_config(work / "small.json"), "model_dir": model_dir, "download": "false"}
    url = start_server(
        "apps/sam_med2d", studies, {**conf, "device": "cpu"}, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    )
    try:
        annotator = RestAnnotator(url)
        for k in train:
            annotator.save_label(f"mni_z{k:03d}", target[k])
        params = {"max_epochs": args.epochs, "lr": args.lr, "val_split": 0.2}
        start = time.perf_counter()
        response = requests.post(f"{url}/train/sam_med2d?run_sync=true", json=params, timeout=3600)
        if response.status_code != 200:
            raise RuntimeError(f"training failed: {response.text[:500]}\n{server_log(url)[-3000:]}")
        train_seconds = time.perf_counter() - start
        result = evaluate(url, source, target, slabs, args.structure)
    finally:
        stop_server(url)
    return {
        "train_slices": train,
        "train_params": params,
        "train_seconds": round(train_seconds, 1),
        "trainer_validation": trainer_validation(model_dir),
        **result,
    }


def walk(url: str, target: np.ndarray, start: int, name: str, **settings: float) -> tuple[np.ndarray, dict]:
    """One ground-truth box on ``start`` with ``propagate: both`` (server defaults unless ``settings`` say)."""
    params = {"box": box_of(target[start]), "slice": start, "reset": True, "client_id": name, "propagate": "both"}
    return infer_volume(url, {**params, **{f"propagate_{key}": value for key, value in settings.items()}})


def sweep(url: str, target: np.ndarray, start: int, name: str) -> list[dict]:
    """3D Dice of the walk from ``start`` for every ``propagate_min_iou`` x ``propagate_max_area_ratio``."""
    rows = []
    for ratio in AREA_RATIOS:
        for min_iou in MIN_IOUS:
            label, result = walk(url, target, start, f"{name}{min_iou}x{ratio}", min_iou=min_iou, max_area_ratio=ratio)
            rows.append(
                {
                    "min_iou": min_iou,
                    "max_area_ratio": ratio,
                    "dice": dice(label, target),
                    "slices": len(result["propagation"]["slices"]),
                    "stops": [(s["direction"], s["reason"], s["slice"]) for s in result["propagation"]["stops"]],
                }
            )
    return rows


def choose(rows: list[dict]) -> dict:
    """The tuning row with the best 3D Dice; among rows within :data:`DICE_TIE` of it, the highest ``min_iou``, then
    the smallest area ratio (both: stop soonest for the same Dice)."""
    best = max(row["dice"] for row in rows)
    near = [row for row in rows if row["dice"] >= best - DICE_TIE]
    return max(near, key=lambda row: (row["min_iou"], -row["max_area_ratio"]))


def evaluate(url: str, source, target: np.ndarray, slabs: dict[str, list[int]], structure: str) -> dict:
    """Ceiling and floor; the threshold sweep from the middle of the tuning slab, the choice it makes; propagation
    with that choice (and with the server's defaults) from the middle of the test slab; the picture."""
    present = np.flatnonzero(target.any(axis=(1, 2)))
    ceiling = np.zeros_like(target)
    for k in present:
        mask, _ = infer_volume(url, {"box": box_of(target[k]), "slice": int(k), "client_id": f"c{k}"})
        ceiling[k] = mask[k]
    starts = {name: slices[len(slices) // 2] for name, slices in slabs.items()}
    tuning = sweep(url, target, starts["tune"], "tune")
    chosen = choose(tuning)
    settings = {"min_iou": chosen["min_iou"], "max_area_ratio": chosen["max_area_ratio"]}
    test = starts["test"]
    floor, _ = infer_volume(url, {"box": box_of(target[test]), "slice": test, "reset": True, "client_id": "floor"})
    propagated, result = walk(url, target, test, "test", **settings)
    served_defaults, defaults_result = walk(url, target, test, "defaults")
    plot(source, target, propagated, ceiling, result["propagation"], test, slabs, structure)
    slab = slabs["test"]
    rows = {
        "ceiling (GT box every slice)": ceiling,
        "propagation (one box, chosen)": propagated,
        "propagation (one box, server defaults)": served_defaults,
        "floor (one slice)": floor,
    }
    return {
        "structure_slices": [int(present[0]), int(present[-1])],
        "held_out": slabs,
        "start_slices": starts,
        "chosen": settings,
        "server_defaults": {k: defaults_result["propagation"][k] for k in ("min_iou", "max_area_ratio")},
        "dice": {name: dice(label, target) for name, label in rows.items()},
        "dice_test_slab": {name: dice(label[slab], target[slab]) for name, label in rows.items()},
        "stops": result["propagation"]["stops"],
        "review_first": result["propagation"]["review_first"],
        "tuning_sweep": tuning,
        "test_sweep": sweep(url, target, test, "test"),
        "per_slice": [
            {**s, "dice": dice(propagated[s["slice"]], target[s["slice"]])} for s in result["propagation"]["slices"]
        ],
    }


def plot(
    source,
    target: np.ndarray,
    label: np.ndarray,
    ceiling: np.ndarray,
    propagation: dict,
    start: int,
    slabs: dict,
    structure: str,
) -> None:
    """Six slices of the walk (T1, ground truth outline, propagated mask) and per-slice Dice with predicted IoU, the
    held-out slabs shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    listed = [s["slice"] for s in propagation["slices"]]
    review = propagation["review_first"]
    picks = {listed[0], listed[len(listed) // 4], start, listed[3 * len(listed) // 4], listed[-1], review}
    picks = sorted(picks - {None})
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(3 * (len(picks) + 1), 3.4))
    ious = {s["slice"]: s["iou"] for s in propagation["slices"]}
    for ax, k in zip(axes, picks, strict=False):
        ax.imshow(source.view(k)[:, :, 0], cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(~label[k], label[k]), cmap="autumn", alpha=0.45, origin="lower")
        ax.contour(target[k], levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
        tag = " (start)" if k == start else " (review first)" if k == review else ""
        ax.set_title(f"slice {k}{tag}\nIoU pred {ious[k]:.2f}, Dice {dice(label[k], target[k]):.2f}", fontsize=8)
        ax.axis("off")
    present = np.flatnonzero(target.any(axis=(1, 2)))
    ax = axes[-1]
    ax.plot(present, [dice(label[k], target[k]) for k in present], label="propagation Dice")
    ax.plot(present, [dice(ceiling[k], target[k]) for k in present], label="GT box Dice", linestyle="--")
    ax.plot(listed, [ious[k] for k in listed], label="predicted IoU", linestyle=":")
    ax.axvline(start, color="gray", linewidth=0.6)
    for name, slab in slabs.items():
        ax.axvspan(slab[0] - 0.5, slab[-1] + 0.5, color="gray", alpha=0.15)
        ax.text((slab[0] + slab[-1]) / 2, 0.02, name, ha="center", fontsize=7)
    ax.set_xlabel("slice k")
    ax.legend(fontsize=7)
    fig.suptitle(f"MNI152 {structure}: red = propagated from one box on the start slice, green = ground truth")
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / f"propagation_mni152_{structure}.png", dpi=90)


def vit_b_speed(slices: int, work: Path) -> dict:
    """Seconds per propagated slice with ViT-B on 2 threads, every slice encoded (fresh cache)."""
    torch.set_num_threads(2)
    path, target = mni152(work, "brain")
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
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--structure", choices=sorted(STRUCTURES), default="brain")
    parser.add_argument("--slab", type=int, default=5, help="held-out slab: slices each side of its middle")
    parser.add_argument("--vit-b-slices", type=int, default=6, help="0: skip the ViT-B speed measurement")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the server's threads (training and inference)
    work = Path(tempfile.mkdtemp(prefix="bench_propagation_"))
    results: dict = {"args": vars(args)}
    if args.vit_b_slices:
        speed = results["vit_b_speed"] = vit_b_speed(args.vit_b_slices, work)
        print(f"ViT-B, 2 threads, CPU: {speed['seconds_per_slice']} s per propagated slice ({speed['slices']} slices)")
    start = time.perf_counter()
    q = results["quality"] = quality(args, work)
    results["quality_seconds"] = round(time.perf_counter() - start, 1)
    print(f"\nMNI152 {args.structure} (slices {q['structure_slices']}), held out {q['held_out']}")
    print(f"trained on {len(q['train_slices'])} slices in {q['train_seconds']} s; trainer: {q['trainer_validation']}")
    print(f"chosen on the tuning slab (start {q['start_slices']['tune']}): {q['chosen']}")
    print(f"\nfrom one box on slice {q['start_slices']['test']} (test slab)")
    print(f"{'3D Dice':40s} {'whole structure':>16s} {'test slab':>10s}")
    for name, value in q["dice"].items():
        print(f"{name:40s} {value:16.3f} {q['dice_test_slab'][name]:10.3f}")
    for title, rows in (("tuning", q["tuning_sweep"]), ("test", q["test_sweep"])):
        print(f"\n{title} sweep\n{'min_iou':>8s} {'ratio':>6s} {'3D Dice':>8s} {'slices':>7s}  stops")
        for row in rows:
            settings = f"{row['min_iou']:8.1f} {row['max_area_ratio']:6.1f}"
            print(f"{settings} {row['dice']:8.3f} {row['slices']:7d}  {row['stops']}")
    print(f"\nquality part: {results['quality_seconds']} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_propagation_{args.structure}.json").write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
