"""Tests for lib.metrics on real BraTS slices, checked against MONAI and scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from skimage.metrics import (
    normalized_root_mse,
    peak_signal_noise_ratio,
    structural_similarity,
)

from lib.metrics import issim, nrmse, psnr, ssim_2d, ssim_3d, to_unit_range, volume_metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CASE = DATA / "brats_dev" / "BraTS-GLI-00001-000"
# Twelve mid-brain slices keep the suite fast; 3-D SSIM needs at least 11.
SLICES = slice(60, 72)
# The settings lib.metrics documents for SSIM, spelled out here for the references.
SKIMAGE_SSIM = {
    "data_range": 1.0,
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
}


def _load(name: str) -> np.ndarray:
    nib = pytest.importorskip("nibabel")
    path = CASE / f"{name}.nii.gz"
    if not path.is_file():
        pytest.skip(f"BraTS test volume not available: {path}")
    # Normalise the whole volume, then crop, as a real evaluation would.
    return to_unit_range(nib.load(path).get_fdata())[:, :, SLICES]


@pytest.fixture(scope="module")
def t1n() -> np.ndarray:
    return _load("t1n")


@pytest.fixture(scope="module")
def t2f() -> np.ndarray:
    return _load("t2f")


@pytest.fixture(scope="module")
def brain(t1n: np.ndarray) -> np.ndarray:
    # BraTS is skull-stripped with background exactly 0.
    return t1n > 0


@pytest.fixture(scope="module")
def noisy(t1n: np.ndarray) -> np.ndarray:
    return t1n + np.random.default_rng(0).normal(0.0, 0.05, t1n.shape)


@pytest.fixture(scope="module", params=["t2f", "noisy"])
def pred(request: pytest.FixtureRequest) -> np.ndarray:
    """Two predictions of t1n: another contrast, and t1n with Gaussian noise."""
    return request.getfixturevalue(request.param)


def _garbage(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape)


# --- to_unit_range -----------------------------------------------------------


def test_to_unit_range_min_max_and_bounds() -> None:
    vol = np.array([-2.0, 0.0, 2.0, 6.0]).reshape(1, 1, 4)
    np.testing.assert_allclose(to_unit_range(vol).ravel(), [0.0, 0.25, 0.5, 1.0])
    # Given bounds map linearly and clip what lies outside them.
    np.testing.assert_allclose(to_unit_range(vol, low=0.0, high=4.0).ravel(), [0.0, 0.0, 0.5, 1.0])


def test_to_unit_range_real_volume(t1n: np.ndarray) -> None:
    assert t1n.min() == 0.0 and t1n.max() <= 1.0 and t1n.max() > 0.5


# --- PSNR --------------------------------------------------------------------


def test_psnr_matches_monai_and_skimage(pred: np.ndarray, t1n: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    from monai.metrics import PSNRMetric

    ours = psnr(pred, t1n)
    as_tensor = lambda v: torch.from_numpy(v)[None, None]  # noqa: E731  (batch, channel) axes
    monai_value = PSNRMetric(max_val=1.0)(as_tensor(pred), as_tensor(t1n)).item()
    skimage_value = peak_signal_noise_ratio(t1n, pred, data_range=1.0)
    assert ours == pytest.approx(monai_value, abs=1e-6)
    assert ours == pytest.approx(skimage_value, abs=1e-9)


def test_psnr_data_range_scales(t1n: np.ndarray, t2f: np.ndarray) -> None:
    # Doubling the signal and the peak leaves PSNR unchanged only if the peak is squared.
    assert psnr(2 * t2f, 2 * t1n, data_range=2.0) == pytest.approx(psnr(t2f, t1n), abs=1e-9)


def test_psnr_of_known_gaussian_noise(t1n: np.ndarray) -> None:
    # Squeeze gt into [0.2, 0.8] and do not clip, so the MSE is exactly the
    # noise variance in expectation; ~700k voxels pin it to well under 0.1 dB.
    gt = 0.2 + 0.6 * t1n
    sigma = 0.05
    pred = gt + np.random.default_rng(2).normal(0.0, sigma, gt.shape)
    assert psnr(pred, gt) == pytest.approx(10 * np.log10(1 / sigma**2), abs=0.1)


# --- NRMSE -------------------------------------------------------------------


def test_nrmse_matches_definition_and_skimage(t1n: np.ndarray, t2f: np.ndarray) -> None:
    by_definition = np.sqrt(np.sum((t2f - t1n) ** 2) / t1n.size) / (t1n.max() - t1n.min())
    assert nrmse(t2f, t1n) == pytest.approx(by_definition, rel=1e-12)
    reference = normalized_root_mse(t1n, t2f, normalization="min-max")
    assert nrmse(t2f, t1n) == pytest.approx(reference, rel=1e-12)


def test_nrmse_with_mask_uses_masked_error_and_range(t1n: np.ndarray, t2f: np.ndarray, brain: np.ndarray) -> None:
    g, p = t1n[brain], t2f[brain]
    assert g.min() > 0  # so the masked range really differs from the full one
    expected = np.sqrt(np.mean((p - g) ** 2)) / (g.max() - g.min())
    assert nrmse(t2f, t1n, brain) == pytest.approx(expected, rel=1e-12)


# --- SSIM --------------------------------------------------------------------


def test_ssim_2d_matches_skimage_per_slice(pred: np.ndarray, t1n: np.ndarray) -> None:
    per_slice = [structural_similarity(pred[:, :, z], t1n[:, :, z], **SKIMAGE_SSIM) for z in range(t1n.shape[2])]
    assert ssim_2d(pred, t1n) == pytest.approx(np.mean(per_slice), abs=1e-9)


def test_ssim_2d_matches_monai(pred: np.ndarray, t1n: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    from monai.metrics import SSIMMetric

    # Axial slices become the batch: (Z, 1, X, Y).
    as_batch = lambda v: torch.from_numpy(np.moveaxis(v, -1, 0)[:, None])  # noqa: E731
    per_slice = SSIMMetric(spatial_dims=2, data_range=1.0)(as_batch(pred), as_batch(t1n))
    monai_value = per_slice.mean().item()
    # MONAI averages over the valid region of an unpadded convolution; we (like
    # scikit-image) average the same region by cropping 5 voxels, so the two
    # agree up to how each builds its 11-tap Gaussian kernel (measured ~2e-6).
    # 1e-4 allows for that but still fails for a wrong sigma, K or window.
    assert ssim_2d(pred, t1n) == pytest.approx(monai_value, abs=1e-4)


def test_ssim_3d_matches_skimage(t1n: np.ndarray, t2f: np.ndarray) -> None:
    reference = structural_similarity(t2f, t1n, **SKIMAGE_SSIM)
    assert ssim_3d(t2f, t1n) == pytest.approx(reference, abs=1e-9)


def test_ssim_falls_as_noise_grows(t1n: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    for metric in (ssim_2d, ssim_3d):
        scores = [metric(t1n + rng.normal(0.0, s, t1n.shape), t1n) for s in (0.01, 0.03, 0.1)]
        assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0


def test_all_true_mask_equals_no_mask(t1n: np.ndarray, t2f: np.ndarray) -> None:
    everything = np.ones(t1n.shape, dtype=bool)
    for metric in (nrmse, psnr, ssim_2d, ssim_3d):
        assert metric(t2f, t1n, everything) == pytest.approx(metric(t2f, t1n), rel=1e-12)
    assert issim(t2f, everything) == pytest.approx(issim(t2f), rel=1e-12)


# --- identical volumes and masks ---------------------------------------------


def test_identical_volumes(t1n: np.ndarray, brain: np.ndarray) -> None:
    for mask in (None, brain):
        result = volume_metrics(t1n, t1n.copy(), mask)
        assert set(result) == {"nrmse", "psnr", "ssim", "ssim3d", "issim"}
        assert result["psnr"] == float("inf")
        assert result["nrmse"] == 0.0
        assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert result["ssim3d"] == pytest.approx(1.0, abs=1e-12)
        assert result["issim"] == pytest.approx(issim(t1n, mask), abs=1e-12)


def test_exact_inside_mask_garbage_outside(t1n: np.ndarray, brain: np.ndarray) -> None:
    pred = t1n.copy()
    pred[~brain] = _garbage(t1n.shape)[~brain]
    assert psnr(pred, t1n, brain) == float("inf")
    assert nrmse(pred, t1n, brain) == 0.0
    assert psnr(pred, t1n) < 10.0
    assert nrmse(pred, t1n) > 0.5
    # SSIM windows at the brain edge still see the garbage, so close to 1 but not 1.
    for metric in (ssim_2d, ssim_3d):
        with_mask, without = metric(pred, t1n, brain), metric(pred, t1n)
        assert with_mask > 0.85
        assert without < 0.5


@pytest.mark.parametrize(("metric", "reach"), [(ssim_2d, (11, 11, 1)), (ssim_3d, (11, 11, 11))])
def test_ssim_mask_ignores_everything_out_of_window_reach(
    metric, reach: tuple[int, int, int], t1n: np.ndarray, brain: np.ndarray
) -> None:
    # Exact wherever an 11-wide window around a brain voxel can reach, garbage
    # beyond: then the masked SSIM must be exactly 1.
    exact = binary_dilation(brain, structure=np.ones(reach, dtype=bool))
    pred = t1n.copy()
    pred[~exact] = _garbage(t1n.shape)[~exact]
    assert metric(pred, t1n, brain) == pytest.approx(1.0, abs=1e-12)
    assert metric(pred, t1n) < 0.9


def test_ssim_2d_skips_slices_outside_mask(t1n: np.ndarray) -> None:
    pred = t1n.copy()
    pred[:, :, 6:] = _garbage(t1n[:, :, 6:].shape)
    first_slices = np.zeros(t1n.shape, dtype=bool)
    first_slices[:, :, :6] = True
    assert ssim_2d(pred, t1n, first_slices) == pytest.approx(1.0, abs=1e-12)
    assert ssim_2d(pred, t1n) < 0.75
    # Slices count equally, however many masked voxels they hold: a small
    # patch on garbage slice 6 weighs as much as each whole exact slice.
    first_slices[100:120, 100:120, 6] = True
    patch = ssim_2d(pred[:, :, 6:7], t1n[:, :, 6:7], first_slices[:, :, 6:7])
    assert patch < 0.5
    assert ssim_2d(pred, t1n, first_slices) == pytest.approx((6 + patch) / 7, abs=1e-12)


# --- I-SSIM ------------------------------------------------------------------


def test_issim_repeated_slice_is_one(t1n: np.ndarray) -> None:
    repeated = np.repeat(t1n[:, :, 5:6], 8, axis=2)
    assert issim(repeated) == pytest.approx(1.0, abs=1e-12)


def test_issim_orders_noise_real_and_repeated(t1n: np.ndarray, brain: np.ndarray) -> None:
    noise = _garbage(t1n.shape)
    assert issim(noise) < 0.05
    real_unmasked, real_brain = issim(t1n), issim(t1n, brain)
    assert 0.05 < real_brain < real_unmasked < 1.0
    # Check one term against a direct scikit-image computation.
    pairs = [structural_similarity(t1n[:, :, z], t1n[:, :, z + 1], **SKIMAGE_SSIM) for z in range(t1n.shape[2] - 1)]
    assert real_unmasked == pytest.approx(np.mean(pairs), abs=1e-9)


def test_issim_mask_uses_union_and_skips_empty_pairs(t1n: np.ndarray) -> None:
    repeated = np.repeat(t1n[:, :, 5:6], 6, axis=2)
    vol = np.concatenate([repeated, _garbage(repeated.shape)], axis=2)
    mask = np.zeros(vol.shape, dtype=bool)
    # Masks on slices 0-4: pair (4, 5) counts through slice 4's mask (union) and
    # compares identical slices; pairs from (5, 6) on have an empty union.
    mask[:, :, :5] = True
    assert issim(vol, mask) == pytest.approx(1.0, abs=1e-12)
    # Masking slice 5 too brings in pair (5, 6), a brain slice against noise.
    mask[:, :, 5] = True
    assert issim(vol, mask) < 0.9
    assert issim(vol) < 0.6


# --- invalid input -----------------------------------------------------------


def _cases() -> list:
    vol = np.full((16, 16, 12), 0.5)
    vol[4:8, 4:8] = 1.0
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    empty = np.zeros(vol.shape, dtype=bool)
    soft = np.full(vol.shape, 0.5)
    return [
        pytest.param(psnr, (vol, vol[:, :, :-1]), "shape mismatch", id="shape-mismatch"),
        pytest.param(ssim_2d, (vol[:, :, 0], vol[:, :, 0]), "3-D", id="not-3d"),
        pytest.param(nrmse, (vol, vol, empty[:, :, :-1]), "mask shape", id="mask-shape"),
        pytest.param(psnr, (vol, vol, empty), "mask is empty", id="empty-mask"),
        pytest.param(ssim_3d, (nan, vol), "NaN", id="nan-pred"),
        pytest.param(nrmse, (vol, nan), "NaN", id="nan-gt"),
        pytest.param(nrmse, (vol, np.full(vol.shape, 0.3)), "zero intensity", id="constant-gt"),
        pytest.param(psnr, (vol, vol, soft), "only 0 and 1", id="soft-mask"),
        pytest.param(issim, (vol[:, :, :1],), "at least 2", id="one-slice"),
        pytest.param(ssim_2d, (vol[:10], vol[:10]), "at least 11", id="too-small-for-ssim"),
        pytest.param(to_unit_range, (np.ones((2, 2, 2)),), "greater than", id="constant-rescale"),
        pytest.param(to_unit_range, (nan,), "NaN", id="nan-rescale"),
    ]


@pytest.mark.parametrize(("func", "args", "message"), _cases())
def test_invalid_input_raises(func, args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        func(*args)


def test_psnr_rejects_non_positive_data_range() -> None:
    vol = np.zeros((12, 12, 12))
    with pytest.raises(ValueError, match="data_range"):
        psnr(vol, vol, data_range=0.0)
