"""Clinical-like copies of the real head CT study: tight field of view, 5 mm slices, partial coverage,
a couch in view, a pitched head, a gantry tilt. All must register where the whole scan puts them,
and things that are not heads must still be refused (issue 20, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lib.data.ct_alignment import (
    MIN_CRANIAL_CORRELATION,
    RigidAlignment,
    align_to_template,
    sitk_to_volume,
    volume_to_sitk,
)
from lib.io import read_volume
from lib.io.dicom_writer import RAS_TO_LPS
from lib.io.errors import VolumeReadError
from lib.io.volume import Volume, slice_normal
from tests.data.test_ct_alignment import (
    one_thread,  # noqa: F401  (autouse: one ITK thread on the shared machine)
    upside_down,
)
from tests.tilted import make_tilted

UNMEASURED_HU = -3024.0


def head_voxels(volume: Volume) -> np.ndarray:
    """(N, 3) voxel indices of the head (above -300 HU, largest component)."""
    labels, _ = ndimage.label(volume.array > -300)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.argwhere(labels == sizes.argmax())


def reacquired(
    volume: Volume, pitch_deg: float, inset_mm: float, count: int = 29, pixel_mm: float = 1.4, step_mm: float = 5.0
) -> tuple[Volume, sitk.Euler3DTransform]:
    """The head of ``volume`` pitched about its centroid and scanned again as a clinical series.

    Axial ``step_mm`` thick slices (each the mean of two half-step samples) of ``pixel_mm``
    pixels, ``count`` of them up from the lowest point of the head (the slab holds the skull
    base and loses the vertex), the field of view ``inset_mm`` inside the head's bounding box on
    every side (negative: a margin), so that scalp and skull are cut at its edges.

    Returns:
        The series and the transform taking its physical points (LPS) to ``volume``'s.
    """
    image = volume_to_sitk(volume, fill=UNMEASURED_HU)
    voxels = head_voxels(volume).astype(float)
    pitch = sitk.Euler3DTransform()
    pitch.SetCenter(image.TransformContinuousIndexToPhysicalPoint(voxels.mean(axis=0).tolist()))
    pitch.SetRotation(np.radians(pitch_deg), 0.0, 0.0)
    inverse = pitch.GetInverse()
    head = np.array(
        [inverse.TransformPoint(image.TransformContinuousIndexToPhysicalPoint(v.tolist())) for v in voxels[::500]]
    )
    low, high = head.min(axis=0) + inset_mm, head.max(axis=0) - inset_mm
    size = [int(n) for n in np.ceil((high[:2] - low[:2]) / pixel_mm)]
    grid = sitk.Image([*size, 2 * count], sitk.sitkFloat32)
    grid.SetSpacing((pixel_mm, pixel_mm, step_mm / 2))
    grid.SetOrigin((float(low[0]), float(low[1]), float(head[:, 2].min())))
    samples = sitk.GetArrayFromImage(sitk.Resample(image, grid, pitch, sitk.sitkLinear, UNMEASURED_HU))
    pairs = samples.reshape(count, 2, *samples.shape[1:])
    thick = np.where((pairs < -1500).any(axis=1), UNMEASURED_HU, pairs.mean(axis=1)).astype(np.float32)
    series = sitk.GetImageFromArray(thick)
    series.SetSpacing((pixel_mm, pixel_mm, step_mm))
    series.SetOrigin((float(low[0]), float(low[1]), float(head[:, 2].min()) + step_mm / 4))
    return sitk_to_volume(series, modality="CT", source="clinical"), pitch


def with_couch(volume: Volume) -> Volume:
    """A CT couch in view: a curved 8 mm strip of 300 HU behind the head, on a 3 mm gel pad
    (0 HU) that joins it to the head, in every slice (it runs the length of the scan)."""
    array = volume.array.copy()
    sx, sy = volume.pixel_spacing
    voxels = head_voxels(volume)
    back_mm = voxels[:, 1].min() * sy  # j runs anterior: the head's posterior edge
    middle_mm = voxels[:, 0].mean() * sx
    x_mm = np.arange(array.shape[0]) * sx
    y_mm = np.arange(array.shape[1])[None, :] * sy
    inner = back_mm - 3.0 + 40.0 * ((x_mm - middle_mm) / 100.0)[:, None] ** 2  # rises towards the sides
    pad = (y_mm > inner) & (y_mm < inner + 5.0) & (array.min(axis=2) < 0)
    couch = (y_mm <= inner) & (y_mm > inner - 8.0)
    array[pad] = np.maximum(array[pad], 0.0)
    array[couch] = 300.0
    return Volume(array=array, affine=volume.affine, positions=volume.positions, modality="CT", source="couch")


def expected_positions(
    series: Volume, found: RigidAlignment, whole: RigidAlignment, pitch: sitk.Euler3DTransform
) -> np.ndarray:
    """Normalised positions of the slice centres ``found`` uses, put where the whole scan's alignment puts them."""
    normal = slice_normal(series.affine)
    centre, origin = np.asarray(found.centre_ras), series.affine[:3, 3]
    scale = float(series.affine[:3, 2] @ normal)
    points = centre + ((series.positions * scale) - float(normal @ (centre - origin)))[:, None] * normal
    original = np.array([RAS_TO_LPS @ pitch.TransformPoint(tuple(RAS_TO_LPS @ p)) for p in points])
    z = whole.ct_points_to_template(original)[:, 2]
    return (z - whole.brain_inferior_mm) / (whole.brain_superior_mm - whole.brain_inferior_mm)


@pytest.fixture(scope="module")
def full_ct(head_ct_folder):
    """The real 2.5 mm series at its full 0.49 mm resolution (the clinical copies are cut from it)."""
    return read_volume(head_ct_folder)


