"""Starting and stopping the server safely: no unauthenticated bind beyond loopback, and a
SIGTERM that ends a long reconstruction instead of waiting for it (issue 17)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from app.server.app import bound_host, check_exposure
from tests.app.server_process import REPO, free_port, running_server
from tests.app.test_server import infer


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        (["monailabel", "start_server", "--app", ".", "--studies", "s"], "0.0.0.0"),
        (["x", "start_server", "--host", "127.0.0.1"], "127.0.0.1"),
        (["x", "start_server", "-i", "::1", "--conf", "host", "0.0.0.0"], "::1"),
        (["pytest", "tests"], None),
    ],
)
def test_bound_host_reads_monailabel_arguments(argv, host):
    assert bound_host(argv) == host


def test_unauthenticated_serving_beyond_loopback_is_refused():
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(loopback, auth_enabled=False, insecure_remote_access=False)
    with pytest.raises(ValueError, match="will not serve without authentication on 0.0.0.0.*--host 127.0.0.1"):
        check_exposure("0.0.0.0", auth_enabled=False, insecure_remote_access=False)
    with pytest.raises(ValueError, match="10.1.2.3"):
        check_exposure("10.1.2.3", auth_enabled=False, insecure_remote_access=False)
    check_exposure("0.0.0.0", auth_enabled=True, insecure_remote_access=False)
    check_exposure("0.0.0.0", auth_enabled=False, insecure_remote_access=True)


def test_the_server_started_without_host_refuses_to_start(namespace, server_weights, server_studies, tmp_path):
    """The documented command without ``--host`` (MONAI Label's default: 0.0.0.0), in a network
    namespace of its own so that nothing could be reached even if the refusal failed."""
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(REPO),
        "--studies",
        str(server_studies),
        "--port",
        str(free_port()),
        "--conf",
        "weights",
        str(server_weights),
        "--conf",
        "preset",
        "tinyct",
    ]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert "will not serve without authentication on 0.0.0.0" in text
    assert "Uvicorn running on" not in text


def test_sigterm_cancels_a_running_reconstruction_and_the_server_exits(server_weights, server_studies, tmp_path):
    conf = {
        "weights": server_weights,
        "preset": "tinyct",
        "device": "cpu",
        "preload": "true",
        "results": tmp_path / "results",
    }
    with running_server(str(server_studies), conf, tmp_path / "server.log") as (process, url):
        answer: dict = {}

        def long_request() -> None:
            try:
                answer["response"] = infer(url, "head_ct", {"steps": 1000, "simulate_sparsity": 2})
            except requests.RequestException as error:
                answer["error"] = error

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(4.0)  # the reconstruction is under way (1000 steps take minutes)
        assert worker.is_alive()
        stopped = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        seconds = time.perf_counter() - stopped
        worker.join(timeout=30)
    assert seconds < 20, f"the server took {seconds:.0f} s to stop"
    assert code is not None
    if "response" in answer:
        assert answer["response"].status_code == 503 and "shutting down" in answer["response"].json()["detail"]
