"""``python main.py batch --engine ray`` on a real Ray cluster the test starts on loopback.

The cluster (``ray start --head``) and every driver run inside the tests' own network namespace
(tests/app/conftest.py), which has only ``lo``: Ray's processes listen on every interface of the
namespace they run in, so no test traffic can leave the machine. The cluster uses token
authentication with a token file of the test's own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from app.batch import is_complete
from app.batch_ray import remove_staging
from app.cli import main
from lib.io import read_volume
from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from tests.app.server_process import REPO
from tests.tiny_preset import make_tiny_preset

RAY = Path(sys.executable).parent / "ray"
PORT = 6391  # inside the test's namespace: nothing else listens there
WORKER_TITLE = "SeriesWorker.reconstruct"  # Ray's process title while a worker runs a series


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_tiny_preset(tmp_path_factory.mktemp("preset"), "tinyct", layout="open", max_subjects=3)


@pytest.fixture(scope="module")
def tree(real_ct_volume, tmp_path_factory):
    """Three CT series of 10 slices and one whose two slices share a position (it fails)."""
    root = tmp_path_factory.mktemp("archive")
    middle = real_ct_volume.shape[2] // 2
    uids = {}
    for name, start in (("ct_a", middle - 12), ("ct_b", middle - 2), ("ct_c", middle + 8)):
        description = SeriesDescription(modality="CT", series_description=f"head {name}")
        write_dicom_series(real_ct_volume.take_slices(list(range(start, start + 10))), root / name, description)
        uids[name] = description.series_uid
    broken = SeriesDescription(modality="CT", series_description="broken")
    paths = write_dicom_series(real_ct_volume.take_slices([middle, middle + 1, middle + 2]), root / "broken", broken)
    duplicate = pydicom.dcmread(str(paths[1]))
    duplicate.ImagePositionPatient = pydicom.dcmread(str(paths[0])).ImagePositionPatient
    duplicate.save_as(str(paths[1]))
    uids["broken"] = broken.series_uid
    return root, uids


@pytest.fixture(scope="module")
def ray_cluster(namespace):
    """A one-node Ray cluster on 127.0.0.1 in the test namespace, stopped after the module."""
    if RAY.is_file() is False:
        pytest.skip(f"no ray command beside {sys.executable}")
    # A short folder: Ray's Unix sockets live under it and their paths are limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    prefix = ["ip", "netns", "exec", namespace]
    start = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(PORT), "--num-cpus", "2"]
    start += ["--include-dashboard", "false", "--temp-dir", str(folder / "t"), "--disable-usage-stats"]
    started = subprocess.run(prefix + start, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield SimpleNamespace(address=f"127.0.0.1:{PORT}", env=env, prefix=prefix)
    subprocess.run(prefix + [str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=180)
    shutil.rmtree(folder, ignore_errors=True)


def batch_command(tree_root: Path, out: Path, preset, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "main.py",
        "batch",
        str(tree_root),
        str(out),
        "--preset",
        str(preset.root),
        "--steps",
        str(steps),
        "--quiet",
        *extra,
    ]


def ray_batch(cluster, tree_root: Path, out: Path, preset, steps: int, *extra: str) -> subprocess.Popen:
    command = batch_command(tree_root, out, preset, steps, "--engine", "ray", "--address", cluster.address, *extra)
    return subprocess.Popen(
        cluster.prefix + command, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def manifest_rows(out: Path) -> dict[str, dict]:
    return {row["series_uid"]: row for row in json.loads((out / "manifest.json").read_text())["series"]}


def worker_pids() -> list[int]:
    """PIDs of Ray workers running a series now (their process title names the method)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines() if WORKER_TITLE in line]


def test_ray_engine_writes_what_the_local_engine_writes(ray_cluster, tree, preset, tmp_path):
    root, uids = tree
    local = subprocess.run(
        batch_command(root, tmp_path / "local", preset, 2),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert local.returncode == 1, local.stderr  # the broken series
    process = ray_batch(ray_cluster, root, tmp_path / "ray", preset, 2, "--workers", "2")
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 1, stdout + stderr
    assert f"failed: series {uids['broken']}" in stderr
    local_rows, ray_rows = manifest_rows(tmp_path / "local"), manifest_rows(tmp_path / "ray")
    assert set(local_rows) == set(ray_rows) == set(uids.values())
    for uid, row in local_rows.items():
        other = ray_rows[uid]
        for column in ("status", "slices", "retrieval_success_rate", "fallback_count", "positions", "output"):
            assert other[column] == row[column], (uid, column)
        assert other["message"] == row["message"], uid
    for name in ("ct_a", "ct_b", "ct_c"):
        folders = [tmp_path / engine / uids[name] for engine in ("local", "ray")]
        assert all(is_complete(folder) for folder in folders)
        a, b = (read_volume(folder / "mri.nii.gz", modality="MR").array for folder in folders)
        np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "ray").glob(".tmp-*"))


