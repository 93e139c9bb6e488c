"""Shared test helpers (functions and paths; the fixtures are in ``conftest.py``): running the
``cxr-ray`` CLI as a user would, stopping a local Ray, writing small images."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository
REAL_ROOT = ROOT.parent / "shared" / "data" / "cxr-kaggle-224-dev"  # the shared real images
FIXTURES = ROOT / "tests" / "fixtures"


def run_cli(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """Run ``cxr-ray ARGS`` as a user would (a fresh Python process); stdout/stderr captured."""
    return subprocess.run([sys.executable, "-m", "cxr_ray.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def start_cli(*args: str, **kw) -> subprocess.Popen:
    """Start ``cxr-ray ARGS`` in the background, in its own process group (to kill it whole)."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen([sys.executable, "-m", "cxr_ray.cli", *map(str, args)], text=True,
                            start_new_session=True, **kw)


# Ray's own console lines (start-up, token notice, Ray Data's execution lines, workers' and the
# raylet's output, Tune's status table): cxr_ray writes them to Ray's log folder, not the terminal
RAY_NOISE = ("Token authentication", "Started a local Ray instance", "streaming_executor", "(raylet)",
             "Progress bars disabled", "DeprecationWarning", "TrainController", "Trial status", "RayTrainWorker pid=",
             "SplitCoordinator")


def assert_no_ray_noise(*streams: str) -> Path:
    """Assert none of :data:`RAY_NOISE` is in ``streams``, and that the one ``Ray's own logs:``
    folder they name holds the driver's log file with Ray's start-up line; returns that folder."""
    text = "\n".join(streams)
    assert not [n for n in RAY_NOISE if n in text], [line for line in text.splitlines()
                                                      if any(n in line for n in RAY_NOISE)][:10]
    folders = {line.split("Ray's own logs: ")[1].strip() for line in text.splitlines() if "Ray's own logs: " in line}
    assert len(folders) == 1, folders
    logs = Path(folders.pop())
    assert any("Ray" in p.read_text() for p in logs.glob("cxr_ray-driver-*.log")), sorted(logs.iterdir())[:20]
    return logs


FOREIGN_RAY: dict[int, str] = {}  # Ray processes running when the test session started: not ours


def local_ray_processes() -> dict[int, str]:
    """The core processes of Ray clusters on this host (GCS servers, raylets): pid -> name."""
    import psutil

    return {p.info["pid"]: p.info["name"] for p in psutil.process_iter(["name", "pid"])
            if p.info["name"] in ("gcs_server", "raylet")}


def record_foreign_ray() -> None:
    """Remember the Ray processes that run before any test starts (conftest's session start)."""
    FOREIGN_RAY.update(local_ray_processes())


def require_no_foreign_ray() -> None:
    """Skip the calling test when a Ray that the test session did not start still runs on this
    host: the test stops every local Ray (``ray stop --force``, the only way to stop a cluster
    ``ray start`` made, or a killed driver's orphans) and must never stop a user's."""
    import psutil

    alive = [f"{name} (pid {pid})" for pid, name in FOREIGN_RAY.items() if psutil.pid_exists(pid)]
    if alive:
        pytest.skip(f"a Ray this test session did not start is running on this host ({', '.join(alive[:4])}); "
                    f"the test would stop it with `ray stop --force`. Stop it first, or run the test elsewhere")


def ray_stop() -> None:
    """Stop every local Ray (``ray stop --force``): for tests that first made sure no Ray of anyone
    else runs here (:func:`require_no_foreign_ray`)."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def write_image(path: Path, size: int = 32, value: int = 128) -> Path:
    """A small uniform grayscale JPEG/PNG at ``path`` (parents created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


@contextlib.contextmanager
def moto_server(**env: str):
    """moto's S3 server on a free port of 127.0.0.1 (``env``: moto's own settings); its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
