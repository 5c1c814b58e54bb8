"""ReBrain's ``POST /infer/{model}``: MONAI Label's protocol, without its open doors.

Same URL, query, form fields and multipart answer as MONAI Label's own route (so every MONAI
Label client and the Slicer module work unchanged), with four differences:

- it is a plain function, so FastAPI runs it in its thread pool: a reconstruction never blocks
  the event loop, and ``/info/`` answers during one;
- an upload is saved in a private folder (mode 0700) and deleted when the request ends,
  whatever the outcome (MONAI Label's route left failed uploads in /tmp);
- the image reaches the app as an :class:`~app.server.request.UploadedImage` or as an id: a
  ``params`` key can no longer replace it with a server path;
- malformed ``params`` and features ReBrain does not have (sessions, labels, DICOM SEG) are
  refused with 422 and a message, not 500.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import monailabel
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from app.server.request import UploadedImage

# The route's path in MONAI Label's infer router (the app adds its API prefix when it includes it).
INFER_PATH = "/infer/{model}"
UPLOAD_SUFFIXES = (".nii.gz", ".nii")
# Keys of the request that come from the route, never from the client's params.
# ``save_label``/``label_tag`` would make an infer write a label into the datastore.
RESERVED_KEYS = ("model", "image", "image_name", "label", "session", "session_id", "save_label", "label_tag")


def refuse(detail: str) -> HTTPException:
    """A 422 answer with ReBrain's prefix."""
    return HTTPException(status_code=422, detail=f"ReBrain cannot use this request: {detail}")


def parse_params(params: str) -> dict:
    """The ``params`` form field as a JSON object.

    Raises:
        HTTPException: 422 when it is not a JSON object.
    """
    try:
        parsed = json.loads(params) if params else {}
    except ValueError as error:
        raise refuse(f"'params' is not valid JSON ({error.msg} at position {error.pos})") from None
    if not isinstance(parsed, dict):
        raise refuse(f"'params' must be a JSON object, not {type(parsed).__name__}")
    return parsed


def save_upload(file: UploadFile, folder: Path) -> Path:
    """Copy an uploaded NIfTI file into ``folder`` (a private temporary folder).

    Raises:
        HTTPException: 422 when the file name does not end in .nii or .nii.gz.
    """
    name = (file.filename or "").lower()
    suffix = next((s for s in UPLOAD_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise refuse(
            "the uploaded file must be a NIfTI image (.nii or .nii.gz); send DICOM series through the studies datastore"
        )
    path = folder / f"upload{suffix}"
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out)
    return path


def run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: ResultType | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """Run the ``model`` infer task on a datastore image or an uploaded one (see the module)."""
    if session_id or label:
        raise refuse("sessions and label uploads are not supported by ReBrain")
    if output == ResultType.dicom_seg:
        raise refuse("output 'dicom_seg' is not supported: ReBrain returns an image, not a segmentation")
    request = {key: value for key, value in parse_params(params).items() if key not in RESERVED_KEYS}
    instance = app_instance()
    with tempfile.TemporaryDirectory(prefix="rebrain-upload-") as folder:  # created with mode 0700
        if file:
            request["image"] = UploadedImage(str(save_upload(file, Path(folder))))
        elif image:
            request["image"] = image
        elif not request.get("result_id"):
            raise refuse("no image: name a study with ?image=ID or upload a NIfTI file")
        else:
            request["image"] = ""
        result = instance.infer({**request, "model": model})
    if result is None:
        raise HTTPException(status_code=500, detail="inference returned no result")
    return send_response(instance.datastore(), result, output, background_tasks)


def replace_infer_route(routes: list) -> None:
    """Swap MONAI Label's ``POST /infer/{model}`` in ``routes`` (the list of
    ``monailabel.endpoints.infer.router``; before the server's first request, when FastAPI
    builds its route table) for :func:`run_inference`."""
    for index, route in enumerate(routes):
        if isinstance(route, APIRoute) and route.path == INFER_PATH and "POST" in route.methods:
            routes[index] = APIRoute(
                INFER_PATH,
                run_inference,
                methods=["POST"],
                summary=route.summary,
                tags=route.tags,
                responses=route.responses,
            )
            return
    raise RuntimeError(f"MONAI Label {monailabel.__version__} has no POST {INFER_PATH} route to replace")
