"""The MONAI Label app: ``monailabel start_server --app . --studies DIR_OR_DICOMWEB_URL [--conf NAME VALUE ...]``.

MONAI Label loads ``main.py`` and takes the :class:`ReBrainApp` it imports from here (see README,
"Server"); the command line (``python main.py <command>``) never imports this module, so it
starts without MONAI Label and FastAPI.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask

import lib
from app.server.auth import name_token_algorithms
from app.server.config import ServerConfig
from app.server.guard import ServerGuard
from app.server.infer_task import DESCRIPTION, ReBrainInferTask
from app.server.request import UploadedImage, is_safe_id
from app.server.routes import replace_infer_route
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
        check_exposure(
            bound_host(sys.argv), settings.MONAI_LABEL_AUTH_ENABLE, self.server_config.insecure_remote_access
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf or {},
            name="ReBrain",
            description=DESCRIPTION,
            version=lib.__version__,
        )
        self._guard_server()
        self._cancel_on_shutdown()

    def _guard_server(self) -> None:
        """In the server process: put :class:`ServerGuard` in front of MONAI Label's app and
        replace its infer route (:mod:`app.server.routes`)."""
        server = sys.modules.get("monailabel.app")
        if server is None:  # the app object outside a server (tests, scripts): nothing to guard
            return
        from monailabel.endpoints import infer as infer_endpoints

        fastapi_app = server.app
        name_token_algorithms()
        replace_infer_route(infer_endpoints.router.routes)
        # MONAI Label builds its middleware before it creates this app (in its lifespan), so
        # the guard wraps the built stack instead of being added with add_middleware.
        stack = fastapi_app.middleware_stack or fastapi_app.build_middleware_stack()
        fastapi_app.middleware_stack = ServerGuard(
            stack,
            read_only=self.server_config.read_only,
            max_body_bytes=self.server_config.max_upload_bytes,
            auth_enabled=settings.MONAI_LABEL_AUTH_ENABLE,
            admin_role=settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
        )
        logger.info(
            "ReBrain server: %s, auth %s, uploads up to %d MiB",
            "read-only" if self.server_config.read_only else "admin endpoints open",
            "on" if settings.MONAI_LABEL_AUTH_ENABLE else "off",
            self.server_config.max_upload_mb,
        )

    def _cancel_on_shutdown(self) -> None:
        """Make SIGTERM and SIGINT cancel running reconstructions before uvicorn's own handler
        waits for the requests to end (otherwise a long request holds the shutdown for minutes)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                for task in self._infers.values():
                    if isinstance(task, ReBrainInferTask):
                        task.cancel()
                if callable(previous):
                    previous(signum, frame)

            signal.signal(number, handler)

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
        """MONAI Label's infer, but the image is an upload the route saved or the id of a study in
        the datastore, never a path; fetching a kept result needs no image.

        Raises:
            HTTPException: 404 for an id that is not a study of the datastore (a path-like id is
                refused without touching the file system; the answer names no server path).
        """
        task = self._infers.get(request.get("model"))
        if isinstance(task, ReBrainInferTask) and request.get("result_id"):
            file, params = task(request)
            return {"label": file, "tag": DefaultLabelTag.ORIGINAL, "file": file, "params": params}
        image = request.get("image")
        if isinstance(image, UploadedImage):
            return super().infer({**request, "image": image.path, "image_name": "upload"}, datastore)
        found = self.study_path(image, datastore or self.datastore())
        # The id goes on to MONAI Label, which resolves it in the datastore (and saves batch
        # labels); but MONAI Label reads an id that names a file in its working folder as that
        # file, so such an id goes on as the study's own path.
        return super().infer(
            {**request, "image": found if os.path.exists(image) else image, "image_name": image}, datastore
        )

    def study_path(self, image: Any, store: Any) -> str:
        """The file or folder of the study ``image`` in ``store``; refuses anything else (see :meth:`infer`)."""
        if not is_safe_id(image):
            raise HTTPException(
                status_code=404, detail="image: not a study id of this server (ids are names, never paths)"
            )
        try:
            found = store.get_image_uri(image)
        except Exception as error:  # a DICOMweb datastore raises when the series is not on the server
            logger.info("image %r not found in the datastore: %s: %s", image, type(error).__name__, error)
            found = ""
        # A DICOMweb datastore downloads the series into its own cache (a LocalDatastore too).
        if found and isinstance(store, LocalDatastore) and not isinstance(store, DICOMWebDatastore):
            studies = Path(self.studies).resolve()
            if studies not in Path(found).resolve().parents:
                logger.warning("image %r resolves outside the studies folder; refused", image)
                found = ""
        if not found:
            raise HTTPException(status_code=404, detail=f"image {image!r} is not a study in this server's datastore")
        return found

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


def bound_host(argv: list[str]) -> str | None:
    """The address ``monailabel start_server`` binds (its default 0.0.0.0), or None outside it."""
    if "start_server" not in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-i", "--host", default="0.0.0.0")
    return parser.parse_known_args(argv[argv.index("start_server") + 1 :])[0].host


def check_exposure(host: str | None, auth_enabled: bool, insecure_remote_access: bool) -> None:
    """Refuse to serve without authentication on an address other than loopback.

    Raises:
        ValueError: with what to do instead (the server does not start).
    """
    if host is None or auth_enabled or insecure_remote_access:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"ReBrain will not serve without authentication on {host} (every host that reaches it could read "
            "and reconstruct studies): "
            "pass --host 127.0.0.1, or turn MONAI Label's authentication on (MONAI_LABEL_AUTH_ENABLE=true with "
            "a realm; README, Security), "
            "or, only behind a gateway that authenticates, --conf insecure_remote_access true"
        )
