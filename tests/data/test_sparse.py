"""Sparse-acquisition simulation."""

from __future__ import annotations

import numpy as np
import pytest

from lib.data.sparse import simulate_sparse_volume, simulate_sparsity, sparse_indices
from lib.io import dense_grid, read_volume


@pytest.mark.parametrize(("factor", "offset", "expected"), [(2, 0, [0, 2, 4, 6, 8]), (3, 1, [1, 4, 7]), (4, 3, [3, 7])])
def test_every_kth_slice(factor, offset, expected):
    volume = np.arange(10, dtype=np.float32)[None, None, :].repeat(3, 0).repeat(3, 1)
    sparse, kept = simulate_sparsity(volume, factor, offset)
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(sparse[0, 0], expected)


def test_explicit_indices_and_errors():
    np.testing.assert_array_equal(sparse_indices(10, indices=[7, 1, 3, 3]), [1, 3, 7])
    with pytest.raises(ValueError, match="offset"):
        sparse_indices(10, 2, offset=2)
    with pytest.raises(ValueError, match=">= 1"):
        sparse_indices(10, 0)
    with pytest.raises(ValueError, match="within 0..9"):
        sparse_indices(10, indices=[1, 12])
    with pytest.raises(ValueError, match="exactly one"):
        sparse_indices(10, 2, indices=[1, 2])


def test_sparse_real_volume_regrids_onto_the_dense_slices(brats_case):
    dense = read_volume(brats_case / "t1n.nii.gz")
    sparse = simulate_sparse_volume(dense, factor=3, offset=1)
    grid = dense_grid(sparse, spacing=1.0)
    # The grid runs from the first to the last kept slice: dense slices 1 .. 154.
    assert grid.shape[2] == 154
    np.testing.assert_allclose(
        grid.affine, dense.voxel_affine() @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    )
    kept = np.nonzero(grid.acquired)[0] + 1
    np.testing.assert_array_equal(kept, np.arange(1, 155, 3))
    np.testing.assert_array_equal(sparse.array[:, :, grid.source_index[grid.acquired]], dense.array[:, :, kept])
