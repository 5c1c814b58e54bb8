"""The server guard's policy and the answers' path scrubbing, without a server (the real-server
attacks are in test_server_security.py and test_server_auth.py)."""

from __future__ import annotations

import asyncio

import pytest

from app.server.guard import ServerGuard, is_public
from app.server.infer_task import public_message
from app.server.request import is_safe_id
from lib.io.errors import VolumeReadError


def scope(method: str, path: str, query: bytes = b"", headers: list | None = None) -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": headers or [],
        "root_path": "",
    }


def guard(read_only: bool = True, auth: bool = False, limit: int = 1000, app=None) -> ServerGuard:
    return ServerGuard(app, read_only=read_only, max_body_bytes=limit, auth_enabled=auth, admin_role="monailabel-admin")


@pytest.mark.parametrize(
    ("method", "path", "public"),
    [
        ("GET", "/info/", True),
        ("POST", "/infer/rebrain", True),
        ("OPTIONS", "/infer/rebrain", True),
        ("GET", "/", True),
        ("GET", "/infer/rebrain", False),
        ("POST", "/infer/wsi/rebrain", False),
        ("PUT", "/datastore/image", False),
        ("GET", "/datastore/", False),
        ("DELETE", "/model/rebrain", False),
        ("GET", "/logs/", False),
        ("POST", "/reload", False),
        ("GET", "/proxy/dicom/qido", False),
        ("POST", "/batch/infer/rebrain", False),
        ("GET", "/static/../../etc/passwd", True),
    ],
)
def test_only_info_infer_and_docs_are_public(method, path, public):
    assert is_public(method, path) is public


def test_refusals_by_policy():
    read_only = guard()
    assert read_only.refusal(scope("POST", "/infer/rebrain", b"image=head_ct")) is None
    assert read_only.refusal(scope("DELETE", "/datastore/image", b"id=head_ct"))[0] == 403
    assert read_only.refusal(scope("POST", "/infer/rebrain", b"image=..%2Fsecret"))[0] == 404
    assert read_only.refusal(scope("POST", "/infer/rebrain", b"image=%2Fetc"))[0] == 404
    assert read_only.refusal(scope("POST", "/infer/rebrain", headers=[(b"content-length", b"1001")]))[0] == 413
    assert read_only.refusal(scope("POST", "/infer/rebrain", headers=[(b"content-length", b"1000")])) is None
    assert guard(read_only=False).refusal(scope("DELETE", "/datastore/image", b"id=head_ct")) is None
    no_token = guard(read_only=False, auth=True).refusal(scope("DELETE", "/datastore/image", b"id=head_ct"))
    assert no_token[0] == 401 and "bearer token" in no_token[1]


def run_guarded(chunks: list[bytes], limit: int) -> list[dict]:
    """Send ``chunks`` as a body without a length through a guard whose app reads it all."""

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(guard(limit=limit, app=app)(scope("POST", "/infer/rebrain"), receive, send))
    return sent


def test_a_body_without_length_is_cut_at_the_limit():
    assert run_guarded([b"x" * 600, b"x" * 400], limit=1000)[0]["status"] == 200
    refused = run_guarded([b"x" * 600, b"x" * 600, b"x" * 600], limit=1000)
    assert refused[0]["status"] == 413 and b"upload limit" in refused[1]["body"]


@pytest.mark.parametrize("value", ["head_ct", "1.2.840.10008.5.1.4", "brain t1", "a-b_c.d"])
def test_safe_ids(value):
    assert is_safe_id(value)


@pytest.mark.parametrize(
    "value", ["", ".", "..", "../x", "/etc", "a/b", "a\\b", ".hidden", "x..y", "a\x00b", "a\nb", 7]
)
def test_unsafe_ids(value):
    assert not is_safe_id(value)


def test_answers_name_the_input_by_its_id_and_no_server_path():
    error = VolumeReadError(
        "/srv/studies/ct_folder/IM0001.dcm", "cannot decode the pixel data (in /usr/lib/python3/x.py)"
    )
    message = public_message(error, "/srv/studies/ct_folder", "ct_folder_id")
    assert message.startswith("ct_folder_id/IM0001.dcm: cannot decode")
    assert "/srv" not in message and "/usr" not in message and "x.py" in message
    upload = public_message(
        VolumeReadError("/tmp/rebrain-upload-abc/upload.nii.gz", "not a readable NIfTI image"),
        "/tmp/rebrain-upload-abc/upload.nii.gz",
        "upload",
    )
    assert upload == "upload: not a readable NIfTI image"
