"""Finished reconstructions kept on the server, so a client can fetch every output of one run.

A ``/infer`` response carries one image (MONAI Label's protocol), but a reconstruction has
several volumes: the MRI, the uncertainty, the per-slice retrieval similarity and the per-slice
status. Each result is written once, atomically, to ``ROOT/<result_id>/`` and the client asks
for the others by ``result_id`` (see :mod:`app.server.request`). The oldest results beyond
``keep`` are deleted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from app.server.request import OUTPUTS, RESULT_ID_PATTERN, RequestError
from lib.io.atomic import atomic_directory
from lib.io.nifti import write_nifti
from lib.reconstruction import Reconstruction
from lib.report.outputs import slice_status, write_outputs

# Per-slice status codes of the status volume (a labelmap).
STATUS_CODES = {"acquired": 1, "retrieved": 2, "fallback": 3}
RESPONSE_FILE = "response.json"


def overlay_volumes(reconstruction: Reconstruction) -> dict[str, np.ndarray]:
    """The per-slice provenance as volumes on the MRI's grid.

    Returns:
        ``similarity``: float32, each slice filled with its top-1 retrieval similarity
        (0 where the slice had no retrieval: acquired slices, baselines without retrieval);
        ``status``: uint8, each slice filled with its :data:`STATUS_CODES` code.
    """
    shape = reconstruction.mri.shape
    similarity = np.nan_to_num(reconstruction.similarities, nan=0.0).astype(np.float32)
    status = np.array([STATUS_CODES[s] for s in slice_status(reconstruction)], dtype=np.uint8)
    return {
        "similarity": np.broadcast_to(similarity[None, None, :], shape).copy(),
        "status": np.broadcast_to(status[None, None, :], shape).copy(),
    }


class ResultStore:
    """Result folders under ``root``, at most ``keep`` of them.

    Args:
        root: the folder (created).
        keep: how many results to keep.
    """

    def __init__(self, root: str | Path, keep: int = 32) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()

    def save(self, reconstruction: Reconstruction, input_info: dict) -> str:
        """Write a reconstruction's outputs; returns its new result id."""
        result_id = uuid.uuid4().hex
        affine = reconstruction.grid.affine
        with atomic_directory(self.root / result_id) as staging:
            write_outputs(staging, reconstruction, input_info)
            for name, volume in overlay_volumes(reconstruction).items():
                description = f"SYNTHETIC ReBrain {name} per slice (see provenance.json)"
                write_nifti(staging / f"{name}.nii.gz", volume, affine, description, dtype=volume.dtype.type)
            provenance = json.loads((staging / "provenance.json").read_text())
            response = {
                "result_id": result_id,
                "outputs": list(OUTPUTS),
                "status_codes": STATUS_CODES,
                "slice_status": slice_status(reconstruction),
                **provenance,
            }
            (staging / RESPONSE_FILE).write_text(json.dumps(response))
        self._evict()
        return result_id

    def folder(self, result_id: str) -> Path:
        """The folder of a kept result.

        Raises:
            RequestError: not a result id, or no longer kept here.
        """
        if not RESULT_ID_PATTERN.match(result_id):
            raise RequestError(f"parameter 'result_id': {result_id!r} is not a result id")
        folder = self.root / result_id
        if not (folder / RESPONSE_FILE).is_file():
            raise RequestError(
                f"parameter 'result_id': result {result_id} is not kept on this server (it keeps the last "
                f"{self.keep}); run the reconstruction again"
            )
        return folder

    def response(self, result_id: str, output: str) -> dict:
        """The JSON answer for ``output`` of a result (the provenance, ids and the output's name)."""
        return {**json.loads((self.folder(result_id) / RESPONSE_FILE).read_text()), "output": output}

    def export(self, result_id: str, output: str) -> str:
        """A copy of one output volume in a temporary file (MONAI Label deletes what it sends)."""
        source = self.folder(result_id) / f"{output}.nii.gz"
        with tempfile.NamedTemporaryFile(prefix=f"rebrain-{output}-", suffix=".nii.gz", delete=False) as copy:
            with open(source, "rb") as stored:
                shutil.copyfileobj(stored, copy)
        return copy.name

    def _evict(self) -> None:
        with self._lock:
            kept = sorted(
                (p for p in self.root.iterdir() if p.is_dir() and RESULT_ID_PATTERN.match(p.name)),
                key=lambda p: p.stat().st_mtime,
            )
            for old in kept[: max(0, len(kept) - self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
