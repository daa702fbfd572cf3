"""The documented rollback command (python -m lib.serving.model_store_cli) on a real model folder."""

from __future__ import annotations

import subprocess
import sys

import torch

from lib.io.checkpoint import read_state_dict
from lib.modeling.build import build_model
from lib.serving.model_store import ModelStore
from lib.serving.model_store_cli import main
from tests.conftest import ROOT


def _cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_active_and_rollback(tmp_path, golden_config, capsys):
    store = ModelStore(tmp_path, golden_config)
    torch.manual_seed(1)
    first = store.publish(build_model(store.config), {"val_dice": 0.61})
    torch.manual_seed(2)
    second = store.publish(build_model(store.config), {"val_dice": 0.64})
    first_weights, _ = read_state_dict(tmp_path / "versions" / first / "model.pt")

    code, out, _ = _cli(capsys, "--model-dir", str(tmp_path), "list")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("* ") and second in line and "0.64" in line for line in lines)
    assert any(line.startswith("  ") and first in line and "0.61" in line for line in lines)

    # the command exactly as documented, in its own process
    done = subprocess.run(
        [sys.executable, "-m", "lib.serving.model_store_cli", "--model-dir", str(tmp_path), "rollback", first],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and f"now serving {first}" in done.stdout, done.stderr
    assert _cli(capsys, "--model-dir", str(tmp_path), "active")[1].strip() == first
    served, _ = read_state_dict(store.published_path)
    assert all(torch.equal(served[k], first_weights[k]) for k in first_weights)

    code, _, err = _cli(capsys, "--model-dir", str(tmp_path), "rollback", "v9999")
    assert code == 2 and "unknown model version 'v9999'" in err and first in err
    assert _cli(capsys, "--model-dir", str(tmp_path), "active")[1].strip() == first

    assert _cli(capsys, "--model-dir", str(tmp_path), "rollback", "base")[0] == 0
    assert not store.published_path.exists()
    assert _cli(capsys, "--model-dir", str(tmp_path), "active")[1].strip() == "base"
    assert _cli(capsys, "--model-dir", str(tmp_path / "missing"), "list")[0] == 2
