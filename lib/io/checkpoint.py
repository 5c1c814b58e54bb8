"""Checkpoints: state dicts and plain values only, written atomically, loaded with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lib.io.atomic import atomic_path


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts, plain Python values) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (``weights_only=True``).

    Args:
        path: the file.
        kind: if given, the ``kind`` the checkpoint must declare (e.g. ``"bbdm"``).

    Raises:
        ValueError: missing, unreadable, or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if kind is not None and state.get("kind") != kind:
        raise ValueError(f"{path}: a {state.get('kind')!r} checkpoint, expected {kind!r}")
    return state


def halve_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str], key: str = "model") -> Path:
    """Copy a weights file with the floating-point tensors of its ``key`` state dict in float16.

    Shipped presets store their networks this way (half the size on disk); loading copies the
    values into the float32 parameters, so inference is unchanged apart from the rounding.
    Weights that name another file's hash (a ControlNet names its BBDM's) must be trained
    against the halved file, because the rounded weights are different weights.

    Raises:
        ValueError: ``src`` unreadable or without a ``key`` state dict.
    """
    state = load_checkpoint(src)
    weights = state.get(key)
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ValueError(f"{src}: no {key!r} state dict to store in float16")
    state[key] = {name: value.half() if value.is_floating_point() else value for name, value in weights.items()}
    return save_checkpoint(dst, state)
