"""MONAI Label's own authentication, end to end: the real server with ``MONAI_LABEL_AUTH_ENABLE``
against a real OpenID Connect token issuer on loopback (tests/app/oidc_realm.py), and the
admin endpoints an admin opens with ``--conf read_only false``."""

from __future__ import annotations

import shutil

import jwt
import nibabel as nib
import pytest
import requests

from tests.app.oidc_realm import Realm, new_key
from tests.app.test_server import infer, parts
from tests.conftest import SERVER_STEPS

USER_ROLE, ADMIN_ROLE = "monailabel-user", "monailabel-admin"


@pytest.fixture(scope="module")
def realm():
    issuer = Realm().start()
    yield issuer
    issuer.stop()


@pytest.fixture(scope="module")
def auth_studies(server_studies, tmp_path_factory):
    """A copy of the test studies (batch inference writes labels into its studies folder)."""
    folder = tmp_path_factory.mktemp("auth_studies") / "studies"
    shutil.copytree(server_studies, folder, ignore=shutil.ignore_patterns("labels", ".lock", "datastore_v2.json"))
    return folder


@pytest.fixture(scope="module")
def auth_server(realm, server_weights, auth_studies, tmp_path_factory):
    """The server with authentication on and the admin endpoints open (to admins)."""
    from tests.app.server_process import running_server, wait_until_up

    conf = {
        "weights": server_weights,
        "preset": "tinyct",
        "device": "cpu",
        "preload": "true",
        "steps": SERVER_STEPS,
        "results": tmp_path_factory.mktemp("results"),
        "read_only": "false",
    }
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri}
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server(str(auth_studies), conf, log, wait=False, env=env) as (process, url):
        # /info/ needs a token now: wait for it with one.
        headers = bearer(realm.token("probe", [USER_ROLE]))
        assert wait_until_up(url + "/info/", alive=lambda: process.poll() is None, headers=headers), log.read_text()[
            -3000:
        ]
        yield url


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401(auth_server):
    assert requests.get(f"{auth_server}/info/", timeout=30).status_code == 401
    response = infer(auth_server, "head_ct")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("make_token", "status"),
    [
        (lambda realm: realm.token("nobody", ["offline_access"]), 403),  # valid, but without the user role
        (lambda realm: realm.token("late", [USER_ROLE], lifetime_s=-60), 401),  # expired
        (lambda realm: realm.token("forger", [USER_ROLE, ADMIN_ROLE], key=new_key()), 401),  # signed by another key
        (lambda realm: "not-a-jwt", 401),
        # Unsigned (alg "none") and HMAC-signed with the realm's public key as the secret.
        (
            lambda realm: jwt.encode(
                jwt.decode(realm.token("x", [USER_ROLE]), options={"verify_signature": False}), None, algorithm="none"
            ),
            401,
        ),
        (
            lambda realm: jwt.encode(
                jwt.decode(realm.token("x", [USER_ROLE]), options={"verify_signature": False}),
                realm.public_key,
                algorithm="HS256",
            ),
            401,
        ),
    ],
)
def test_tokens_that_must_not_pass(auth_server, realm, make_token, status):
    response = requests.post(
        f"{auth_server}/infer/rebrain",
        params={"image": "head_ct"},
        files={"params": (None, "{}")},
        headers=bearer(make_token(realm)),
        timeout=60,
    )
    assert response.status_code == status, response.text


def test_a_user_token_reconstructs(auth_server, realm):
    files = {"params": (None, '{"simulate_sparsity": 2}')}
    response = requests.post(
        f"{auth_server}/infer/rebrain",
        params={"image": "head_ct"},
        files=files,
        headers=bearer(realm.token("radiologist", [USER_ROLE])),
        timeout=300,
    )
    params, mri = parts(response)
    assert params["synthetic"] is True and mri.shape[2] > 0


def test_admin_endpoints_need_the_admin_role(auth_server, realm, auth_studies):
    user = bearer(realm.token("radiologist", [USER_ROLE]))
    # MONAI Label would let any annotator delete a study; the guard asks for the admin role.
    deleted = requests.delete(f"{auth_server}/datastore/image", params={"id": "head_ct"}, headers=user, timeout=30)
    assert deleted.status_code == 403 and "monailabel-admin" in deleted.json()["detail"]
    assert (auth_studies / "head_ct.nii.gz").is_file()
    assert requests.get(f"{auth_server}/logs/", headers=user, timeout=30).status_code == 403
    assert requests.get(f"{auth_server}/logs/", timeout=30).status_code == 401
    # Even an admin cannot name a path as an id.
    admin = bearer(realm.token("admin", [ADMIN_ROLE, USER_ROLE]))
    escaped = requests.put(
        f"{auth_server}/datastore/image",
        params={"image": "../escape_noext"},
        files={"file": ("x", b"data")},
        headers=admin,
        timeout=30,
    )
    assert escaped.status_code == 404
    assert not (auth_studies.parent / "escape_noext").exists()


def test_batch_infer_by_an_admin_records_provenance_per_image_and_survives_a_bad_one(auth_server, realm, auth_studies):
    user = bearer(realm.token("radiologist", [USER_ROLE]))
    body = {"multi_gpu": False, "device": "cpu", "simulate_sparsity": 2, "label_tag": "original"}
    refused = requests.post(
        f"{auth_server}/batch/infer/rebrain",
        params={"images": "all", "run_sync": "true"},
        json=body,
        headers=user,
        timeout=60,
    )
    assert refused.status_code == 403
    admin = bearer(realm.token("admin", [ADMIN_ROLE, USER_ROLE]))
    response = requests.post(
        f"{auth_server}/batch/infer/rebrain",
        params={"images": "all", "run_sync": "true"},
        json=body,
        headers=admin,
        timeout=600,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"head_ct", "head_ct_upper", "head_ct_upside_down", "brain_t1"}
    assert "do not look like a CT" in result["brain_t1"]["error"]
    assert "registration to the head CT template failed" in result["head_ct_upside_down"]["error"]
    assert str(auth_studies) not in response.text
    for image in ("head_ct", "head_ct_upper"):
        assert result[image]["params"]["summary"]["preset"] == "tinyct"
        saved = nib.load(auth_studies / "labels" / "original" / f"{image}.nii.gz")
        assert b"SYNTHETIC" in saved.header["descrip"].tobytes()
    datastore = requests.get(f"{auth_server}/datastore/", params={"output": "all"}, headers=admin, timeout=30).json()
    for image in ("head_ct", "head_ct_upper"):
        info = datastore["objects"][image]["labels"]["original"]["info"]
        assert info["params"]["synthetic"] is True and len(info["params"]["slices"]) > 0


def test_the_slicer_client_signs_in_with_a_token(auth_server, realm):
    from slicer_extension.ReBrain.ReBrainLib.client import ReBrainClient, ServerError

    with pytest.raises(ServerError, match="HTTP 401.*needs sign-in"):
        ReBrainClient(auth_server).info()
    assert "tinyct" in ReBrainClient(auth_server, token=realm.token("radiologist", [USER_ROLE])).presets()
