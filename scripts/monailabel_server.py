"""Start and stop the real MONAI Label server, as users start it (for the tests and the benchmarks).

    url = start_server("apps/sam_med2d", studies_dir, {"model": "vit_b", "download": "false"})
    ...
    stop_server(url)

or ``with running_server(app_dir, studies, conf) as url: ...``. The server runs ``monailabel start_server`` (the
venv's launcher script) in its own process group on a free port; its output goes to a log file that
:func:`server_log` returns (tests print it when something fails). Start-up waits until ``/info/`` answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclass
class _Server:
    process: subprocess.Popen
    log_path: Path


_SERVERS: dict[str, _Server] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    app_dir: str | Path,
    studies: str | Path,
    conf: Mapping[str, object] | None = None,
    port: int | None = None,
    timeout: float = 240.0,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``monailabel start_server --app <app_dir> --studies <studies> --host 127.0.0.1 --port <port> --conf k v
    ...`` and wait until it serves.

    Args:
        app_dir, studies: as on the command line (relative paths are taken from the repository root).
        conf: ``--conf`` pairs (values are passed as strings).
        port: default: a free port (never 8000).
        timeout: seconds to wait for ``/info/``.
        env: extra environment variables.

    Returns:
        the base URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        RuntimeError: the server exited or did not answer in time (the message ends with its log).
    """
    port = port or free_port()
    launcher = VENV_BIN / "monailabel"
    command = [str(launcher), "start_server", "--app", str(app_dir), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in (conf or {}).items():
        command += ["--conf", str(key), str(value)]
    log_fd, log_name = tempfile.mkstemp(prefix=f"monailabel_{port}_", suffix=".log")
    process_env = dict(os.environ)
    process_env["MONAILABEL_PYEXE"] = sys.executable  # the launcher runs `python` from PATH otherwise
    process_env["PATH"] = f"{VENV_BIN}{os.pathsep}{process_env.get('PATH', '')}"
    process_env.update(env or {})
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=log_fd,
        stderr=subprocess.STDOUT,
        env=process_env,
        start_new_session=True,
    )
    os.close(log_fd)
    url = f"http://127.0.0.1:{port}"
    _SERVERS[url] = _Server(process, Path(log_name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = server_log(url)
            _SERVERS.pop(url, None)
            raise RuntimeError(f"monailabel exited with {process.returncode} before serving; log:\n{log[-6000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    log = server_log(url)
    stop_server(url)
    raise RuntimeError(f"monailabel did not answer on {url} within {timeout:.0f} s; log:\n{log[-6000:]}")


def server_log(url: str) -> str:
    """Everything the server printed so far."""
    server = _SERVERS.get(url)
    if server is None or not server.log_path.exists():
        return ""
    return server.log_path.read_text(errors="replace")


def server_pid(url: str) -> int:
    """The process id of the launcher (the Python server replaces it via ``exec``)."""
    return _SERVERS[url].process.pid


def stop_server(url: str, timeout: float = 20.0) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL) and remove its log."""
    server = _SERVERS.pop(url, None)
    if server is None:
        return
    if server.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout)
    server.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def running_server(
    app_dir: str | Path, studies: str | Path, conf: Mapping[str, object] | None = None, **kwargs: object
) -> Iterator[str]:
    """Context manager around :func:`start_server` / :func:`stop_server`."""
    url = start_server(app_dir, studies, conf, **kwargs)  # type: ignore[arg-type]
    try:
        yield url
    finally:
        stop_server(url)
