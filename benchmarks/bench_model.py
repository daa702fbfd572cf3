"""Speed and memory of the SAM-Med2D model library against the published forward math.

Run: ``make bench`` (or ``.venv/bin/python -m benchmarks.bench_model [--repeats 5] [--clicks 30]``).

Each implementation runs in its own process (so peak memory is its own): ViT-B with adapters at 256, fp32,
seeded random weights (speed does not depend on the values). Rows: encoder median seconds; decoder median ms per
click on a 512x512 image for a point, a box and a point with the previous mask (prompt encoding, decoding, best-mask
selection and upsampling to the image, i.e. a whole ``predict``); peak resident memory. Where CUDA is available the
same rows are measured on the GPU in fp32 and bf16 (autocast).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks import published_reference
from lib.build import build_model
from lib.predictor import Predictor
from lib.preprocessing import frame_geometry


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(impl: str, device: str, dtype: str, repeats: int, clicks: int, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    model = build_model("vit_b").to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    x = torch.randn(1, 3, 256, 256, device=device)
    point, label = np.array([[200.0, 220.0]]), np.array([1])
    box = np.array([120.0, 140.0, 330.0, 360.0])
    with torch.inference_mode(), autocast:
        if impl == "published":
            encode = lambda: published_reference.encode(model.image_encoder, x)  # noqa: E731
        else:
            encode = lambda: model.encode(x)  # noqa: E731
        encoder_s = _median_seconds(encode, repeats, sync)
        predictor = Predictor(model, preprocess="predictor")
        predictor.set_image(image)
        geometry = frame_geometry((512, 512), 256, "predictor")
        low_res = predictor.predict(point_coords=point, point_labels=label)[2]

        def published_click(coords, labels, boxes, mask, multimask):
            t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            coords_t = None if coords is None else t(geometry.points_to_input(coords))[None]
            labels_t = None if labels is None else torch.as_tensor(labels, device=device)[None]
            boxes_t = None if boxes is None else t(geometry.boxes_to_input(boxes))[None]
            mask_t = None if mask is None else t(mask)[None]
            low, iou = published_reference.decode(
                model, predictor.features, coords_t, labels_t, boxes_t, mask_t, multimask
            )
            return (geometry.masks_to_original(low.float()) > 0).cpu().numpy(), iou.float().cpu().numpy()

        def ours_click(coords, labels, boxes, mask, multimask):
            return predictor.predict(coords, labels, boxes, mask, multimask_output=multimask)

        click = published_click if impl == "published" else ours_click
        cases = {
            "point": (point, label, None, None, True),
            "box": (None, None, box, None, False),
            "point+mask": (point, label, None, low_res, False),
        }
        decoder_ms = {
            name: 1000 * _median_seconds(lambda a=prompt: click(*a), clicks, sync) for name, prompt in cases.items()
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    queue.put({"encoder_s": encoder_s, "decoder_ms": decoder_ms, "peak_mb": peak_mb})


def measure(impl: str, device: str, dtype: str, repeats: int, clicks: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(impl, device, dtype, repeats, clicks, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="encoder runs (median)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks per prompt kind (median)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    runs = [("published", "cpu", "fp32"), ("ours", "cpu", "fp32")]
    if torch.cuda.is_available():
        runs += [("published", "cuda", "fp32"), ("ours", "cuda", "fp32"), ("ours", "cuda", "bf16")]
    results = {run: measure(*run, args.repeats, args.clicks) for run in runs}
    print(f"SAM-Med2D ViT-B + adapters, 256 input; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    header = f"{'implementation':<24}{'encoder s':>10}{'point ms':>10}{'box ms':>9}{'pt+mask ms':>12}{'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for (impl, device, dtype), r in results.items():
        d = r["decoder_ms"]
        name = f"{impl} {device} {dtype}"
        print(
            f"{name:<24}{r['encoder_s']:>10.3f}{d['point']:>10.2f}{d['box']:>9.2f}{d['point+mask']:>12.2f}"
            f"{r['peak_mb']:>9.0f}"
        )
    for device in ("cpu", "cuda"):
        base, ours = results.get(("published", device, "fp32")), results.get(("ours", device, "fp32"))
        if base and ours:
            speedups = [base["decoder_ms"][k] / ours["decoder_ms"][k] for k in ours["decoder_ms"]]
            print(
                f"speed-up on {device}: encoder {base['encoder_s'] / ours['encoder_s']:.2f}x, decoder "
                f"{min(speedups):.2f}x to {max(speedups):.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({" ".join(k): v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
