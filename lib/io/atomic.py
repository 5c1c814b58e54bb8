"""Atomic file writes: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
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


def check_writable_folder(path: str | os.PathLike[str]) -> Path:
    """Make sure :func:`atomic_directory` will be able to write a folder at ``path``.

    Creates the missing parent folders, then creates and removes a staging folder beside
    ``path``: the only sure test of writing (permissions, read-only mounts, ``/proc``). Run it
    before a long computation, so that an unwritable destination fails first, not last.

    Args:
        path: the folder to be written.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: (its subclass as raised) naming ``path`` and the reason in one line.
    """
    target = Path(path)
    existing = next(folder for folder in target.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{target}: cannot write the folder: {existing} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
    except OSError as error:
        raise type(error)(
            f"{target}: cannot write the folder: no folder can be made in {existing} ({error.strerror or error})"
        ) from error
    return target


def check_replaceable_folder(path: str | os.PathLike[str], is_ours: Callable[[Path], bool], ours: str) -> Path:
    """Refuse a folder that :func:`atomic_directory` would replace but that holds something else.

    A result replaces its folder as a whole, so the folder must be new, empty, or one that
    ``is_ours`` recognises (an earlier result of the same kind, holding nothing else): a file
    the program did not write is never deleted. Then :func:`check_writable_folder`.

    Args:
        path: the folder to be written.
        is_ours: True for a folder the program wrote and nothing else.
        ours: what such a folder is, for the message (e.g. "a ReBrain output: mri.nii.gz, ...").

    Raises:
        FileExistsError: a file or a link, or a non-empty folder that is not ours.
        OSError: the folder cannot be created or written.
    """
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(
            f"{target}: exists and is not a folder (a file or a link); choose a new or empty output folder"
        )
    if target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise FileExistsError(
            f"{target}: the output folder is not empty and not {ours} (a result replaces the whole folder, and nothing "
            "ReBrain did not write is deleted); choose a new or empty output folder"
        )
    return check_writable_folder(target)
