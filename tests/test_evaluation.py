"""The paper's evaluation protocol: seeded, clicks accumulated from the error region, and its command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lib.checkpoint import load_model
from lib.evaluation import EvalSample, evaluate_model, samples_from_layout
from lib.prompts import PromptRandom, error_clicks

ROOT = Path(__file__).resolve().parents[1]


def test_two_runs_with_one_seed_agree(golden_dir: Path, data_dir: Path) -> None:
    model = load_model(golden_dir / "weights.pth", golden_dir / "meta.json")
    samples = samples_from_layout(data_dir / "ct_demo", "test")
    assert [len(s.masks) for s in samples] and sum(len(s.masks) for s in samples) == 11
    first = evaluate_model(model, samples, (1, 3, 5), seed=5)
    again = evaluate_model(model, samples, (1, 3, 5), seed=5)
    assert first["per_mask"] == again["per_mask"]
    assert list(first["dice"]) == ["box", "1 point", "3 points", "5 points"] and first["masks"] == 11
    assert all(0.0 <= v <= 1.0 for v in first["dice"].values())


def test_clicks_accumulate_from_the_error_region_with_mask_feedback(golden_dir: Path) -> None:
    """Replays the protocol's prompts step by step and checks the decoder saw exactly those prompts."""
    model = load_model(golden_dir / "weights.pth", golden_dir / "meta.json")
    image = np.asarray(np.load(golden_dir / "cases.npz")["image"])  # 181 x 258: resized to the input frame
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[60:140, 80:200] = True
    seen: list[dict[str, torch.Tensor | None]] = []
    decode = model.decode

    def recording_decode(embeddings, point_coords=None, point_labels=None, boxes=None, mask_inputs=None, *a, **k):
        seen.append({"coords": point_coords, "labels": point_labels, "mask": mask_inputs})
        return decode(embeddings, point_coords, point_labels, boxes, mask_inputs, *a, **k)

    model.decode = recording_decode
    evaluate_model(model, [EvalSample(image, mask[None])], points=(1, 3), box=False, seed=11)
    assert len(seen) == 3
    assert seen[0]["coords"].shape == (1, 1, 2) and seen[0]["mask"] is None and seen[0]["labels"].item() == 1
    for step in (1, 2):
        previous, current = seen[step - 1], seen[step]
        assert torch.equal(current["coords"][:, :-1], previous["coords"]), "earlier clicks must be kept"
        assert current["mask"] is not None and current["mask"].min() >= 0 and current["mask"].max() <= 1
    # The new clicks lie in the error region of the previous prediction and carry its label.
    model.decode = decode
    frame = torch.nn.functional.interpolate(torch.as_tensor(mask)[None, None].float(), (256, 256), mode="nearest")
    rng = PromptRandom(0)
    low_res, _ = model.decode(
        model.encode(_input(model, image)), seen[1]["coords"], seen[1]["labels"], None, seen[1]["mask"], True
    )
    prediction = torch.nn.functional.interpolate(low_res, (256, 256), mode="bilinear", align_corners=False)[:, 0] > 0
    x, y = seen[2]["coords"][0, -1].long().tolist()
    assert bool(prediction[0, y, x]) != bool(frame[0, 0, y, x] > 0), "the third click is not on an error"
    assert seen[2]["labels"][0, -1].item() == int(frame[0, 0, y, x] > 0)
    assert error_clicks(prediction, frame[:, 0], 1, rng)[0].shape == (1, 1, 2)


def _input(model, image: np.ndarray) -> torch.Tensor:
    from lib.preprocessing import preprocess_image

    cfg = model.config
    return preprocess_image(image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, "evaluation")[0]


def test_evaluation_command_prints_the_papers_table(golden_dir: Path, data_dir: Path) -> None:
    command = [sys.executable, "-m", "lib.evaluation", "--checkpoint", golden_dir / "weights.pth"]
    command += ["--config", golden_dir / "meta.json", "--data", data_dir / "ct_demo"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.split("|")[2:6]] == ["box", "1 point", "3 points", "5 points"]
    assert "2 images, 11 masks" in result.stdout
    missing = subprocess.run([*command[:-1], str(golden_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "SAM-Med2D layout" in missing.stderr