@pytest.fixture(scope="module")
def clinical(full_ct):
    """``clinical(pitch_deg, inset_mm)``: a :func:`reacquired` series, its pitch and its alignment (each made once)."""
    made: dict[tuple[float, float], tuple[Volume, sitk.Euler3DTransform, RigidAlignment]] = {}

    def get(pitch_deg: float, inset_mm: float) -> tuple[Volume, sitk.Euler3DTransform, RigidAlignment]:
        if (pitch_deg, inset_mm) not in made:
            series, pitch = reacquired(full_ct, pitch_deg, inset_mm)
            made[pitch_deg, inset_mm] = series, pitch, align_to_template(series)
        return made[pitch_deg, inset_mm]

    return get


@pytest.mark.parametrize(
    "pitch_deg",
    [
        0.0,
        # The head pitched by 20 degrees (chin up): the slab holds more face and skull base.
        # Accepted now (refused before at 30 degrees), but the registration lands ~0.11 (about
        # 16 mm) low: the z shift is not pinned by a pitched partial slab (NOTES, issue 20 item 5).
        pytest.param(-20.0, marks=pytest.mark.xfail(reason="pitched tight partial slab lands ~0.11 low")),
    ],
)
def test_tight_field_of_view_lands_where_the_whole_scan_puts_it(clinical, real_ct_alignment, pitch_deg):
    """29 x 5 mm slices from the skull base up, 1.4 mm pixels, the field of view 15 mm inside the head."""
    series, pitch, alignment = clinical(pitch_deg, 15.0)
    assert series.shape[2] == 29 and series.pixel_spacing == pytest.approx((1.4, 1.4))
    middle = series.array[:, :, 14]
    borders = (middle[0], middle[-1], middle[:, 0], middle[:, -1])
    assert sum((border > -300).any() for border in borders) >= 2  # the field of view cuts the head
    assert alignment.converged and alignment.cranial_correlation >= MIN_CRANIAL_CORRELATION
    positions = alignment.normalised_positions(series)
    # The skull base in view (the study's lowest brain slice is at ~0.09), the vertex not.
    assert positions[0] < 0.15 and 0.5 < positions[-1] < 1.0
    assert np.abs(positions - expected_positions(series, alignment, real_ct_alignment, pitch)).max() < 0.05


def test_the_tight_series_upside_down_is_refused(clinical):
    """The tight 5 mm slab with its slices reversed (positions kept) fits the right way up at
    correlation 0.47, above the acceptance threshold; turned over it fits better (0.60)."""
    series, _, _ = clinical(0.0, 15.0)
    flipped = upside_down(series)
    with pytest.raises(VolumeReadError, match="upside_down.nii: registration.*better turned upside down"):
        align_to_template(flipped)


def test_a_couch_in_view_is_accepted_at_the_same_positions(full_ct, real_ct_alignment):
    """A 20 mm margin leaves room for a couch behind the head, joined to it by a gel pad."""
    series, pitch = reacquired(full_ct, 0.0, -20.0)
    couch = with_couch(series)
    assert (couch.array > 250).sum() > (series.array > 250).sum() * 1.05
    alignment = align_to_template(couch)
    assert alignment.cranial_correlation >= MIN_CRANIAL_CORRELATION
    expected = expected_positions(couch, alignment, real_ct_alignment, pitch)
    assert np.abs(alignment.normalised_positions(couch) - expected).max() < 0.05


def test_tilted_tight_series_gets_the_positions_of_the_untilted(clinical):
    series, _, alignment = clinical(0.0, 15.0)
    tilted = make_tilted(series, 15.0)
    tilted_alignment = align_to_template(tilted)
    assert tilted_alignment.cranial_correlation >= MIN_CRANIAL_CORRELATION
    assert np.abs(tilted_alignment.normalised_positions(tilted) - alignment.normalised_positions(series)).max() < 0.05


def phantom(volume: Volume, shell_mm: float, shell_hu: float) -> Volume:
    """A head-sized elliptic cylinder (150 x 190 mm, 165 mm long) of soft tissue (30 HU) in a bone
    shell (none when ``shell_mm`` is 0) on the grid of ``volume``."""
    sx, sy = volume.pixel_spacing
    x = (np.arange(volume.shape[0]) - volume.shape[0] / 2)[:, None, None] * sx
    y = (np.arange(volume.shape[1]) - volume.shape[1] / 2)[None, :, None] * sy
    z = volume.positions[None, None, :]
    along = (z >= 0) & (z < 165)
    array = np.full(volume.shape, -1000.0, dtype=np.float32)
    array[np.broadcast_to(((x / 75) ** 2 + (y / 95) ** 2 < 1) & along, volume.shape)] = shell_hu
    inner = ((x / (75 - shell_mm)) ** 2 + (y / (95 - shell_mm)) ** 2 < 1) & along
    array[np.broadcast_to(inner, volume.shape)] = 30.0
    return Volume(array=array, affine=volume.affine, positions=volume.positions, modality="CT", source="phantom.nii")


@pytest.mark.parametrize(
    "shell_mm, shell_hu",
    [
        (0.0, 30.0),  # soft tissue only (measured cranial correlation -0.05)
        (10.0, 1200.0),  # a 1 cm bone shell: the closest non-head measured (0.20)
    ],
)
def test_head_sized_phantoms_are_refused(real_ct_volume, shell_mm, shell_hu):
    with pytest.raises(VolumeReadError, match="phantom.nii: registration.*cranium"):
        align_to_template(phantom(real_ct_volume, shell_mm, shell_hu))
