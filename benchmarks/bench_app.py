"""Click latency and memory of the served app, through REST, with ViT-B.

Run: ``.venv/bin/python -m benchmarks.bench_app [--clicks 40] [--conf key value ...]``

Starts the real server (``monailabel start_server``, ViT-B with adapters, fp32, seeded random weights unless
``--conf checkpoint`` is given: speed does not depend on the values) on a temporary datastore holding a 512x512
picture and a 512x512x64 CT-like volume, then measures with a client as Slicer talks to it (one HTTP request per
click, the label file and JSON in a multipart answer):

- cold first click: a click on an image the server has not seen (read, preprocess, encode, decode, write);
- warm clicks p50/p95: further clicks on the same image (the image embedding is cached): a new click without, and a
  correction with, the previous mask as prompt;
- the same on a slice of the 3D volume (Slicer's parameters: voxel clicks, ``.nrrd`` uint8 result holding the whole
  volume), and a cold click on another slice of the loaded volume;
- the server's resident memory (RSS, and USS: memory only it uses) with ViT-B loaded, after the clicks, next to its
  floor: the RSS of a Python process that only imports MONAI Label's server (``monailabel.app``: torch, MONAI, ITK,
  FastAPI ...), plus the bytes of the served weights. No app that serves these weights with this server can go below it.
  Its peak (sampled every 5 ms) from start to the last click, and during a model swap: a new version is published
  into the server's store as a promoted run does, and the next click loads it. Then a long session: one annotator's
  ``--session-clicks`` corrections on the picture, a point more each click (every number of points gives the
  decoder's products new shapes), with its peak and how much the server grew.

The served weights are seeded random ones given as a checkpoint file, so that the server treats them as trained:
it scores the datastore's images for active learning once no click came for a second (``uncertainty_idle_seconds``
1), in its own process, and the clicks are measured after that scoring ends (its peak memory is a row of its own).
The server's own breakdown of a warm click (from the result JSON) is printed too, and so is the load average,
because other processes on the machine slow every number down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.monailabel_server import server_pid, start_server, stop_server  # noqa: E402

# Issue 13's targets: a warm click in 12 ms, the first in 1 s, at most 0.15 GB above the floor at every moment.
TARGETS = {
    "cold_2d": 1.0,
    "warm_2d_p50": 0.012,
    "above_floor_gb": 0.15,
    "peak_scoring_above_floor_gb": 0.15,
    "peak_clicks_above_floor_gb": 0.15,
    "peak_swap_above_floor_gb": 0.15,
    "peak_session_above_floor_gb": 0.15,
}


def resident_gb(pid: int | str = "self") -> tuple[float, float]:
    """``(RSS, of which anonymous)`` in GB of a process (Linux): the rest is file-backed, mostly the code of the
    libraries it ran (shared with other processes, and dropped by the kernel before anonymous memory when needed)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0]] = int(parts[1]) * 1024 / 1e9
    return fields["Rss:"], fields["Anonymous:"]


def server_import_floor_gb() -> tuple[float, float]:
    """``(RSS, of which anonymous)`` (GB) of a fresh Python process after importing MONAI Label's server application
    and nothing of ours."""
    import subprocess

    code = (
        "import json, sys, monailabel.app; from benchmarks.bench_app import resident_gb; "
        "sys.stdout.write('RSS=' + json.dumps(resident_gb()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    rss, anonymous = json.loads(out.rsplit("RSS=", 1)[1])
    return rss, anonymous


def weights_gb(conf: dict) -> float:
    """Bytes (GB) of the served model's parameters and buffers, fp32, from its config."""
    import torch

    from lib.modeling.build import build_model

    with torch.device("meta"):  # shapes only, no memory
        model = build_model(conf.get("model", "vit_b"))
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * 4 for t in tensors) / 1e9


def make_datastore(folder: Path) -> None:
    """A 512x512 grey picture and a 512x512x64 int16 volume in Hounsfield-like units."""
    import nibabel as nib
    import skimage.data

    camera = skimage.data.camera()  # 512x512 uint8, bundled with scikit-image
    Image.fromarray(camera).save(folder / "picture.png")
    rng = np.random.default_rng(0)
    base = camera.T.astype(np.int16) * 8 - 1000  # (i, j) = (x, y)
    volume = np.stack([base + np.int16(5 * k) for k in range(64)], axis=2)
    volume += rng.integers(-20, 20, size=volume.shape, dtype=np.int16)
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), folder / "volume.nii.gz")


