"""Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) in a network namespace of the tests' own.

Orthanc listens on every interface whatever its configuration says, so it runs inside a
namespace that has only a loopback interface, and whatever talks to it (the MONAI Label
server, a client script, ``batch --push-dicomweb``) runs in the same namespace with
``ip netns exec``: no test traffic can leave the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.app.server_process import stop

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="module")
def namespace():
    if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; make "
            "test does it as root)"
        )
    name = f"rebrain-test-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {created.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def orthanc(namespace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("orthanc")
    config = {
        "Name": "rebrain-test",
        "HttpPort": 8042,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, ORTHANC, str(folder / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield "http://127.0.0.1:8042"
    finally:
        stop(process)
