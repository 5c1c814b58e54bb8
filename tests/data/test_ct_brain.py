"""Brain extraction from real head CT: the intracranial mask found from Hounsfield units."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from lib.data.ct_brain import BONE_HU, extract_brain, voxel_size_mm
from lib.io import VolumeReadError
from lib.io.volume import Volume

# An adult intracranial volume is about 1200-1700 ml; allow some margin either side.
ADULT_ML = (1000.0, 1800.0)


@pytest.fixture(scope="module")
def real_extraction(real_ct_volume):
    return extract_brain(real_ct_volume)


@pytest.fixture(scope="module")
def cranium_extraction(cranium):
    return extract_brain(cranium)


def _middle_slice(mask: np.ndarray) -> int:
    slices = np.nonzero(mask.any(axis=(0, 1)))[0]
    return int((slices[0] + slices[-1]) // 2)


def _bone_on_both_sides(bone: np.ndarray) -> np.ndarray:
    """Per pixel of a 2-D slice: bone lies on both sides along x, or on both sides along y."""

    def both(axis: int) -> np.ndarray:
        before = np.logical_or.accumulate(bone, axis=axis)
        after = np.flip(np.logical_or.accumulate(np.flip(bone, axis), axis=axis), axis)
        return before & after

    return both(0) | both(1)


def _air_distance_mm(volume: Volume) -> np.ndarray:
    """Per slice: in-plane distance (mm) of every voxel to the nearest air (< -300 HU)."""
    sx, sy, _ = voxel_size_mm(volume)
    air_free = volume.array >= -300
    return np.stack(
        [ndimage.distance_transform_edt(air_free[:, :, k], sampling=(sx, sy)) for k in range(volume.shape[2])], axis=2
    )


def _check_intracranial(volume: Volume, result) -> None:
    """The checks every full-coverage real head CT must pass."""
    assert result is not None
    mask, hu = result.mask, volume.array
    assert mask.dtype == bool and mask.shape == volume.shape and result.skull.shape == volume.shape
    bone = hu > BONE_HU

    # Brain HU inside: CSF/white/grey matter, hardly anything bone-like.
    inside = hu[mask]
    assert 15 <= np.median(inside) <= 50
    assert (inside > 150).mean() < 0.01
    assert result.stats["median_hu"] == pytest.approx(np.median(inside))
    assert not (mask & result.skull).any() and result.stats["skull_fraction_in_mask"] == 0
    # Raw bone voxels inside: at most a few calcifications, never the skull.
    assert (mask & bone).sum() < 1e-3 * mask.sum()
    # Bone walls the cavity off from all air (outside, sinuses, mastoid cells, airway): a mask
    # leaking through the skull base into the face or pharynx comes next to air.
    assert not (mask & (_air_distance_mm(volume) <= 2.0)).any()

    # Volume from the voxel size, and an adult size.
    sx, sy, sz = voxel_size_mm(volume)
    assert sz == pytest.approx(float(np.median(volume.slice_steps)))
    assert result.brain_volume_ml == pytest.approx(mask.sum() * sx * sy * sz / 1000.0)
    assert ADULT_ML[0] <= result.brain_volume_ml <= ADULT_ML[1]
    assert result.brain_fraction == pytest.approx(mask.mean())

    # Middle slice: every mask voxel is enclosed by bone along an in-plane axis, the centre
    # of the skull ring is in the mask, and the voxels just outside the mask are the skull.
    k = _middle_slice(mask)
    slice_mask, slice_bone = mask[:, :, k], bone[:, :, k]
    assert _bone_on_both_sides(slice_bone)[slice_mask].all()
    centre = np.round(np.argwhere(ndimage.binary_fill_holes(slice_bone)).mean(axis=0)).astype(int)
    assert slice_mask[tuple(centre)]
    outside_mm = ndimage.distance_transform_edt(~slice_mask, sampling=(sx, sy))
    rim = (outside_mm > 0) & (outside_mm <= 4.0)
    assert slice_bone[rim].mean() > 0.5
    edge = slice_mask & ~ndimage.binary_erosion(slice_mask)
    to_bone_mm = ndimage.distance_transform_edt(~slice_bone, sampling=(sx, sy))
    assert (to_bone_mm[edge] <= 5.0).mean() > 0.9

    summary = result.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["brain_volume_ml"] == pytest.approx(result.brain_volume_ml, abs=0.1)
    assert summary["inside_median_hu"] == pytest.approx(np.median(inside), abs=0.1)


def test_real_ct_series_mask_is_the_intracranial_cavity(real_ct_volume, real_extraction):
    _check_intracranial(real_ct_volume, real_extraction)


def test_cranium_mask_is_the_intracranial_cavity(cranium, cranium_extraction):
    _check_intracranial(cranium, cranium_extraction)


def test_cranium_head_holder_is_never_in_the_mask(cranium, cranium_extraction):
    hu, mask = cranium.array, cranium_extraction.mask
    # The head: the largest body component. The holder (a thin curved shell of bone density
    # behind the head, y is posterior-to-anterior) lies in the rows behind it.
    labels, _ = ndimage.label(hu > -300)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    head = labels == int(np.argmax(sizes))
    back_of_head = int(np.nonzero(head.any(axis=(0, 2)))[0][0])
    holder = (hu > BONE_HU) & ~head
    assert holder[:, :back_of_head].sum() > 1000  # the holder is really there
    assert not mask[:, :back_of_head].any()
    assert not (cranium_extraction.skull & holder).any()
    sx, sy, _ = voxel_size_mm(cranium)
    near_holder = ndimage.distance_transform_edt(~holder, sampling=(sx, sy, 1.5)) <= 10.0
    assert not (mask & near_holder).any()


def test_partial_coverage_keeps_the_mask_inside_the_skull(real_ct_volume, real_extraction):
    depth = real_ct_volume.shape[2]
    upper = list(range(int(depth * 0.6), depth))
    cut = real_ct_volume.take_slices(upper)
    result = extract_brain(cut)
    assert result is not None
    full_mask = real_extraction.mask[:, :, upper]
    # The same cavity as in the full scan on those slices, and a smaller volume.
    dice = 2 * (result.mask & full_mask).sum() / (result.mask.sum() + full_mask.sum())
    assert dice > 0.95
    # The cut's first slice goes through the middle of the brain: it is kept in full, not
    # eroded away as if the brain ended there.
    assert result.mask[:, :, 0].sum() >= 0.98 * full_mask[:, :, 0].sum() > 0
    assert 200 < result.brain_volume_ml < 0.5 * real_extraction.brain_volume_ml
    assert not (result.mask & (cut.array > BONE_HU)).any()
    assert not (result.mask & (_air_distance_mm(cut) <= 2.0)).any()
    # Every slice of the cut: mask voxels enclosed by bone, never the whole slice.
    for k in range(cut.shape[2]):
        slice_mask = result.mask[:, :, k]
        if slice_mask.any():
            enclosed = _bone_on_both_sides(cut.array[:, :, k] > BONE_HU)
            assert enclosed[slice_mask].mean() > 0.99
            assert slice_mask.mean() < 0.5


def test_cut_with_too_little_brain_is_refused(real_ct_volume):
    depth = real_ct_volume.shape[2]
    vertex = real_ct_volume.take_slices(list(range(int(depth * 0.8), depth)))
    with pytest.raises(VolumeReadError, match="too little"):
        extract_brain(vertex)
    # The threshold is the caller's: with a lower one the same cut gives its small mask.
    small = extract_brain(vertex, min_brain_ml=10.0)
    assert small is not None and 10.0 <= small.brain_volume_ml < 100.0


def _phantom(array: np.ndarray, source: str) -> Volume:
    return Volume(
        array=array.astype(np.float32),
        affine=np.diag([1.0, 1.0, 1.0, 1.0]),
        positions=np.arange(array.shape[2], dtype=float) * 2.0,
        source=source,
        modality="CT",
    )


def test_brain_only_volume_returns_none():
    x, y, z = np.meshgrid(np.arange(96), np.arange(96), np.arange(40), indexing="ij")
    blob = ((x - 48) / 35.0) ** 2 + ((y - 48) / 40.0) ** 2 + ((z - 20) / 15.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    array = np.where(blob, 30.0 + rng.normal(0, 8, blob.shape), -1000.0)
    assert extract_brain(_phantom(array, "brain_only.nii.gz")) is None


def test_soft_tissue_without_enclosing_skull_is_not_a_head():
    array = np.full((96, 96, 30), -1000.0)
    array[10:60, 20:70, 5:25] = 40.0  # a box of soft tissue (~100 ml)
    array[70:85, 30:45, 5:25] = 1000.0  # a thick bone rod beside it (~9 ml), enclosing nothing
    with pytest.raises(VolumeReadError, match="phantom.nii.gz: not a head"):
        extract_brain(_phantom(array, "phantom.nii.gz"))


def test_irregular_slices_count_with_the_median_step(real_ct_volume):
    # Every slice of the middle third, with two of them missing: steps of 2.5 and 5 mm.
    depth = real_ct_volume.shape[2]
    keep = [k for k in range(depth // 3, 2 * depth // 3) if k not in (depth // 2, depth // 2 + 4)]
    sparse = real_ct_volume.take_slices(keep)
    assert not sparse.is_regular()
    result = extract_brain(sparse)
    assert result is not None
    sx, sy = sparse.pixel_spacing
    assert result.brain_volume_ml == pytest.approx(result.mask.sum() * sx * sy * 2.5 / 1000.0)
