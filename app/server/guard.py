"""The server's front door: which endpoints answer, who may call them, and how big a request may be.

MONAI Label serves every endpoint of its framework (datastore upload, download and delete,
model upload and delete, logs, training, active learning, sessions, a DICOMweb proxy, ...),
and with its authentication off (its default) to anyone who reaches the port. ReBrain needs
two: ``GET /info/`` and ``POST /infer/{model}``. :class:`ServerGuard` is an ASGI middleware in
front of MONAI Label's app that

- answers only those (and the API docs) while the server is read-only, the default; every
  other endpoint gets 403 and a message that says how an admin opens it;
- with ``--conf read_only false`` opens the other endpoints to the admin role: when MONAI
  Label's authentication is on, the bearer token is checked with MONAI Label's own
  :func:`~monailabel.endpoints.user.auth.from_token` (the realm's public key);
- refuses an id that is a path (``image=../x``, ``id=/etc``) in any endpoint's query with 404
  before MONAI Label's datastore touches the file system;
- refuses a request body over the upload limit with 413: from its Content-Length before a
  byte is read, or as soon as a chunked body passes the limit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse

from app.server.request import is_safe_id

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# (methods, path) that every user may call (MONAI Label's RBAC still asks for a role when auth
# is on). Everything else is an admin endpoint: closed while read-only.
PUBLIC_ENDPOINTS = (
    (frozenset({"GET", "HEAD"}), re.compile(r"^/(favicon\.ico|docs|openapi\.json|static/.*)?$")),
    (frozenset({"GET", "HEAD"}), re.compile(r"^/info/?$")),
    (frozenset({"POST"}), re.compile(r"^/infer/[^/]+$")),
    # MONAI Label's login router (present only with auth on): trades a password for a token.
    (frozenset({"GET", "POST"}), re.compile(r"^/auth/.*$")),
)
# Query parameters that MONAI Label's endpoints take as a datastore id.
ID_PARAMETERS = ("image", "id", "label", "image_id", "label_id")
READ_ONLY_MESSAGE = (
    "{method} {path} is disabled: this ReBrain server is read-only (it serves /info/ and /infer only). "
    "An admin can open MONAI Label's other endpoints to the admin role with --conf read_only false (README, Security)"
)


def is_public(method: str, path: str) -> bool:
    """True for an endpoint every user may call (``OPTIONS``: a browser's CORS preflight of one)."""
    return any(
        (method in methods or method == "OPTIONS") and pattern.match(path) for methods, pattern in PUBLIC_ENDPOINTS
    )


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, or None."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class UploadTooLarge(Exception):
    """A request body passed the upload limit while it was being read."""


class ServerGuard:
    """ASGI middleware: endpoint policy, path-like ids and the upload limit (see the module).

    Args:
        app: the ASGI app behind it (MONAI Label's).
        read_only: serve only :data:`PUBLIC_ENDPOINTS`.
        max_body_bytes: the largest request body accepted.
        auth_enabled: MONAI Label's authentication is on (admin endpoints then need the admin role).
        admin_role: the role name of MONAI Label's admins.
    """

    def __init__(self, app: ASGIApp, read_only: bool, max_body_bytes: int, auth_enabled: bool, admin_role: str) -> None:
        self.app = app
        self.read_only = read_only
        self.max_body_bytes = max_body_bytes
        self.auth_enabled = auth_enabled
        self.admin_role = admin_role

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            status, detail = refusal
            logger.warning("refused %s %s: %s", scope["method"], scope["path"], status)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
            return
        await self._bounded(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """The (status, detail) a request is refused with before it reaches MONAI Label, or None."""
        method, path = scope["method"], self._path(scope)
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if name in ID_PARAMETERS and value and not is_safe_id(value):
                return 404, f"query parameter {name!r} is not an id of this server (ids are names, never paths)"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large_message()
        if is_public(method, path):
            return None
        if self.read_only:
            return 403, READ_ONLY_MESSAGE.format(method=method, path=path)
        if self.auth_enabled:
            return self._admin_refusal(scope)
        return None

    def _admin_refusal(self, scope: Scope) -> tuple[int, str] | None:
        from jwt import InvalidTokenError
        from monailabel.endpoints.user.auth import from_token

        token = bearer_token(scope)
        if token is None:
            return 401, "not authenticated: this endpoint needs a bearer token of the admin role"
        try:
            user = from_token(token)
        except (InvalidTokenError, ValueError) as error:
            return 401, f"could not validate the token ({type(error).__name__})"
        if self.admin_role not in user.roles:
            return 403, f'role "{self.admin_role}" is required for {scope["method"]} {self._path(scope)}'
        return None

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, ending the request with 413 once a body without a length passes the limit.

        The app sees the body end in an exception; whatever it answers to that is dropped.
        """
        received = 0
        overflow = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflow = True
                    raise UploadTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if overflow:
                return  # the app's own answer to the aborted body (400 or 500): ours is 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await JSONResponse({"detail": self._too_large_message()}, status_code=413)(scope, receive, send)

    def _too_large_message(self) -> str:
        return f"request body over the upload limit of {self.max_body_bytes // 1024**2} MiB (--conf max_upload_mb)"

    @staticmethod
    def _path(scope: Scope) -> str:
        path, root = scope["path"], scope.get("root_path", "")
        return path[len(root) :] if root and path.startswith(root) else path
