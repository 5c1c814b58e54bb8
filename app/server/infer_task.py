"""The ``rebrain`` MONAI Label infer task: a sparse CT (or FLAIR) in, the dense synthetic MRI out.

Built on MONAI Label's :class:`BasicInferTask` so the server's protocol, latencies and batch
inference work unchanged, but the work between reading and writing is
:meth:`lib.pipeline.ReBrainPipeline.reconstruct` (the same code as ``python main.py
reconstruct``), not a MONAI transform chain.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

import lib
from app.server.config import ServerConfig
from app.server.request import OUTPUTS, PARAM_HELP, RequestError, output_choice, parse_infer_params, result_id_of
from app.server.results import STATUS_CODES, ResultStore
from lib.data.sparse import simulate_sparse_volume
from lib.io import VolumeReadError, read_volume
from lib.pipeline import ReBrainPipeline
from lib.presets import Preset, load_preset
from lib.report.outputs import input_geometry

logger = logging.getLogger(__name__)

DESCRIPTION = "ReBrain: dense synthetic brain MRI from a sparse head CT (retrieval-augmented Brownian-bridge diffusion)"


def input_error(error: Exception) -> HTTPException:
    """An input or parameter problem as the HTTP error the client sees (422, the message as detail)."""
    return HTTPException(status_code=422, detail=f"ReBrain cannot use this request: {error}")


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
        defaults = {"preset": config.preset, "steps": config.steps or "", "samples": 1, "seed": 0, "target_spacing": "", "simulate_sparsity": 0, "method": "rebrain", "output": "mri"}
        super().__init__(
            path=str(config.weights / config.preset), network=None, type=InferType.OTHERS, labels=None, dimension=3,
            description=DESCRIPTION, config=defaults,
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
        with self._lock:
            if name not in self._pipelines:
                logger.info("loading preset %s on %s", name, self.server_config.device)
                self._pipelines[name] = ReBrainPipeline(self.preset(name), device=self.server_config.device)
            return self._pipelines[name]

    def info(self) -> dict[str, Any]:
        """What /info/ shows for this model: the base fields plus presets, parameters and outputs."""
        if self._preset_info is None:
            # Hashing the weight files takes a while and clients ask for /info/ often.
            self._preset_info = {}
            for name in self.server_config.available_presets():
                preset = self.preset(name)
                self._preset_info[name] = {
                    "description": preset.description, "input": preset.input_modality, "source": preset.source, "target": preset.target,
                    "steps": preset.steps, "versions": preset.fingerprint(),
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

    def is_valid(self) -> bool:
        return self.server_config.preset in self.server_config.available_presets()

    def __call__(self, request: dict, callbacks: dict | None = None) -> tuple[str | None, dict]:
        """Run one request; bad input or parameters become HTTP 422 errors that say what is wrong."""
        try:
            result_id = result_id_of(request)
            if result_id is not None:
                return self.fetch(result_id, output_choice(request))
            return super().__call__(request, callbacks)
        except (RequestError, VolumeReadError, ValueError) as error:
            logger.warning("refused request: %s", error)
            raise input_error(error) from None

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
        params = parse_infer_params(data, self.server_config.preset, self.server_config.steps, self.server_config.available_presets())
        image = data.get("image")
        if not image:
            raise RequestError("no image: the request names no image file, upload or datastore entry")
        pipeline = self.pipeline(params.preset)
        volume = read_volume(image, modality=pipeline.preset.input_modality)
        if params.simulate_sparsity:
            volume = simulate_sparse_volume(volume, factor=params.simulate_sparsity)
        with self._lock:
            reconstruction = pipeline.reconstruct(volume, params.options)
        data["result_id"] = self.results.save(reconstruction, input_geometry(volume, params.simulate_sparsity))
        data["output"] = params.output
        return data

    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        return self.fetch(data["result_id"], data["output"])