def click(session: requests.Session, url: str, model: str, image: str, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = session.post(
        f"{url}/infer/{model}", params={"image": image}, files={"params": (None, json.dumps(params))}
    )
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
    body = response.content
    start_json = body.index(b'{"')
    result = json.loads(body[start_json : body.index(b"\r\n--", start_json)])
    return elapsed, result


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class CpuMeter:
    """CPU seconds (user + system) spent by the server and by this client since :meth:`start`.

    On a machine shared with other work, wall times include waiting for a core; the CPU time of the click (server
    and client run one after the other, each on one core for the per-click path) is what an idle machine would
    show, give or take the time the bytes spend in the socket.
    """

    def __init__(self, server: psutil.Process) -> None:
        self.server = server
        self.client = psutil.Process()
        self.start()

    def start(self) -> None:
        self._server0, self._client0 = self._cpu(self.server), self._cpu(self.client)

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def seconds(self) -> float:
        return self._cpu(self.server) - self._server0 + self._cpu(self.client) - self._client0


class PeakRss:
    """The largest resident memory of a process, sampled every 5 ms on a thread, per phase (:meth:`phase`), with
    its anonymous part at that moment (Linux ``/proc/PID/status``)."""

    def __init__(self, process: psutil.Process, phase: str) -> None:
        self.process = process
        self.peaks: dict[str, tuple[int, int]] = {}
        self.current = phase
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def phase(self, name: str) -> None:
        self.current = name

    def _read(self) -> tuple[int, int]:
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) * 1024
        return fields["VmRSS"], fields["RssAnon"]

    def _sample(self) -> None:
        while self.running:
            with contextlib.suppress(OSError, KeyError):
                rss, anonymous = self._read()
                if rss > self.peaks.get(self.current, (0, 0))[0]:
                    self.peaks[self.current] = (rss, anonymous)
            time.sleep(0.005)

    def stop(self) -> dict[str, tuple[int, int]]:
        """Per phase: ``(peak RSS, anonymous RSS at that moment)`` in bytes."""
        self.running = False
        self.thread.join()
        return self.peaks


def seeded_state(model_name: str, seed: int) -> dict:
    """The state dict of ``model_name`` built with ``seed`` (what the server serves as random-init with that seed)."""
    import torch

    from lib.modeling.build import build_model

    torch.manual_seed(seed)
    return build_model(model_name).state_dict()


def publish_new_version(model_dir: Path, model_name: str, base_checkpoint: Path) -> str:
    """Publish seeded weights (seed 1) as a new version of the server's store, as a promoted training run does."""
    from lib.serving.model_store import ModelStore

    store = ModelStore(model_dir, model_name, base_checkpoint=base_checkpoint)
    return str(store.publish(seeded_state(model_name, 1), {"note": "bench_app model swap"}))


