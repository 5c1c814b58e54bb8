"""A small OpenID Connect token issuer on 127.0.0.1 for the auth tests (Keycloak is not installable here).

It serves what MONAI Label's authentication reads from a Keycloak realm: the realm document
with its RSA public key (``GET /realms/NAME``) and the OpenID configuration
(``GET /realms/NAME/.well-known/openid-configuration``), and signs RS256 tokens with the
claims MONAI Label reads (``preferred_username``, ``realm_access.roles``, ``exp``).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def new_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Realm:
    """The issuer: start it, mint tokens, stop it.

    Args:
        name: the realm name (in its URL).
    """

    def __init__(self, name: str = "rebrain") -> None:
        self.name = name
        self.key = new_key()
        public_der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(public_der).decode()
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def uri(self) -> str:
        """The realm's URL (``MONAI_LABEL_AUTH_REALM_URI``)."""
        assert self._server is not None, "start the realm first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/realms/{self.name}"

    def token(
        self, username: str, roles: list[str], lifetime_s: float = 600.0, key: rsa.RSAPrivateKey | None = None
    ) -> str:
        """An RS256 access token for ``username`` with ``roles`` (signed by this realm unless ``key``)."""
        now = int(time.time())
        claims = {
            "iss": self.uri,
            "sub": username,
            "preferred_username": username,
            "email": f"{username}@example.org",
            "name": username,
            "iat": now,
            "exp": int(now + lifetime_s),
            "realm_access": {"roles": roles},
        }
        return jwt.encode(claims, key or self.key, algorithm="RS256")

    def start(self) -> Realm:
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                realm.requests.append(self.path)
                base = f"/realms/{realm.name}"
                if self.path == base:
                    body = {
                        "realm": realm.name,
                        "public_key": realm.public_key,
                        "token-service": f"{realm.uri}/protocol/openid-connect",
                    }
                elif self.path == f"{base}/.well-known/openid-configuration":
                    body = {
                        "issuer": realm.uri,
                        "token_endpoint": f"{realm.uri}/protocol/openid-connect/token",
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
