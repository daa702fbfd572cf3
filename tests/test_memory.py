"""The server's process gives an encode's freed activations back to the system (:mod:`lib.common.memory`)."""

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
