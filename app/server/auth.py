"""MONAI Label's token check, made to work with PyJWT 2.

MONAI Label 0.8.5's ``from_token`` calls ``jwt.decode(token, key, options=...)`` without
``algorithms``; PyJWT 2 requires it, so with authentication on every token, valid or not, is
refused with 401 ("It is required that you pass in a value for the algorithms argument").
:func:`name_token_algorithms` gives MONAI Label's auth module a PyJWT whose ``decode`` names the
asymmetric algorithms an OpenID Connect realm signs with. Naming them also closes the door to
a token signed with HS256 using the realm's public key as the secret.
"""

from __future__ import annotations

from typing import Any

import jwt

# Signature algorithms of a realm's key pair (Keycloak signs with RS256 by default); no HMAC, no "none".
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


class _PyJWTNamingAlgorithms:
    """PyJWT as MONAI Label's auth module uses it, with ``algorithms`` always named."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jwt, name)

    @staticmethod
    def decode(token: str, key: Any, **kwargs: Any) -> dict:
        return jwt.decode(
            token, key, algorithms=list(ASYMMETRIC_ALGORITHMS), **{k: v for k, v in kwargs.items() if k != "algorithms"}
        )


def name_token_algorithms() -> None:
    """Make MONAI Label's ``from_token`` decode with :data:`ASYMMETRIC_ALGORITHMS` (see the module)."""
    from monailabel.endpoints.user import auth

    auth.jwt = _PyJWTNamingAlgorithms()
