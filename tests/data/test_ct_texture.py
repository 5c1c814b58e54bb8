"""Tests of lib.data.ct_texture (noise model, fitted scans), lib.data.ct_texture_fit and lib.data.atlas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.data.atlas import atlas_priors
from lib.data.ct_texture import (
    TEXTURE_FILE,
    NoiseModel,
    RimModel,
    ScanTexture,
    load_scan_textures,
    save_scan_textures,
)
from lib.data.ct_texture_fit import (
    class_statistics,
    eroded_brain,
    measure_noise,
    measure_rim,
    radial_power_spectrum,
    resample_in_plane,
    thickness_from_correlation,
)

CSF, GREY, WHITE = 0, 1, 2


# --------------------------------------------------------------------------- noise model


@pytest.mark.parametrize(("sd", "kernel", "thickness"), [(5.0, 0.6, 2.5), (3.5, 0.7, 5.0), (6.0, 0.0, 0.0)])
def test_noise_sample_has_the_model_sd_and_slice_correlation(sd: float, kernel: float, thickness: float) -> None:
    model = NoiseModel(sd, kernel, thickness)
    noise = model.sample((96, 96, 48), np.random.default_rng(0))
    assert noise.dtype == np.float32 and noise.shape == (96, 96, 48)
    assert noise.std() == pytest.approx(sd, rel=0.02)
    for distance in (1, 2, 4):
        measured = np.corrcoef(noise[:, :, :-distance].ravel(), noise[:, :, distance:].ravel())[0, 1]
        assert measured == pytest.approx(model.slice_correlation(distance), abs=0.02)


def test_noise_spectrum_integrates_to_the_variance() -> None:
    for model in (NoiseModel(4.0, 0.55), NoiseModel(4.0, 0.0), NoiseModel(2.0, 1.2)):
        f = np.linspace(-0.5, 0.5, 801)
        fx, fy = np.meshgrid(f, f, indexing="ij")
        power = model.in_plane_nps(np.hypot(fx, fy))
        variance = np.trapz(np.trapz(power, f, axis=1), f)
        assert variance == pytest.approx(model.sd_hu**2, rel=1e-3)


def test_thickness_from_correlation_inverts_the_slice_profile() -> None:
    model = NoiseModel(1.0, 0.5, 3.0)
    for spacing in (1.0, 2.5, 5.0):
        assert thickness_from_correlation(model.slice_correlation(spacing), spacing) == pytest.approx(3.0, rel=1e-6)
    assert thickness_from_correlation(-0.01, 2.5) == 0.0


@pytest.mark.parametrize(("sd", "kernel", "thickness"), [(4.6, 0.53, 2.5), (5.2, 0.61, 2.3), (3.0, 0.3, 0.0)])
def test_measured_noise_recovers_a_known_sd_kernel_and_slice_profile(
    sd: float, kernel: float, thickness: float
) -> None:
    noise = NoiseModel(sd, kernel, thickness).sample((120, 120, 16), np.random.default_rng(1))
    # A constant tissue level plus noise, every slice kept (1 mm apart).
    measured = measure_noise(noise + 30.0, np.ones(noise.shape, dtype=bool), spacing_mm=1.0)
    assert measured.model.sd_hu == pytest.approx(sd, rel=0.03)
    assert measured.model.kernel_mm == pytest.approx(kernel, abs=0.04)
    if thickness:
        assert measured.model.thickness_mm == pytest.approx(thickness, rel=0.05)
    else:
        assert measured.adjacent_slice_correlation == pytest.approx(0.0, abs=0.02)


def test_radial_spectrum_of_white_noise_is_flat_at_its_variance() -> None:
    patches = np.random.default_rng(2).normal(0.0, 3.0, (400, 24, 24))
    frequency, power = radial_power_spectrum(patches, pixel_mm=1.0)
    assert frequency[0] == 0.0 and frequency[-1] == pytest.approx(0.5, abs=0.03)
    inside = (frequency > 0.12) & (frequency < 0.5)
    np.testing.assert_allclose(power[inside], 9.0, rtol=0.08)
    with pytest.raises(ValueError, match="no patch"):
        radial_power_spectrum(np.zeros((0, 24, 24)))


# --------------------------------------------------------------------------- grid and classes


def test_in_plane_resampling_keeps_world_positions() -> None:
    hu = np.zeros((200, 160, 4), dtype=np.float32)
    hu[100:120, 40:60] = 50.0
    resampled, mask, index_map = resample_in_plane(hu, hu > 0, (0.5, 0.5))
    assert resampled.shape == (100, 80, 4) and mask.shape == (100, 80, 4)
    # New voxel (55, 25) is old (110.5, 50.5): the square's centre, in both grids.
    np.testing.assert_allclose(index_map @ [55, 25, 0, 1], [110.5, 50.5, 0, 1])
    assert resampled[55, 25, 0] == pytest.approx(50.0) and mask[55, 25, 0]


def test_class_statistics_recover_the_classes_of_a_phantom() -> None:
    rng = np.random.default_rng(3)
    shape = (60, 60, 10)
    truth = np.full(shape, WHITE)
    truth[:20] = GREY
    truth[:8] = CSF
    means, sds = np.array([9.0, 40.0, 30.0]), np.array([3.0, 5.0, 4.0])
    hu = rng.normal(means[truth], sds[truth]).astype(np.float32)
    priors = np.stack([(truth == c).astype(np.float32) for c in range(3)])
    # The CSF region of an atlas is mixed with tissue; the mixture's lower component is CSF.
    priors[CSF, 8:12] = 1.0
    stats = class_statistics(hu, np.ones(shape, dtype=bool), priors)
    np.testing.assert_allclose(stats.hu, means, atol=0.6)
    np.testing.assert_allclose(stats.sd_hu, sds, rtol=0.1)
    assert eroded_brain(np.ones(shape, dtype=bool)).sum() < np.prod(shape)


def test_atlas_priors_follow_an_affinely_moved_brain() -> None:
    # Atlas: an ellipsoid brain of white matter with a grey shell and a CSF core (2 mm voxels).
    shape = (48, 56, 44)
    grids = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2

    def classes(scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
        radius = np.sqrt(
            sum(((g - c - s) / (r * k)) ** 2 for g, c, s, r, k in zip(grids, centre, shift, (18, 22, 16), scale))
        )
        labels = np.full(shape, -1)
        labels[radius < 1.0] = GREY
        labels[radius < 0.8] = WHITE
        labels[radius < 0.3] = CSF
        return labels

    atlas_labels = classes(np.ones(3), np.zeros(3))
    subject_labels = classes(np.array([0.92, 1.05, 0.95]), np.array([2.0, -3.0, 1.5]))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    contrast = np.array([10.0, 40.0, 30.0])
    atlas_image = np.where(atlas_labels >= 0, contrast[atlas_labels], 0.0)
    subject_image = np.where(subject_labels >= 0, contrast[subject_labels], 0.0)
    probabilities = np.stack([(atlas_labels == c).astype(np.float32) for c in range(3)])

    priors = atlas_priors(
        subject_image, subject_labels >= 0, affine, atlas_image, atlas_labels >= 0, affine, probabilities
    )

    assert priors.shape == (3, *shape) and priors.dtype == np.float32
    predicted = np.argmax(priors, axis=0)
    brain = subject_labels >= 0
    assert np.mean(predicted[brain] == subject_labels[brain]) > 0.9
    with pytest.raises(ValueError, match="clock"):
        atlas_priors(subject_image, brain, affine, atlas_image, atlas_labels >= 0, affine, probabilities, seed=0)


def test_rim_offset_decays_from_the_brain_edge_and_is_measured_back() -> None:
    shape = (72, 72, 72)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 2:-2, 2:-2] = True
    rim = RimModel(hu=15.0, length_mm=6.0)
    offset = rim.offset(mask, (1.0, 1.0, 1.0))
    assert offset.dtype == np.float32 and np.all(offset[~mask] == 0.0)
    assert offset[2, 36, 36] == pytest.approx(15.0 * np.exp(-1.0 / 6.0))  # edge voxel: 1 mm from outside
    assert offset[36, 36, 36] == pytest.approx(15.0 * np.exp(-34.0 / 6.0))
    assert not RimModel().offset(mask, (1.0, 1.0, 1.0)).any()
    with pytest.raises(ValueError, match="positive"):
        RimModel(5.0, 0.0)

    # White matter at 30 HU with the rim and noise: the measurement gives the rim back.
    priors = np.zeros((3, *shape), dtype=np.float32)
    priors[WHITE][mask] = 1.0
    hu = np.where(mask, 30.0 + offset + np.random.default_rng(4).normal(0.0, 4.0, shape), -1000.0)
    measured = measure_rim(hu, mask, priors, (8.0, 40.0, 30.0), (1.0, 1.0, 1.0))
    assert measured.model.hu == pytest.approx(15.0, rel=0.1)
    assert measured.model.length_mm == pytest.approx(6.0, rel=0.1)
    flat = measure_rim(np.where(mask, 30.0, -1000.0), mask, priors, (8.0, 40.0, 30.0), (1.0, 1.0, 1.0))
    assert abs(flat.model.hu) < 0.5


# --------------------------------------------------------------------------- fitted scans


def test_scan_texture_survives_its_json_file(tmp_path) -> None:
    texture = ScanTexture(
        name="scan",
        source="a test",
        class_hu=(10.0, 40.0, 31.0),
        class_sd_hu=(6.0, 5.5, 4.5),
        noise=NoiseModel(4.5, 0.55, 2.5),
        tissue_sd_hu=1.0,
        rim=RimModel(12.0, 6.0),
        slice_spacing_mm=2.5,
        adjacent_slice_correlation=0.25,
        nominal_thickness_mm=None,
    )
    path = save_scan_textures([texture], tmp_path / "texture.json", method="by hand")
    assert load_scan_textures(path) == (texture,)
    (tmp_path / "empty.json").write_text('{"method": "", "scans": []}')
    with pytest.raises(ValueError, match="no scan texture"):
        load_scan_textures(tmp_path / "empty.json")


def test_shipped_textures_are_real_ct_brains() -> None:
    textures = load_scan_textures(TEXTURE_FILE)
    assert len(textures) >= 2 and len({t.name for t in textures}) == len(textures)
    for texture in textures:
        csf, grey, white = texture.class_hu
        assert -10.0 < csf < white < grey < 50.0, texture  # CT orders CSF < white < grey matter
        assert 2.0 < texture.noise.sd_hu < 10.0 and 0.3 < texture.noise.kernel_mm < 1.0
        assert 1.0 < texture.noise.thickness_mm < 8.0
        if texture.nominal_thickness_mm is not None:
            # The slice profile measured from the noise agrees with the thickness the scan declares.
            assert texture.noise.thickness_mm == pytest.approx(texture.nominal_thickness_mm, rel=0.15)
        assert math.isfinite(texture.tissue_sd_hu) and texture.tissue_sd_hu >= 0.0
