"""Client side of the DICOMweb test, run inside the test's network namespace.

The test's Orthanc and MONAI Label server listen only on that namespace's loopback, so this
script, not the pytest process, talks to them: it stores DICOM series in Orthanc with STOW-RS,
then asks the server to reconstruct series by SeriesInstanceUID and writes what came back.

    python -m tests.app.dicomweb_roundtrip ORTHANC_URL SERVER_URL OUT \\
        --upload DIR [DIR ...] --infer UID [UID ...] --params JSON
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests_toolbelt.multipart.decoder import MultipartDecoder

from tests.app.server_process import wait_until_up


def wait_for(url: str) -> None:
    if not wait_until_up(url):
        sys.exit(f"{url} did not answer")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("orthanc")
    parser.add_argument("server")
    parser.add_argument("out", type=Path)
    parser.add_argument("--upload", nargs="+", type=Path, default=[])
    parser.add_argument("--infer", nargs="+", default=[])
    parser.add_argument("--params", default="{}")
    args = parser.parse_args()

    wait_for(f"{args.orthanc}/system")
    client = DICOMwebClient(url=f"{args.orthanc}/dicom-web")
    for folder in args.upload:
        client.store_instances([pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))])
    wait_for(f"{args.server}/info/")
    for uid in args.infer:
        response = requests.post(
            f"{args.server}/infer/rebrain", params={"image": uid}, files={"params": (None, args.params)}, timeout=600
        )
        out = args.out / uid
        out.mkdir(parents=True)
        (out / "status").write_text(str(response.status_code))
        if response.status_code != 200:
            (out / "detail.json").write_text(response.text)
            continue
        for part in MultipartDecoder.from_response(response).parts:
            name = "params.json" if b'name="params"' in part.headers[b"Content-Disposition"] else "mri.nii.gz"
            (out / name).write_bytes(part.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