def wait_for_scoring(url: str, timeout: float = 600.0) -> float:
    """Wait until the server's start-up uncertainty scoring has scored every unlabeled image; returns the seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        progress = requests.get(f"{url}/info/", timeout=60).json()["scoring"]["sam_uncertainty"]["progress"]
        if progress.get("finished_at") and progress.get("done") == progress.get("total"):
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"start-up scoring did not finish in {timeout:.0f} s")


def series(session, url, image, make_params, clicks: int) -> tuple[list[float], dict]:
    times, last = [], {}
    for n in range(clicks):
        elapsed, last = click(session, url, "sam_med2d_points", image, make_params(n))
        if not last["embedding_cached"]:
            raise RuntimeError("a warm click missed the embedding cache")
        times.append(elapsed)
    return times, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--session-clicks", type=int, default=60, help="the long session's clicks, a point more each")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_app.json"))
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="first wait (up to this long) until the 1-minute load average is below the core count",
    )
    args = parser.parse_args()
    deadline = time.monotonic() + 60 * args.wait_quiet
    while os.getloadavg()[0] >= (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(10)

    work = Path(tempfile.mkdtemp(prefix="bench_app_"))
    studies = work / "studies"
    studies.mkdir()
    make_datastore(studies)
    conf = {"model": "vit_b", "download": "false", "model_dir": str(work / "model"), "uncertainty_idle_seconds": "1"}
    conf.update(dict(args.conf))
    if "checkpoint" not in conf:
        # Seeded weights given as a checkpoint, so that the server scores the datastore at start as with real ones.
        from lib.io.checkpoint import save_state_dict

        conf["checkpoint"] = str(save_state_dict(seeded_state(conf.get("model", "vit_b"), 0), work / "base.pt"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    url = start_server("apps/sam_med2d", studies, conf)
    startup = time.perf_counter() - started
    rows: dict[str, float] = {"startup_s": startup}
    try:
        process = psutil.Process(server_pid(url))
        peaks = PeakRss(process, "scoring")
        rows["background_wait_s"] = wait_for_scoring(url)
        rows["rss_after_start_gb"] = process.memory_info().rss / 1e9
        peaks.phase("clicks")
        session = requests.Session()
        slicer = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "bench", "label": "organ"}
        meter = CpuMeter(process)

        meter.start()
        rows["cold_2d"], first = click(session, url, "sam_med2d_points", "picture", {"foreground": [[256, 256]]})
        rows["cold_2d_cpu"] = meter.seconds()
        assert not first["embedding_cached"]
        meter.start()
        warm, last_2d = series(
            session, url, "picture", lambda n: {"foreground": [[100 + 7 * n, 300]], "reset": True}, args.clicks
        )
        rows["warm_2d_cpu"] = meter.seconds() / args.clicks
        rows["warm_2d_p50"], rows["warm_2d_p95"] = percentile(warm, 50), percentile(warm, 95)
        meter.start()
        refine, last_refine = series(
            session,
            url,
            "picture",
            lambda n: {"foreground": [[256, 256]], "background": [[100 + 7 * n, 300]], "client_id": "refine"},
            args.clicks,
        )
        rows["refine_2d_cpu"] = meter.seconds() / args.clicks
        assert last_refine["used_previous_mask"]
        rows["refine_2d_p50"], rows["refine_2d_p95"] = percentile(refine, 50), percentile(refine, 95)

        meter.start()
        rows["cold_3d_new_volume"], _ = click(
            session, url, "sam_med2d_points", "volume", {"foreground": [[256, 256, 32]]} | slicer
        )
        rows["cold_3d_new_volume_cpu"] = meter.seconds()
        meter.start()
        rows["cold_3d_new_slice"], _ = click(
            session, url, "sam_med2d_points", "volume", {"foreground": [[256, 256, 40]]} | slicer
        )
        rows["cold_3d_new_slice_cpu"] = meter.seconds()
        meter.start()
        warm3d, last_3d = series(
            session,
            url,
            "volume",
            lambda n: {"foreground": [[100 + 7 * n, 300, 40]], "reset": True} | slicer,
            args.clicks,
        )
        rows["warm_3d_cpu"] = meter.seconds() / args.clicks
        rows["warm_3d_p50"], rows["warm_3d_p95"] = percentile(warm3d, 50), percentile(warm3d, 95)
        memory = process.memory_full_info()
        rows["rss_gb"], rows["uss_gb"] = memory.rss / 1e9, memory.uss / 1e9
        rows["anonymous_gb"] = resident_gb(process.pid)[1]

        # A promoted run publishes a new version; the next click loads it (and encodes its view again).
        version = publish_new_version(Path(conf["model_dir"]), conf.get("model", "vit_b"), Path(conf["checkpoint"]))
        peaks.phase("swap")
        meter.start()
        rows["swap_click"], swapped = click(session, url, "sam_med2d_points", "picture", {"foreground": [[256, 256]]})
        rows["swap_click_cpu"] = meter.seconds()
        assert swapped["model_version"] == version, swapped["model_version"]

        peaks.phase("session")
        before = process.memory_info().rss
        spots = [[40 + (37 * k) % 430, 40 + (91 * k) % 430] for k in range(args.session_clicks)]

        def correction(n: int) -> dict:  # click n carries n + 1 points, about half of them background
            params = {"foreground": spots[: n // 2 + 1], "client_id": "session"}
            return params | ({"background": spots[n // 2 + 1 : n + 1]} if n else {})

        long_session, _ = series(session, url, "picture", correction, args.session_clicks)
        rows["session_p50"] = percentile(long_session, 50)
        rows["session_growth_gb"] = (process.memory_info().rss - before) / 1e9
        peak = peaks.stop()
        for phase in ("scoring", "clicks", "swap", "session"):
            rows[f"peak_{phase}_gb"], rows[f"peak_{phase}_anonymous_gb"] = (v / 1e9 for v in peak.get(phase, (0, 0)))
    finally:
        stop_server(url)
        shutil.rmtree(work, ignore_errors=True)  # the datastore, two ViT-B checkpoints and the store: 2 GB
    rows["floor_imports_gb"], floor_anonymous = server_import_floor_gb()
    rows["weights_gb"] = weights_gb(conf)
    rows["floor_gb"] = rows["floor_imports_gb"] + rows["weights_gb"]
    rows["above_floor_gb"] = rows["rss_gb"] - rows["floor_gb"]
    rows["above_floor_anonymous_gb"] = rows["anonymous_gb"] - floor_anonymous - rows["weights_gb"]
    rows["above_floor_file_gb"] = rows["above_floor_gb"] - rows["above_floor_anonymous_gb"]
    for phase in ("scoring", "clicks", "swap", "session"):
        rows[f"peak_{phase}_above_floor_gb"] = rows[f"peak_{phase}_gb"] - rows["floor_gb"]
        anonymous = rows[f"peak_{phase}_anonymous_gb"] - floor_anonymous - rows["weights_gb"]
        rows[f"peak_{phase}_above_floor_anonymous_gb"] = anonymous
    load_after = os.getloadavg()

    print(f"\nSAM-Med2D app through REST, ViT-B fp32, CPU ({os.cpu_count()} cores), {args.clicks} clicks per series")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    print(f"| {'measure':<46} | {'wall':>10} | {'CPU':>10} | {'target':>8} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    labels = {
        "startup_s": ("server start until /info answers (s)", 1),
        "background_wait_s": ("then start-up scoring of the 2 images (s)", 1),
        "cold_2d": ("2D 512x512: cold first click (s)", 1),
        "warm_2d_p50": ("2D 512x512: warm click p50 (ms)", 1000),
        "warm_2d_p95": ("2D 512x512: warm click p95 (ms)", 1000),
        "refine_2d_p50": ("2D 512x512: correction w/ prev. mask p50 (ms)", 1000),
        "refine_2d_p95": ("2D 512x512: correction w/ prev. mask p95 (ms)", 1000),
        "cold_3d_new_volume": ("3D 512x512x64: first click, new volume (s)", 1),
        "cold_3d_new_slice": ("3D: first click on another slice (s)", 1),
        "warm_3d_p50": ("3D: warm click p50, .nrrd volume out (ms)", 1000),
        "warm_3d_p95": ("3D: warm click p95, .nrrd volume out (ms)", 1000),
        "rss_after_start_gb": ("server RSS after start (GB)", 1),
        "rss_gb": ("server RSS with ViT-B, after clicks (GB)", 1),
        "uss_gb": ("server USS (own memory) after clicks (GB)", 1),
        "floor_imports_gb": ("floor: RSS of `import monailabel.app` (GB)", 1),
        "weights_gb": ("floor: + served weights, fp32 (GB)", 1),
        "floor_gb": ("floor: MONAI Label server + weights (GB)", 1),
        "above_floor_gb": ("server RSS above that floor (GB)", 1),
        "above_floor_anonymous_gb": ("  of which anonymous memory (GB)", 1),
        "above_floor_file_gb": ("  of which file-backed: library code, mapped volume (GB)", 1),
        "peak_scoring_above_floor_gb": ("peak RSS above the floor, start-up scoring (GB)", 1),
        "peak_scoring_above_floor_anonymous_gb": ("  of which anonymous memory (GB)", 1),
        "peak_clicks_above_floor_gb": ("peak RSS above the floor during the clicks (GB)", 1),
        "peak_clicks_above_floor_anonymous_gb": ("  of which anonymous memory (GB)", 1),
        "swap_click": ("first click after a new version is published (s)", 1),
        "peak_swap_above_floor_gb": ("peak RSS above the floor during that swap (GB)", 1),
        "peak_swap_above_floor_anonymous_gb": ("  of which anonymous memory (GB)", 1),
        "session_p50": (f"a {args.session_clicks}-click session, a point more each: p50 (ms)", 1000),
        "session_growth_gb": ("  the server's growth over it (GB)", 1),
        "peak_session_above_floor_gb": ("peak RSS above the floor during that session (GB)", 1),
    }
    for key, (label, scale) in labels.items():
        target = TARGETS.get(key)
        shown_target = "" if target is None else f"{target * scale:g}"
        cpu_key = {"warm_2d_p50": "warm_2d_cpu", "refine_2d_p50": "refine_2d_cpu", "warm_3d_p50": "warm_3d_cpu"}.get(
            key, f"{key}_cpu"
        )
        cpu = f"{rows[cpu_key] * scale:>10.3f}" if cpu_key in rows else f"{'':>10}"
        print(f"| {label:<46} | {rows[key] * scale:>10.3f} | {cpu} | {shown_target:>8} |")
    print("\nwall: as the client saw it; CPU: server + client CPU time of the click (mean per click for a series),")
    print("what an idle machine would show; p50 rows show the series' mean CPU per click.")
    print(f"server breakdown of the cold 2D click (ms): {first['timings_ms']}")
    print(f"server breakdown of the last warm 2D click (ms): {last_2d['timings_ms']}")
    print(f"monailabel stage latencies of that click (s): {last_2d['latencies']}")
    print(f"server breakdown of the last warm 3D click (ms): {last_3d['timings_ms']}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
