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


def test_acquired_slices_that_drift_by_up_to_a_quarter_of_the_spacing_stay_acquired():
    """Issue 20: on a real tilted CT (4 mm, a 1.1 mm step, 7 mm) five acquired slices lay just over
    0.1 mm off the 1 mm grid and were generated from interpolated CT instead of kept."""
    nominal = np.array([0.0, 4, 5, 12, 16, 23, 27, 34])
    drift = np.array([0.0, 0.25, -0.25, 0.1001, -0.13, 0.2, -0.1001, 0.25])
    volume = Volume(array=np.zeros((2, 2, 8), np.float32), affine=np.eye(4), positions=53.106 + nominal + drift)
    grid = dense_grid(volume, spacing=1.0)
    assert grid.shape[2] == 35  # the last slice drifted up by 0.25 mm: the grid reaches it
    np.testing.assert_array_equal(np.nonzero(grid.acquired)[0], nominal.astype(int))
    np.testing.assert_array_equal(grid.source_index[nominal.astype(int)], np.arange(8))
    np.testing.assert_allclose(grid.snap_mm[nominal.astype(int)], -drift, atol=1e-9)
    assert (grid.snap_mm[~grid.acquired] == 0).all()
    # A gap slice interpolates between the true positions of its acquired neighbours.
    assert (grid.lower[8], grid.upper[8]) == (2, 3)
    assert grid.alpha[8] == pytest.approx((8 - (5 - 0.25)) / ((12 + 0.1001) - (5 - 0.25)))
    # Drift beyond the tolerance is a gap: 0.3 mm off with the default quarter of 1 mm.
    off = Volume(array=np.zeros((2, 2, 3), np.float32), affine=np.eye(4), positions=np.array([0.0, 2.3, 4.0]))
    assert dense_grid(off, 1.0).acquired.tolist() == [True, False, False, False, True]
    assert dense_grid(off, 1.0, tolerance=0.3).acquired.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="half the spacing"):
        dense_grid(off, 1.0, tolerance=0.5)


def test_two_acquired_slices_near_one_grid_slice_keep_the_nearer_one():
    volume = Volume(array=np.zeros((2, 2, 4), np.float32), affine=np.eye(4), positions=np.array([0.0, 0.8, 1.1, 2.0]))
    grid = dense_grid(volume, spacing=1.0)
    assert grid.acquired.tolist() == [True, True, True]
    np.testing.assert_array_equal(grid.source_index, [0, 2, 3])