def test_a_worker_killed_mid_series_has_its_series_retried_on_another(ray_cluster, tree, preset, tmp_path):
    root, uids = tree
    out = tmp_path / "out"
    process = ray_batch(ray_cluster, root, out, preset, 40, "--workers", "2")
    deadline = time.monotonic() + 600
    killed = None
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        busy = worker_pids()
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            killed = busy[0]
        time.sleep(0.02)
    assert killed is not None, "no worker was caught running a series"
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 1, stdout + stderr  # only the broken series failed
    rows = manifest_rows(out)
    for name in ("ct_a", "ct_b", "ct_c"):
        assert rows[uids[name]]["status"] == "done", rows[uids[name]]
        assert is_complete(out / uids[name])
    retried = [row for row in rows.values() if "retried" in row["message"]]
    # The killed worker may have held any series, the broken one too: its retry ends as it would have.
    assert len(retried) == 1, rows
    expected = "failed" if retried[0]["series_uid"] == uids["broken"] else "done"
    assert retried[0]["status"] == expected, rows
    assert rows[uids["broken"]]["status"] == "failed" and "same position" in rows[uids["broken"]]["message"]
    assert not list(out.glob(".tmp-*"))


def test_a_killed_driver_resumes_without_redoing_complete_series(ray_cluster, tree, preset, tmp_path):
    root, uids = tree
    out = tmp_path / "out"
    process = ray_batch(ray_cluster, root, out, preset, 40, "--workers", "1")
    outputs = [out / uids[name] for name in ("ct_a", "ct_b", "ct_c")]
    deadline = time.monotonic() + 600
    while not any(o.exists() for o in outputs) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    done = [o for o in outputs if o.exists()]
    assert 1 <= len(done) < len(outputs), "the driver was not killed between series"
    mtimes = {o: (o / "mri.nii.gz").stat().st_mtime_ns for o in done}

    resumed = ray_batch(ray_cluster, root, out, preset, 40, "--workers", "2", "--resume")
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 1, stdout + stderr
    rows = manifest_rows(out)
    assert all(is_complete(o) for o in outputs)
    for o in outputs:
        assert rows[o.name]["status"] == ("complete" if o in done else "done")
    assert all((o / "mri.nii.gz").stat().st_mtime_ns == mtime for o, mtime in mtimes.items())
    assert not list(out.glob(".tmp-*"))


def test_an_unreachable_cluster_is_a_clear_error(tree, preset, tmp_path, namespace):
    root, _ = tree
    command = batch_command(root, tmp_path / "out", preset, 2, "--engine", "ray", "--address", "127.0.0.1:1")
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot start or reach Ray at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_workers_the_cluster_cannot_place_are_an_error_not_a_hang(ray_cluster, preset, tmp_path):
    """The test cluster has no GPU: a worker asking for one would stay pending for ever."""
    script = (
        "import sys; from pathlib import Path; from app.batch_ray import RayOptions, RayRunner; "
        "from lib.pipeline import ReconstructionOptions; from lib.presets import load_preset\n"
        "options = RayOptions(address=sys.argv[1], workers=1, gpus_per_worker=1, start_timeout_s=5)\n"
        "try:\n"
        "    RayRunner(load_preset(sys.argv[2]), ReconstructionOptions(), None, Path('.'), options).__enter__()\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [*ray_cluster.prefix, sys.executable, "-c", script, ray_cluster.address, str(preset.root)],
        cwd=REPO,
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 Ray workers did not start within 5 s" in done.stdout, done.stdout + done.stderr
    assert "1 CPUs and 1 GPUs free" in done.stdout


def test_a_malformed_address_is_refused(tree, preset, tmp_path, capsys):
    root, _ = tree
    code = main(batch_command(root, tmp_path / "out", preset, 2, "--engine", "ray", "--address", "head-node")[2:])
    assert code == 2 and "must be 'auto' or HOST:PORT, got 'head-node'" in capsys.readouterr().err


def test_a_dead_workers_staging_folder_is_removed_and_nothing_else(tmp_path):
    out = tmp_path / "1.2.3"
    mine, retired, other = (
        tmp_path / name for name in (".tmp-0123abcd-1.2.3", ".tmp-0123abcd-old-1.2.3", ".tmp-89abcdef-1.2.4")
    )
    for folder in (out, mine, retired, other):
        folder.mkdir()
        (folder / "mri.nii.gz").write_bytes(b"partial")
    assert remove_staging(out) == [mine]
    assert not mine.exists() and out.exists() and retired.exists() and other.exists()
