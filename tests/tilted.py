"""A gantry-tilted copy of a real CT volume, for the alignment, pipeline and batch tests."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.io.volume import Volume


def make_tilted(volume: Volume, tilt_deg: float) -> Volume:
    """The same head acquired with a gantry tilt: slice origins slide along A by tan(tilt) * p.

    The tilted volume's slice k holds the head at the world points of the sheared grid, i.e.
    the untilted slice shifted in-plane by -(p_k - p_mid) tan(tilt) / pixel along j.
    """
    lean = np.tan(np.radians(tilt_deg))
    middle = volume.positions[len(volume.positions) // 2]
    spacing_y = volume.pixel_spacing[1]
    array = np.stack(
        [
            ndimage.shift(
                volume.array[:, :, k], (0.0, -(p - middle) * lean / spacing_y), order=1, mode="constant", cval=-3024.0
            )
            for k, p in enumerate(volume.positions)
        ],
        axis=2,
    )
    affine = volume.affine.copy()
    affine[:3, 2] = volume.affine[:3, 2] + lean * np.array([0.0, 1.0, 0.0])  # leans along A
    affine[:3, 3] = volume.affine[:3, 3] - middle * lean * np.array([0.0, 1.0, 0.0])
    return Volume(
        array=array.astype(np.float32), affine=affine, positions=volume.positions.copy(), modality="CT", source="tilted"
    )
