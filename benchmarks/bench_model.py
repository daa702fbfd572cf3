"""Speed of the SAM-Med2D model library against the published SAM-Med2D code itself, in one process.

Run: ``make bench`` (or ``.venv/bin/python -m benchmarks.bench_model [--threads 2] [--repeats 5] [--clicks 40]
[--published-code DIR]``).

Both networks are ViT-B with adapters at 256, fp32, holding the same seeded random weights (speed does not depend on
the values): the published ``segment_anything`` package is imported from ``--published-code`` (a checkout of
https://github.com/OpenGVLab/SAM-Med2D; default ``../shared/reference/sam_med2d_official``) at run time and given
this library's state dict. Calls alternate between implementations and each row is a median, so that a busy machine
slows all rows alike. Each click ratio is also printed for clicks in series (each implementation's clicks back to
back): ours is the one that gains there (a click of ours that follows a published click took 0.4-0.9 ms longer than
one that follows a click of ours, measured on a Zen 5 core; ``docs/benchmarks.md``), and a server's consecutive clicks
are neither.

Rows: the image encoder (seconds per image); a click (ms): prompt encoder + mask decoder with
``multimask_output=True`` and the best predicted IoU kept, which is what the server decodes per click, for one point,
a box and a point with the previous mask. ``ours torch`` decodes as the server does by default, replaying the
operations from recorded graphs (:mod:`lib.serving.decoder_graphs`); ``ours torch, eager decoder`` runs the same
operations from the Python modules (``--conf decoder_graphs false``). The largest difference of each output from the
published code's is printed next to it, and so is the re-implemented published math
(:mod:`benchmarks.published_reference`), kept as a fidelity reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks import published_reference
from lib.io.checkpoint import load_model
from lib.modeling import SamMed2D
from lib.modeling.build import build_model
from lib.modeling.reduced_precision import cpu_has_native, set_encoder_precision
from lib.serving.decoder_graphs import DecoderGraphs
from lib.serving.decoding import ServedDecoding, decode_rows, prompt_independent_inputs
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.export import export_onnx
from lib.serving.onnx_backend import OnnxSamMed2D
from lib.serving.predictor import Predictor
from lib.training.evaluation import evaluate_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED2D_SHARED", ROOT.parent / "shared"))
DEFAULT_PUBLISHED = SHARED / "reference/sam_med2d_official"
GOLDEN = SHARED / "spec/golden_tiny"
GOLDEN_CASES = ("one_point", "box", "three_points", "box_and_point")
# Written by `python -m benchmarks.bench_training` (the small model after 5 epochs from scratch on HC18).
HC18_CHECKPOINT = ROOT / "benchmarks/results/small_hc18_scratch_seed0.pt"


def published_model(code_dir: Path, ours: SamMed2D) -> torch.nn.Module:
    """The published ``Sam`` (ViT-B, adapters, 256) built by its own ``build_sam`` and given ``ours``'s weights.

    The package's ``__init__`` imports its predictors, which need torchvision for image resizing; only
    ``build_sam`` and ``modeling`` are needed here, so the package is registered without running its ``__init__``.
    """
    package_dir = code_dir / "segment_anything"
    if not (package_dir / "build_sam.py").is_file():
        raise SystemExit(f"no published segment_anything package in {code_dir} (--published-code)")
    package = types.ModuleType("segment_anything")
    package.__path__ = [str(package_dir)]
    sys.modules["segment_anything"] = package
    build_sam = importlib.import_module("segment_anything.build_sam")
    args = argparse.Namespace(image_size=ours.config.image_size, sam_checkpoint=None, encoder_adapter=True)
    model = build_sam.sam_model_registry["vit_b"](args)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.to(ours.device).eval()


def warm_allocator() -> None:
    """Fix glibc's mmap and trim thresholds high (Linux), as a process that has loaded models has them raised.

    glibc serves large allocations with fresh ``mmap`` s (page faults, zeroing) until a free raises its dynamic
    threshold: the published encoder's large intermediates made it 0.72-0.77 s in a fresh process against 0.58-0.61 s
    with the thresholds raised, while ours did not move (``docs/benchmarks.md``). Both implementations are timed in
    the warmed state, which is what a serving process is in.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: glibc's largest dynamic value
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def series_medians(
    fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None], block: int = 8
) -> dict:
    """Median seconds of each function over ``repeats`` calls that each follow a call of the same function, as
    consecutive clicks in a server do: blocks of ``block`` + 1 calls of one function, the first untimed, blocks
    alternating between functions so that a busy spell of the machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    while min(map(len, times.values())) < repeats:
        for name, fn in fns.items():
            fn()
            times[name].extend(timed(fn, sync) for _ in range(block))
    return {name: statistics.median(t) for name, t in times.items()}


def alternating_medians(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict:
    """Median seconds of each function, calling them in turn ``repeats`` times after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def golden_dice_change(precision: str, golden_dir: Path = GOLDEN) -> list[float]:
    """Per golden case (:data:`GOLDEN_CASES`, golden tiny weights, the published predictor's preprocessing and
    multimask choice): Dice of the mask with the ``precision`` encoder against the fp32 mask, minus 1."""
    cases = np.load(golden_dir / "cases.npz")
    config = json.loads((golden_dir / "meta.json").read_text())["config"]
    masks = {}
    for name in ("fp32", precision):
        model = set_encoder_precision(load_model(golden_dir / "weights.pth", config), name)
        predictor = Predictor(model, preprocess="predictor")
        predictor.set_image(cases["image"])
        masks[name] = []
        for case in GOLDEN_CASES:
            inputs = {k.split(".in.", 1)[1]: cases[k] for k in cases.files if k.startswith(f"{case}.in.")}
            masks[name].append(predictor.predict(**inputs, multimask_output=True)[0][0])
    return [
        2 * (a & b).sum() / max(a.sum() + b.sum(), 1) - 1 for a, b in zip(masks[precision], masks["fp32"], strict=True)
    ]


