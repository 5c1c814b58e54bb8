"""Volume geometry: canonicalisation of slice stacks and the dense target grid."""

from __future__ import annotations

import numpy as np
import pytest

from lib.io.errors import VolumeReadError
from lib.io.limits import MAX_GRID_SLICES
from lib.io.volume import Volume, dense_grid, volume_from_slices


def test_flipped_stack_is_canonicalised_with_positions_reversed():
    array = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    # Axes: i -> left (-R), j -> anterior, p -> inferior (slices stored top to bottom).
    affine = np.array([[-1.0, 0, 0, 10], [0, 2.0, 0, 20], [0, 0, -1.0, 30], [0, 0, 0, 1]])
    positions = np.array([0.0, 3.0, 4.0])
    volume = volume_from_slices(array, affine, positions)
    assert np.all(np.diag(volume.affine)[:3] > 0)
    np.testing.assert_allclose(volume.positions, [0.0, 1.0, 4.0])
    for i, j, k in [(0, 0, 0), (3, 4, 2), (1, 2, 1)]:
        before = affine @ [i, j, positions[k], 1]
        found = np.argwhere(volume.array == array[i, j, k])[0]
        after = volume.affine @ [found[0], found[1], volume.positions[found[2]], 1]
        np.testing.assert_allclose(after, before)


def test_dense_grid_of_a_regular_x2_volume():
    volume = Volume(array=np.zeros((2, 2, 5), np.float32), affine=np.eye(4), positions=np.array([0.0, 2, 4, 6, 8]))
    grid = dense_grid(volume, spacing=1.0)
    assert grid.shape == (2, 2, 9)
    np.testing.assert_array_equal(grid.acquired, [True, False] * 4 + [True])
    np.testing.assert_array_equal(grid.source_index, [0, -1, 1, -1, 2, -1, 3, -1, 4])
    np.testing.assert_allclose(grid.alpha, [0, 0.5] * 4 + [0])
    np.testing.assert_array_equal(grid.lower[1::2], [0, 1, 2, 3])
    np.testing.assert_array_equal(grid.upper[1::2], [1, 2, 3, 4])
    assert grid.gap_count == 4
    with pytest.raises(ValueError, match="positive"):
        dense_grid(volume, spacing=0)


def test_voxel_affine_refuses_irregular_slices():
    volume = Volume(array=np.zeros((2, 2, 3), np.float32), affine=np.eye(4), positions=np.array([0.0, 1, 3]))
    with pytest.raises(ValueError, match="irregularly spaced"):
        volume.voxel_affine()
    with pytest.raises(ValueError, match="strictly increasing"):
        Volume(array=np.zeros((2, 2, 3), np.float32), affine=np.eye(4), positions=np.array([0.0, 1, 1]))


def test_dense_grid_refuses_an_absurd_number_of_slices():
    """Issue 17, finding 7: two slices 5 m apart made a grid of 50,001 slices at 0.1 mm."""
    volume = Volume(
        array=np.zeros((2, 2, 2), np.float32),
        affine=np.eye(4),
        positions=np.array([0.0, 5000.0]),
        source="far_apart.nii.gz",
    )
    with pytest.raises(VolumeReadError, match=r"far_apart.nii.gz: .*50001 slices"):
        dense_grid(volume, spacing=0.1)
    assert dense_grid(volume, spacing=5000.0 / (MAX_GRID_SLICES - 1)).shape[2] == MAX_GRID_SLICES
