"""The one error type raised for unreadable or unusable input volumes."""

from __future__ import annotations

from os import PathLike


class VolumeReadError(ValueError):
    """An input volume cannot be used; the message names the file and the reason.

    Args:
        path: the file or folder at fault.
        reason: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