def hc18_dice_change(precisions: list[str], checkpoint: Path) -> dict[str, dict[str, float]]:
    """Held-out HC18 Dice (the 40 subjects of :func:`benchmarks.bench_training.hc18_split`, the paper's protocol
    through :func:`lib.training.evaluation.evaluate_model`: box, 1, 3 and 5 clicks, seed 0, decoded as the server
    decodes) of the small model trained on HC18 by ``bench_training`` (``checkpoint``), with the fp32 encoder and each
    of ``precisions``: ``{precision: {mode: mean Dice}}``. No trained ViT-B weights are at hand; the reduced-precision
    encoders quantise or cast the same layers of any width."""
    from benchmarks.bench_training import SMALL, evaluation_samples, hc18_split

    samples = evaluation_samples(hc18_split()[1])
    dice = {}
    for precision in ("fp32", *precisions):
        model = set_encoder_precision(load_model(checkpoint, SMALL), precision)
        with torch.inference_mode():
            dice[precision] = evaluate_model(model, samples, (1, 3, 5), seed=0)["dice"]
    return dice


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published-code", type=Path, default=DEFAULT_PUBLISHED, help="published SAM-Med2D checkout")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="encoder calls per implementation (median)")
    parser.add_argument("--clicks", type=int, default=40, help="clicks per prompt kind and implementation (median)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument(
        "--precisions", nargs="*", default=["int8", "bf16"], help="reduced-precision encoder rows (int8, bf16)"
    )
    parser.add_argument(
        "--hc18-checkpoint",
        type=Path,
        default=HC18_CHECKPOINT,
        help="the small model trained on HC18 by `bench_training` (its held-out Dice per precision; skipped if absent)",
    )
    parser.add_argument(
        "--fresh-allocator", action="store_true", help="keep glibc's default thresholds (see warm_allocator)"
    )
    args = parser.parse_args()
    if not args.fresh_allocator:
        warm_allocator()
    with_onnx = not args.no_onnx and args.device == "cpu" and importlib.util.find_spec("onnxruntime") is not None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    ours = build_model("vit_b").to(device).eval().requires_grad_(False)  # as the server holds it
    published = published_model(args.published_code, ours)
    x = torch.randn(1, 3, 256, 256, device=device)
    point = torch.tensor([[[100.0, 110.0]]], device=device)
    label = torch.ones(1, 1, dtype=torch.int64, device=device)
    box = torch.tensor([[60.0, 70.0, 165.0, 180.0]], device=device)
    # The previous mask enters as logits, as the published predictor passes it.
    decoding = ServedDecoding(mask_prompt="logits")

    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {' '.join(sys.argv)}")
    if not args.fresh_allocator:
        print("allocator warmed (glibc mmap threshold 32 MB, trim threshold 1 GB), as in a serving process")
    print(
        f"SAM-Med2D ViT-B + adapters, 256 input, fp32; torch {torch.__version__}, {args.device}, "
        f"{torch.get_num_threads()} threads; published code from {args.published_code}"
    )
    runtime = None
    if with_onnx:
        with tempfile.TemporaryDirectory() as onnx_dir:
            export_onnx(ours, onnx_dir)
            runtime = OnnxSamMed2D(onnx_dir, threads=args.threads)
    with torch.inference_mode():
        features = ours.encode(x)
        encoder_diff = {
            "published math (re-implemented)": _max_diff(published_reference.encode(ours.image_encoder, x), features),
            "ours torch": _max_diff(published.image_encoder(x), features),
        }
        encoders = {"published code": lambda: published.image_encoder(x), "ours torch": lambda: ours.encode(x)}
        if runtime is not None:
            encoder_diff["ours onnxruntime"] = _max_diff(published.image_encoder(x), runtime.encode(x))
            encoders["ours onnxruntime"] = lambda: runtime.encode(x)
        reduced = {}
        for precision in args.precisions:
            model = set_encoder_precision(copy.deepcopy(ours), precision)
            reduced[precision] = _max_diff(model.encode(x), features) / features.abs().max().item()
            encoders[f"ours torch {precision} encoder"] = lambda model=model: model.encode(x)
        encoder_s = alternating_medians(encoders, args.repeats, sync)
        # --conf decoder_graphs false: the eager modules.
        eager_entry = CachedEmbedding(features, None, prompt_independent_inputs(ours, features))
        # The server's default: the same inputs, replayed from graphs recorded by their first calls here.
        entry = CachedEmbedding(features, None, {**eager_entry.extras, "decoder_graphs": DecoderGraphs(ours)})
        onnx_entry = CachedEmbedding(features, None, {"onnx_decoder": runtime.decoder}) if runtime else None

        def published_click(points, boxes, mask):
            sparse, dense = published.prompt_encoder(points, boxes, mask)
            image_pe = published.prompt_encoder.get_dense_pe()
            masks, iou = published.mask_decoder(features, image_pe, sparse, dense, multimask_output=True)
            best = iou.argmax(dim=1)
            return masks[torch.arange(len(best)), best][:, None], iou.max(dim=1).values

        previous = published_click((point, label), None, None)[0]
        prompts = {
            "point": ((point, label), None, None),
            "box": (None, box, None),
            "point+mask": ((point, label), None, previous),
        }
        click_ms, series_ms, click_diff = {}, {}, {}
        for kind, (points, boxes, mask) in prompts.items():
            coords, labels = points if points is not None else (None, None)

            def ours_click(coords=coords, labels=labels, boxes=boxes, mask=mask, entry=entry):
                return decode_rows(ours, entry, decoding, coords, labels, boxes, mask)

            def reference_click(points=points, boxes=boxes, mask=mask):
                return published_reference.decode(ours, features, *(points or (None, None)), boxes, mask, True)

            expected = published_click(points, boxes, mask)[0]
            click_diff[kind] = {
                "published math (re-implemented)": _max_diff(reference_click()[0], expected),
                "ours torch": _max_diff(ours_click()[0], expected),
                "ours torch, eager decoder": _max_diff(ours_click(entry=eager_entry)[0], expected),
            }
            clicks = {
                "published code": lambda p=(points, boxes, mask): published_click(*p),
                "ours torch": ours_click,
                "ours torch, eager decoder": lambda click=ours_click: click(entry=eager_entry),
            }
            if runtime is not None:

                def onnx_click(coords=coords, labels=labels, boxes=boxes, mask=mask):
                    return decode_rows(ours, onnx_entry, decoding, coords, labels, boxes, mask)

                click_diff[kind]["ours onnxruntime"] = _max_diff(onnx_click()[0], expected)
                clicks["ours onnxruntime"] = onnx_click
            medians = alternating_medians(clicks, args.clicks, sync)
            click_ms[kind] = {name: 1000 * s for name, s in medians.items()}
            in_series = series_medians(clicks, args.clicks, sync)
            series_ms[kind] = {name: 1000 * s for name, s in in_series.items()}

    header = f"{'implementation':<34}{'encoder s':>10}{'point ms':>10}{'box ms':>9}{'pt+mask ms':>12}"
    print(header)
    print("-" * len(header))
    columns = (("point", 10), ("box", 9), ("point+mask", 12))
    for name in list(encoder_s) + [name for name in click_ms["point"] if name not in encoder_s]:
        clicks = "".join(f"{click_ms[k][name]:>{w}.2f}" if name in click_ms[k] else f"{'-':>{w}}" for k, w in columns)
        encoder = f"{encoder_s[name]:>10.3f}" if name in encoder_s else f"{'-':>10}"
        print(f"{name:<34}{encoder}{clicks}")
    for name in click_ms["point"]:
        clicks = "".join(f"{series_ms[k][name]:>{w}.2f}" for k, w in columns)
        print(f"{name + ', clicks in series':<44}{clicks}")
    base = "published code"
    for mine in click_ms["point"]:
        if mine == base:
            continue
        ratios = [click_ms[k][base] / click_ms[k][mine] for k in click_ms]
        series = [series_ms[k][base] / series_ms[k][mine] for k in series_ms]
        encoder = f"encoder {encoder_s[base] / encoder_s[mine]:.2f}x, " if mine in encoder_s else ""
        print(
            f"speed-up of {mine} over the published code: {encoder}click "
            f"(prompt encoder + mask decoder, multimask) {min(ratios):.2f}x to {max(ratios):.2f}x; "
            f"clicks in series {min(series):.2f}x to {max(series):.2f}x"
        )
    print("largest |difference| from the published code's output (encoder features; kept low-res logits per prompt):")
    for name in click_diff["point"]:
        encoder = f"encoder {encoder_diff[name]:.1e}; " if name in encoder_diff else ""
        per_prompt = ", ".join(f"{k} {click_diff[k][name]:.1e}" for k in click_diff)
        print(f"  {name:<34} {encoder}{per_prompt}")

    for precision, rel_diff in reduced.items():
        dice = golden_dice_change(precision)
        print(
            f"{precision} encoder (native on this CPU: {'yes' if cpu_has_native(precision) else 'no'}): "
            f"{encoder_s['ours torch'] / encoder_s[f'ours torch {precision} encoder']:.2f}x the fp32 encoder, "
            f"largest embedding difference {rel_diff:.1e} of its range; golden cases' Dice change against fp32 "
            f"{', '.join(f'{d:+.4f}' for d in dice)} (worst {min(dice):+.4f})"
        )
    if reduced and args.hc18_checkpoint.is_file():
        held_out = hc18_dice_change(list(reduced), args.hc18_checkpoint)
        modes = list(held_out["fp32"])
        print(f"held-out HC18 Dice, 40 subjects, small model trained by bench_training ({args.hc18_checkpoint}):")
        print(f"{'encoder':<8}" + "".join(f"{mode:>10}" for mode in modes) + "   change against fp32 (worst)")
        for precision, row in held_out.items():
            changes = [row[m] - held_out["fp32"][m] for m in modes]
            worst = "" if precision == "fp32" else f"   {', '.join(f'{c:+.4f}' for c in changes)} ({min(changes):+.4f})"
            print(f"{precision:<8}" + "".join(f"{row[m]:>10.4f}" for m in modes) + worst)
    elif reduced:
        print(f"held-out HC18 Dice: no {args.hc18_checkpoint} (python -m benchmarks.bench_training writes it)")


if __name__ == "__main__":
    main()
