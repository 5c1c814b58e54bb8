"""Benchmark of the server under load and attack: concurrent reconstructions, ``/info/`` latency,
memory, and a gzip bomb and an oversize upload sent in the middle.

Run with ``make bench-server`` (or ``python -m bench.server --help``). Starts the real MONAI
Label server on 127.0.0.1 with the shipped ``ct2mri`` preset and the demo's synthetic CT (made
from nilearn's MNI152, installable on a fresh machine), then, at once:

- ``--requests`` reconstructions from as many client threads (seeds 0, 1, ...), each checked:
  HTTP 200, the seed it asked for, the synthetic notice, the MRI on the expected grid; seed 0
  is sent once more afterwards and must give the same MRI;
- a stream of ``GET /info/`` (one every ``--info-interval`` s), whose latency is reported;
- once the reconstructions run: a .nii.gz of ~0.5 MB whose header claims 4 GiB, and a request
  announcing a body over the upload limit; both must be refused with 413.

The server's resident memory is sampled throughout. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

REPO = Path(__file__).resolve().parents[1]


def nifti_bomb(shape: tuple[int, int, int], compressed_bytes: int = 512 * 1024) -> bytes:
    """A .nii.gz whose header claims ``shape`` (int16) over a body of zeros, compressed while it
    is made, so that neither the maker nor the file needs the claimed size."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    out = io.BytesIO()
    out.write(compressor.compress(header.binaryblock + b"\0" * 4))  # 348-byte header, extension flag
    zeros = b"\0" * (1 << 20)
    while out.tell() < compressed_bytes:
        out.write(compressor.compress(zeros))
    out.write(compressor.flush())
    return out.getvalue()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(studies: str, conf: dict[str, object], port: int) -> list[str]:
    """The documented start command on 127.0.0.1, with this interpreter (``monailabel`` runs
    ``python`` from PATH) and ``--conf NAME VALUE`` for each of ``conf``."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO), "--studies", studies]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for name, value in conf.items():
        command += ["--conf", name, str(value)]
    return command


def start_server(studies: Path, steps: int, log: Path) -> tuple[subprocess.Popen, str]:
    """The server on 127.0.0.1 (default settings, the shipped weights); waits for /info/."""
    port = free_port()
    command = server_command(
        str(studies), {"preset": "ct2mri", "device": "cpu", "preload": "true", "steps": steps}, port
    )
    env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")


def reconstruct(url: str, image: str, seed: int) -> tuple[int, dict, np.ndarray | None, float]:
    """One infer request: (status, answer params, MRI array, seconds)."""
    started = time.perf_counter()
    response = requests.post(
        f"{url}/infer/rebrain",
        params={"image": image},
        files={"params": (None, json.dumps({"seed": seed, "simulate_sparsity": 2}))},
        timeout=3600,
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return response.status_code, {"detail": response.text}, None, seconds
    params, mri = {}, None
    for part in MultipartDecoder.from_response(response).parts:
        if b'name="params"' in part.headers[b"Content-Disposition"]:
            params = json.loads(part.content)
        else:
            mri = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(part.content)).dataobj)
    return response.status_code, params, mri, seconds


def oversize_request(url: str, announced: int) -> tuple[int, bytes]:
    """Send an infer request that announces ``announced`` body bytes and sends 1 KB (requests
    would correct the Content-Length); returns the answer's status and body."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/infer/rebrain?image=upload")
    connection.putheader("Content-Type", "multipart/form-data; boundary=b")
    connection.putheader("Content-Length", str(announced))
    connection.endheaders(b"x" * 1024)
    answer = connection.getresponse()
    body = answer.read()
    connection.close()
    return answer.status, body


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="concurrent reconstructions (default 8)")
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="sampling steps per request (default 2: the load, not the image, is measured)",
    )
    parser.add_argument("--info-interval", type=float, default=0.05, help="seconds between /info/ requests")
    args = parser.parse_args()

    from lib.data.demo_inputs import make_demo_inputs

    with tempfile.TemporaryDirectory(prefix="rebrain-bench-server-") as folder:
        work = Path(folder)
        inputs = make_demo_inputs(work / "inputs")
        studies = work / "studies"
        studies.mkdir()
        (studies / "pair_ct.nii.gz").write_bytes(Path(inputs["pair_ct"]).read_bytes())
        process, url = start_server(studies, args.steps, work / "server.log")
        server = psutil.Process(process.pid)
        memory: list[tuple[float, int]] = []
        info_latencies: list[float] = []
        done = threading.Event()

        def sample_memory() -> None:
            while not done.is_set():
                memory.append((time.perf_counter(), server.memory_info().rss))
                time.sleep(0.1)

        def poll_info() -> None:
            while not done.is_set():
                started = time.perf_counter()
                requests.get(f"{url}/info/", timeout=60).raise_for_status()
                info_latencies.append(time.perf_counter() - started)
                time.sleep(args.info_interval)

        try:
            idle_rss = server.memory_info().rss
            answers: dict[int, tuple] = {}
            clients = [
                threading.Thread(target=lambda seed=seed: answers.__setitem__(seed, reconstruct(url, "pair_ct", seed)))
                for seed in range(args.requests)
            ]
            watchers = [threading.Thread(target=sample_memory), threading.Thread(target=poll_info)]
            started = time.perf_counter()
            for thread in watchers + clients:
                thread.start()
            bomb_file = nifti_bomb((2048, 2048, 512))
            time.sleep(2.0)
            attack_started = time.perf_counter()
            bomb = requests.post(
                f"{url}/infer/rebrain",
                params={"image": "upload"},
                files={"file": ("bomb.nii.gz", bomb_file, "application/gzip"), "params": (None, "{}")},
                timeout=600,
            )
            oversize = oversize_request(url, 1024**3)[0]
            attack_seconds = time.perf_counter() - attack_started
            for thread in clients:
                thread.join()
            load_seconds = time.perf_counter() - started
            done.set()
            for thread in watchers:
                thread.join()
            again = reconstruct(url, "pair_ct", 0)
        finally:
            process.terminate()
            process.wait(timeout=60)

    statuses = [answers[seed][0] for seed in range(args.requests)]
    correct = sum(
        status == 200
        and params.get("summary", {}).get("seed") == seed
        and params.get("synthetic") is True
        and mri is not None
        and mri.shape == answers[0][2].shape
        for seed, (status, params, mri, _) in answers.items()
    )
    repeatable = again[2] is not None and answers[0][2] is not None and np.array_equal(again[2], answers[0][2])
    request_seconds = [answers[seed][3] for seed in range(args.requests)]
    peak_rss = max(rss for _, rss in memory)
    attack_peak = max((rss for t, rss in memory if t >= attack_started), default=peak_rss)
    mib = 1024**2
    print(
        f"## Server under load ({args.requests} concurrent reconstructions of the demo CT, x2 sparse, "
        f"{args.steps} steps; shipped ct2mri on CPU)\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| reconstructions answered 200 | {statuses.count(200)} of {args.requests} (statuses "
        f"{sorted(set(statuses))}) |"
    )
    print(f"| answers correct (own seed, synthetic notice, MRI on the grid) | {correct} of {args.requests} |")
    print(f"| seed 0 sent again gives the same MRI | {'yes' if repeatable else 'NO'} |")
    print(
        f"| wall time for all / per request median, max | {load_seconds:.1f} s / "
        f"{statistics.median(request_seconds):.1f} s, {max(request_seconds):.1f} s |"
    )
    print(
        f"| /info/ during load: requests, median, p99, max | {len(info_latencies)}, "
        f"{percentile(info_latencies, 50) * 1000:.0f} ms, {percentile(info_latencies, 99) * 1000:.0f} ms, "
        f"{max(info_latencies) * 1000:.0f} ms |"
    )
    print(f"| gzip bomb (header claims 4 GiB) | HTTP {bomb.status_code} |")
    print(f"| upload announcing 1 GiB | HTTP {oversize} |")
    print(f"| both refusals, seconds | {attack_seconds:.2f} |")
    print(
        f"| server memory: idle, peak under load, peak after the attack started | {idle_rss / mib:.0f} MiB, "
        f"{peak_rss / mib:.0f} MiB, {attack_peak / mib:.0f} MiB |"
    )


if __name__ == "__main__":
    main()
