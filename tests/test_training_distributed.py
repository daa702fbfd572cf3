"""Multi-process training with torch.distributed (gloo on CPU) equals one process on the same total batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.modeling.build import build_model
from lib.training.data import SamMed2DDataset
from lib.training.loop import fit
from lib.training.recipe import recipe

pytestmark = pytest.mark.slow

OVERRIDES = {
    "epochs": 1,
    "decoder_iterations": 2,
    "masks_per_image": 2,
    "loss_reduction": "mask",  # per-mask means: the average over processes is the mean over the whole batch
    "lr": 1e-4,
    "seed": 5,
}


def _pairs(data_dir: Path) -> list:
    hc18 = data_dir / "hc18"
    return [(p, [hc18 / "masks" / p.name]) for p in sorted((hc18 / "images").glob("*.png"))[:4]]


def _train(config_dict: dict, pairs: list, batch_size: int, rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0 if rank == 0 else 1234)  # other ranks start different: the broadcast must fix that
    model = build_model(config_dict)
    config = recipe("continual", {**OVERRIDES, "batch_size": batch_size})
    dataset = SamMed2DDataset(pairs, masks_per_image=config.masks_per_image, seed=config.seed)
    history = fit(model, dataset, config, rank=rank, world_size=world)
    if rank == 0:
        torch.save(model.state_dict(), out)
        Path(out + ".json").write_text(json.dumps(history))


def _worker(rank: int, world: int, init_file: str, config_dict: dict, pairs: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train(config_dict, pairs, 1, rank, world, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path: Path, data_dir: Path, golden_config: dict) -> None:
    pairs = _pairs(data_dir)
    two = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), golden_config, pairs, two), nprocs=2, join=True)
    one = str(tmp_path / "one.pt")
    _train(golden_config, pairs, 2, 0, 1, one)
    torch.manual_seed(0)
    start = build_model(golden_config).state_dict()
    a, b = torch.load(two, weights_only=True), torch.load(one, weights_only=True)
    # Attention key biases get an exactly-zero gradient (softmax ignores a constant per query), so their updates are
    # Adam-normalised rounding noise, different for any change of batch split; every other weight must agree.
    keys = [k for k in b if not k.endswith("k_proj.bias")]
    moved = max((b[k] - start[k]).abs().max().item() for k in keys)
    differ = max((a[k] - b[k]).abs().max().item() for k in keys)
    assert moved > 1e-5, "training did not change the weights"
    assert differ < 0.02 * moved, f"2 processes differ from 1 by {differ:.2e} (training moved weights {moved:.2e})"
    two_loss = json.loads(Path(two + ".json").read_text())["epoch_loss"]
    assert two_loss == pytest.approx(json.loads(Path(one + ".json").read_text())["epoch_loss"], rel=1e-4)


def test_torchrun_runs_the_recipe_on_two_cpu_processes(tmp_path: Path, data_dir: Path, golden_dir: Path) -> None:
    import subprocess
    import sys

    images, labels = tmp_path / "in" / "images", tmp_path / "in" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for image, masks in _pairs(data_dir):
        (images / image.name).symlink_to(image)
        (labels / image.name).symlink_to(masks[0])
    root = Path(__file__).resolve().parents[1]
    data, out = tmp_path / "dataset", tmp_path / "run"
    curate = [sys.executable, "-m", "lib.training.curation", "--images", images, "--labels", labels, "--output", data]
    assert subprocess.run(curate, cwd=root, capture_output=True, timeout=120).returncode == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [torchrun, "--nproc_per_node", "2", "-m", "lib.training.run_recipe", "--config", "sam_med2d_paper"]
    command += ["--data", data, "--checkpoint", golden_dir / "weights.pth", "--model-config", golden_dir / "meta.json"]
    command += ["--set", "epochs=1", "--set", "batch_size=1", "--set", "decoder_iterations=1", "--output", out]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["recipe"]["lr_milestones"] == [7, 10]
    assert set(metrics["epochs"][0]["val_dice"]) == {"box", "1 point", "3 points", "5 points"}
    assert torch.load(out / "epoch_01.pt", weights_only=True).keys() == torch.load(out / "best.pt").keys()
