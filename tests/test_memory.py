"""The server's process gives an encode's freed activations back to the system, and keeps the compiled kernels of its
products' many shapes bounded (:mod:`lib.common.memory`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lib.common.memory import fix_mmap_threshold

    def resident_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    # A freed 30 MB block raises glibc's dynamic threshold to 30 MB and its trim threshold to 60 MB (so 48 MB freed at
    # the heap's top stay), as loading weights does in a server.
    torch.ones(30 * 2**20 // 4).sum()
    if sys.argv[1] == "fixed":
        fix_mmap_threshold()
    before = resident_mb()
    blocks = [torch.ones(6 * 2**20 // 4) for _ in range(8)]  # 48 MB of activations
    held = resident_mb()
    del blocks
    print(held - before, resident_mb() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_leave_the_resident_memory_once_the_threshold_is_fixed():
    def run(mode: str) -> tuple[float, float]:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, cwd=root)
        held, after = map(float, out.stdout.split())
        return held, after

    held, after = run("fixed")
    assert held > 40 and after < 4, (held, after)
    held, after = run("dynamic")  # the default this guards against: the freed blocks stay resident
    assert held > 40 and after > 40, (held, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise")
def test_a_swap_maps_the_new_checkpoint_in_parts_of_a_few_megabytes(tmp_path: Path) -> None:
    """A model swap copies the new version from a file mapping (``copy_checkpoint_into``). ViT-B's adapter weights are
    38 MB each: copied whole, each was mapped in whole first, the swap's largest transient (+39 MB file-backed RSS)."""
    import threading
    import time

    import torch

    from lib.io.checkpoint import COPY_CHUNK_BYTES, _copy_dropping_pages

    def file_backed_mb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssFile:")[1].split()[0]) / 1024

    torch.save({"w": torch.randn(768, 768, 4, 4)}, tmp_path / "big.pt")  # the adapter weight's shape: 36 MB
    source = torch.load(tmp_path / "big.pt", mmap=True, weights_only=True)["w"]
    target = torch.empty(768, 4, 4, 768).permute(0, 3, 1, 2)  # stored in another order, as the served weights are
    before, peak, done = file_backed_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], file_backed_mb() - before)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with torch.no_grad():
            _copy_dropping_pages(target, source)
    finally:
        done.set()
        sampler.join()
    assert torch.equal(target, source)
    assert COPY_CHUNK_BYTES <= 4 * 2**20
    assert peak[0] < 12, f"{peak[0]:.1f} MB of the 36 MB mapped in at once"


KERNELS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from lib.common.memory import bound_onednn_kernel_caches, release_freed_memory
    from lib.modeling import onednn_linear
    from lib.modeling.onednn_linear import PackedLinear

    # A click's products in oneDNN, as on AMD processors (on Intel ones MKL runs them and compiles nothing).
    onednn_linear.ONEDNN_MIN_MULTIPLY_ADDS = onednn_linear.min_multiply_adds_for("AuthenticAMD")
    if sys.argv[1] == "bounded":
        bound_onednn_kernel_caches()
    torch.set_num_threads(1)
    mlp = PackedLinear(256, 2048).eval().requires_grad_(False)  # a decoder MLP layer, as a click runs it

    def resident_mb():
        release_freed_memory()
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    with torch.inference_mode():
        mlp(torch.randn(1, 7, 256))
        before = resident_mb()
        for tokens in range(8, 88):  # one click after another, each with one point more
            mlp(torch.randn(1, tokens, 256))
        print(resident_mb() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_kernels_compiled_for_each_number_of_prompt_tokens_stay_bounded():
    """Each new number of points gives the decoder's products new shapes, and oneDNN compiles a kernel for each: by
    default both its caches keep 1024 of them (about 0.4 MB each) for the process's life."""
    from lib.modeling.onednn_linear import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN products")

    def grown_mb(mode: str) -> float:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            [sys.executable, "-c", KERNELS_SCRIPT, mode], capture_output=True, text=True, check=True, cwd=root
        )
        return float(out.stdout.split()[-1])

    bounded, unbounded = grown_mb("bounded"), grown_mb("default")
    assert bounded < 12, bounded
    assert unbounded > 25, unbounded  # what the bound is for
