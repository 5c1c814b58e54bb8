"""Rebuilding model config dataclasses from the plain dicts stored in checkpoints."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], what: str) -> ConfigT:
    """Build ``cls(**values)``; keys the dataclass does not have are an error, not ignored.

    Args:
        cls: the config dataclass.
        values: its fields as stored.
        what: the config's name in the error message (e.g. ``"BBDM config"``).

    Raises:
        ValueError: naming the unknown keys.
    """
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}")
    return cls(**values)
