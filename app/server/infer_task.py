"""The ``rebrain`` MONAI Label infer task: a sparse CT (or FLAIR) in, the dense synthetic MRI out.

Built on MONAI Label's :class:`BasicInferTask` so the server's protocol, latencies and batch
inference work unchanged, but the work between reading and writing is
:meth:`lib.pipeline.ReBrainPipeline.reconstruct` (the same code as ``python main.py
reconstruct``), not a MONAI transform chain.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

import lib
from app.server.config import ServerConfig
from app.server.request import (
    OUTPUTS,
    PARAM_HELP,
    RequestError,
    default_params,
    output_choice,
    parse_infer_params,
    result_id_of,
)
from app.server.results import STATUS_CODES, ResultStore
from lib.data.sparse import simulate_sparse_volume
from lib.io import VolumeReadError, dense_grid, read_volume
from lib.io.limits import VolumeTooLarge, check_volume_bytes
from lib.io.nifti import is_nifti_path
from lib.pipeline import ReBrainPipeline
from lib.presets import Preset, load_preset
from lib.report.outputs import input_geometry

logger = logging.getLogger(__name__)

DESCRIPTION = "ReBrain: dense synthetic brain MRI from a sparse head CT (retrieval-augmented Brownian-bridge diffusion)"


# Requests that hold an input volume in memory at once: the one reconstructing and the next,
# read and waiting. Others wait before reading, holding nothing but their upload on disk, so
# memory stays at the models plus two volumes (each at most --conf max_image_mb) whatever the
# number of clients.
VOLUMES_IN_MEMORY = 2
LOCK_POLL_SECONDS = 0.5
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/:'\",()]+)+/([^\s/:'\",()]*)")


def public_message(error: Exception, image: str | None, name: str) -> str:
    """The error's message as a client may see it: the input's path becomes its id (``name``),
    and any other absolute path its last component, so no server path reaches an answer."""
    text = str(error)
    if image:
        text = text.replace(str(Path(image)), name)
    return ABSOLUTE_PATH.sub(r"\1", text)


def input_error(error: Exception, image: str | None = None, name: str = "image") -> HTTPException:
    """An input or parameter problem as the HTTP error the client sees: 413 for an image over the
    size limit, else 422; the message (without server paths) as detail."""
    status = 413 if isinstance(error, VolumeTooLarge) else 422
    return HTTPException(
        status_code=status, detail=f"ReBrain cannot use this request: {public_message(error, image, name)}"
    )


class ShuttingDown(HTTPException):
    """The server is stopping: the request is cancelled (503)."""

    def __init__(self) -> None:
        super().__init__(
            status_code=503,
            detail="the ReBrain server is shutting down; the reconstruction was cancelled, send it again",
        )


class ReBrainInferTask(BasicInferTask):
    """Reconstruct the dense synthetic MRI of one image.

    Args:
        config: the server settings (default preset, weights, device, ...).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.server_config = config
        self.results = ResultStore(config.results, config.keep_results)
        self._pipelines: dict[str, ReBrainPipeline] = {}
        self._preset_info: dict[str, dict] | None = None
        # One reconstruction at a time per process: the models are shared, and on one GPU (or
        # two CPU cores) running two at once is not faster than one after the other.
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._volume_slots = threading.BoundedSemaphore(VOLUMES_IN_MEMORY)
        self._stopping = threading.Event()
        super().__init__(
            path=str(config.weights / config.preset),
            network=None,
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=DESCRIPTION,
            config=default_params(config.preset, config.steps),
        )
        if config.preload:
            self.pipeline(config.preset)

    def preset(self, name: str) -> Preset:
        """A preset of the weights folder; the server's ``--conf kb`` replaces the default preset's KB."""
        preset = load_preset(name, self.server_config.weights)
        if name == self.server_config.preset and self.server_config.kb is not None:
            preset = dataclasses.replace(preset, files={**preset.files, "kb": str(self.server_config.kb.resolve())})
        return preset

    def pipeline(self, name: str) -> ReBrainPipeline:
        """The loaded models of a preset (loaded on first use, then kept)."""
        with self._loading:
            if name not in self._pipelines:
                logger.info("loading preset %s on %s", name, self.server_config.device)
                self._pipelines[name] = ReBrainPipeline.from_preset(self.preset(name), device=self.server_config.device)
            return self._pipelines[name]

    def info(self) -> dict[str, Any]:
        """What /info/ shows for this model: the base fields plus presets, parameters and outputs."""
        if self._preset_info is None:
            # Hashing the weight files takes a while and clients ask for /info/ often.
            self._preset_info = {}
            for name in self.server_config.available_presets():
                preset = self.preset(name)
                self._preset_info[name] = {
                    "description": preset.description,
                    "input": preset.input_modality,
                    "source": preset.source,
                    "target": preset.target,
                    "steps": preset.steps,
                    "versions": preset.fingerprint(),
                }
        return {
            **super().info(),
            "version": lib.__version__,
            "synthetic": True,
            "presets": self._preset_info,
            "default_preset": self.server_config.preset,
            "device": self.server_config.device,
            "params": PARAM_HELP,
            "outputs": list(OUTPUTS),
            "status_codes": STATUS_CODES,
        }

    def cancel(self) -> None:
        """Cancel running and queued reconstructions (server shutdown): they end with 503."""
        self._stopping.set()

    def _check_running(self, *_: Any) -> None:
        """Raise :class:`ShuttingDown` once :meth:`cancel` was called (a progress callback)."""
        if self._stopping.is_set():
            raise ShuttingDown()

    def _acquire(self, lock: threading.Lock | threading.BoundedSemaphore) -> None:
        """Wait for ``lock``, but not past a shutdown."""
        while not lock.acquire(timeout=LOCK_POLL_SECONDS):
            self._check_running()
        if self._stopping.is_set():
            lock.release()
            self._check_running()

    def is_valid(self) -> bool:
        return self.server_config.preset in self.server_config.available_presets()

    def __call__(self, request: dict, callbacks: dict | None = None) -> tuple[str | None, dict]:
        """Run one request; bad input or parameters become HTTP 422 (413: too large) errors that say what is wrong."""
        try:
            result_id = result_id_of(request)
            if result_id is not None:
                return self.fetch(result_id, output_choice(request))
            return super().__call__(request, callbacks)
        except (RequestError, VolumeReadError, ValueError) as error:
            logger.warning("refused request: %s", error)
            raise input_error(error, request.get("image"), str(request.get("image_name") or "image")) from None
        except MemoryError:
            logger.warning("out of memory on %s", request.get("image_name"))
            raise HTTPException(
                status_code=503,
                detail="the ReBrain server ran out of memory on this request; send a smaller image or ask for fewer "
                "samples",
            ) from None

    def fetch(self, result_id: str, output: str) -> tuple[str, dict]:
        """One output of an earlier result, without recomputing it."""
        return self.results.export(result_id, output), self.results.response(result_id, output)

    def pre_transforms(self, data: dict | None = None) -> list:
        # Reading, normalisation and resampling are the pipeline's: no MONAI transforms here.
        return []

    def post_transforms(self, data: dict | None = None) -> list:
        return []

    def inverse_transforms(self, data: dict | None = None) -> None:
        return None

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """Read the image, reconstruct it and keep the result (``device`` is the server's --conf)."""
        params = parse_infer_params(
            data, self.server_config.preset, self.server_config.steps, self.server_config.available_presets()
        )
        image = data.get("image")
        if not image:
            raise RequestError("no image: the request names no image file, upload or datastore entry")
        pipeline = self.pipeline(params.preset)
        steps = params.options.effective_steps(pipeline.preset)
        self.check_work(steps, params.options.samples, 1)
        self.check_header_size(image)
        self._acquire(self._volume_slots)
        try:
            volume = read_volume(
                image, modality=pipeline.preset.input_modality, max_bytes=self.server_config.max_image_bytes
            )
            if params.simulate_sparsity:
                volume = simulate_sparse_volume(volume, factor=params.simulate_sparsity)
            grid = dense_grid(volume, params.options.effective_spacing(pipeline.preset))
            self.check_work(steps, params.options.samples, int((~grid.acquired).sum()))
            self._acquire(self._lock)
            try:
                reconstruction = pipeline.reconstruct(volume, params.options, self._check_running)
            finally:
                self._lock.release()
            data["result_id"] = self.results.save(reconstruction, input_geometry(volume, params.simulate_sparsity))
        finally:
            self._volume_slots.release()
        data["output"] = params.output
        return data

    def check_header_size(self, image: str) -> None:
        """Refuse a NIfTI image whose header announces more than ``--conf max_image_mb`` at once,
        before it waits for a slot (the full check is :func:`read_volume`'s; an unreadable
        header is left to it, to be reported with the reason)."""
        if not is_nifti_path(image):
            return
        try:
            shape = nib.load(image).shape
        except Exception:  # noqa: BLE001 (read_volume reports it)
            return
        check_volume_bytes(image, shape, self.server_config.max_image_bytes)

    def check_work(self, steps: int, samples: int, generated_slices: int) -> None:
        """Refuse a request over the server's work budget (``--conf max_work`` slice-steps).

        Raises:
            RequestError: naming the product, its factors and the limit.
        """
        work = steps * samples * generated_slices
        if work > self.server_config.max_work:
            raise RequestError(
                f"this request needs {work} slice-steps ({steps} steps x {samples} samples x "
                f"{generated_slices} generated slices), "
                f"over this server's limit of {self.server_config.max_work} (--conf max_work); ask for fewer "
                "steps or samples"
            )

    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        return self.fetch(data["result_id"], data["output"])
