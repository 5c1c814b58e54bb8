"""Start and stop a real ``monailabel start_server`` process for tests (loopback only)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from bench.server import free_port, server_command

REPO = Path(__file__).resolve().parents[2]


def stop(process: subprocess.Popen) -> None:
    """End a process and wait for it (SIGTERM, then SIGKILL)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@contextmanager
def running_server(
    studies: str,
    conf: dict[str, str],
    log: Path,
    prefix: list[str] | None = None,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run the server until the block ends; yields the process and its base URL.

    Args:
        studies: studies folder or DICOMweb URL.
        conf: ``--conf`` options.
        log: file for the server's output (shown when it fails to start).
        prefix: command prefix, e.g. ``["ip", "netns", "exec", NS]``.
        wait: wait until /info/ answers (impossible from outside a network namespace).
        env: extra environment variables (MONAI Label settings).
    """
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        **(env or {}),
    }
    with open(log, "w") as out:
        process = subprocess.Popen(
            (prefix or []) + server_command(studies, conf, port),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_for(url + "/info/", process, log)
        yield process, url
    finally:
        stop(process)


def wait_until_up(
    url: str, timeout: float = 180.0, alive: Callable[[], bool] = lambda: True, headers: dict | None = None
) -> bool:
    """Poll ``url`` (with ``headers``) until it answers 200 (True), ``alive()`` turns false or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if requests.get(url, timeout=5, headers=headers).status_code == 200:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    return False


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Wait for the server's ``url``; fail with the server log if the process dies or times out."""
    if not wait_until_up(url, timeout, alive=lambda: process.poll() is None):
        raise RuntimeError(
            f"server did not answer {url} in {timeout} s (exit code {process.poll()}):\n{log.read_text()[-3000:]}"
        )
