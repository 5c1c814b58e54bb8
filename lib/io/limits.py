"""Size limits on input volumes, checked from headers before any pixel data is read.

A header can claim any size: a 500 KB gzip file may decompress to gigabytes, and two slices
5 m apart make a dense grid of thousands of slices. Readers check what a header announces
against these limits first, so a hostile or corrupt file is refused by name before it can
exhaust memory.
"""

from __future__ import annotations

import os

import numpy as np

from lib.io.errors import VolumeReadError

# An input volume held as float32 in memory: 2 GiB is a 512 x 512 x 2048 CT, far beyond a head.
MAX_VOLUME_BYTES = 2 * 1024**3
# Slices of the dense output grid: 2048 at 0.1 mm (the smallest target spacing) is 20 cm of head.
MAX_GRID_SLICES = 2048


class VolumeTooLarge(VolumeReadError):
    """A volume whose header announces more than the size limit (the server answers 413)."""


def check_volume_bytes(
    path: str | os.PathLike[str], shape: tuple[int, ...], max_bytes: int | None = MAX_VOLUME_BYTES
) -> None:
    """Refuse a volume whose header announces more than ``max_bytes`` as float32.

    Args:
        path: the file or folder, named in the error.
        shape: the announced array shape.
        max_bytes: the limit (None: no limit).

    Raises:
        VolumeTooLarge: naming ``path``, the announced size and the limit.
    """
    announced = int(np.prod([int(n) for n in shape], dtype=np.float64)) * 4
    if max_bytes is not None and announced > max_bytes:
        raise VolumeTooLarge(
            path,
            f"the image would take {announced / 1024**2:.0f} MiB in memory (shape "
            f"{tuple(int(n) for n in shape)}), over the limit of {max_bytes / 1024**2:.0f} MiB",
        )
