"""ReBrain entry point: the MONAI Label app, and the command line.

``monailabel start_server --app . --studies DIR_OR_DICOMWEB_URL [--conf NAME VALUE ...]`` loads
:class:`ReBrainApp` from this file (see README, "Server"). ``python main.py <command>`` runs the
command line (see ``python main.py --help``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask

import lib
from app.server.config import ServerConfig
from app.server.infer_task import DESCRIPTION, ReBrainInferTask
from lib.presets import load_preset

logger = logging.getLogger(__name__)


class ReBrainApp(MONAILabelApp):
    """The ReBrain MONAI Label app: one infer task, ``rebrain``; no training or annotation.

    Args:
        app_dir: this repository.
        studies: a local studies folder or a DICOMweb URL.
        conf: ``--conf`` options (see :class:`app.server.config.ServerConfig`).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.server_config = ServerConfig.from_conf(conf or {})
        input_modality = load_preset(self.server_config.preset, self.server_config.weights).input_modality
        # A DICOMweb datastore hands our task the series as a DICOM folder (our reader keeps the
        # patient frame and checks the modality) and lists the series the default preset reads.
        settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI = False
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER = {"Modality": input_modality}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf or {}, name="ReBrain", description=DESCRIPTION, version=lib.__version__)

    def init_infers(self) -> dict[str, InferTask]:
        return {"rebrain": ReBrainInferTask(self.server_config)}

    def init_strategies(self) -> dict:
        # Active-learning strategies pick images to annotate; ReBrain annotates nothing.
        return {}

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label fetches dcmqi (DICOM SEG writer) from GitHub when a DICOMweb datastore starts;
        # ReBrain never writes DICOM SEG, and a clinical host may have no internet access.
        return None

    def infer(self, request: dict, datastore: Any = None) -> dict:
        """MONAI Label's infer, plus: fetching a kept result needs no image, and an image id the
        datastore does not have is a 404 that names it (not an empty path)."""
        task = self._infers.get(request.get("model"))
        if isinstance(task, ReBrainInferTask) and request.get("result_id"):
            file, params = task(request)
            return {"label": file, "tag": DefaultLabelTag.ORIGINAL, "file": file, "params": params}
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            store = datastore or self.datastore()
            try:
                found = store.get_image_uri(image)
                reason = ""
            except Exception as error:  # a DICOMweb datastore raises when the series is not on the server
                found, reason = "", f": {type(error).__name__}: {error}"
            if not found:
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the studies datastore ({self.studies}){reason}")
        return super().infer(request, datastore)

    def batch_infer(self, request: dict, datastore: Any = None) -> dict:
        """MONAI Label's batch infer, but one failing image is recorded and the others go on."""

        def infer_one(one: dict, store: Any) -> dict:
            try:
                return self.infer(one, store)
            except Exception as error:  # any failure is that image's, not the batch's
                detail = error.detail if isinstance(error, HTTPException) else f"{type(error).__name__}: {error}"
                logger.warning("batch: image %s failed: %s", one.get("image"), detail)
                return {"error": detail}

        return self._batch_infer(request, datastore or self.datastore(), infer_one)


if __name__ == "__main__":
    from app.cli import main

    sys.exit(main())
