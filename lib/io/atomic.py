"""Atomic file writes: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the target's suffixes (``.nii.gz`` stays compressed), and lies
    in the same folder so that the final ``os.replace`` is atomic. If the block raises, the
    temporary file is removed and an existing ``path`` is left untouched.

    Args:
        path: the final destination.

    Yields:
        The temporary path to write to.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


STAGING_PREFIX = ".tmp-"


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; it becomes ``path`` when the block succeeds.

    Readers never see a half-written folder under the final name: the staging name starts
    with :data:`STAGING_PREFIX`, and an existing ``path`` is swapped out only once the new
    content is complete. If the block raises, the staging folder is removed and ``path`` is
    left as it was.
    """
    target = Path(path)
    staging = target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")
    staging.mkdir(parents=True)
    retired = target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}-old-{target.name}")
    try:
        yield staging
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
    finally:
        for leftover in (staging, retired):
            if leftover.exists():
                shutil.rmtree(leftover)
