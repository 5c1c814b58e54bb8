"""Evaluation report figures: valid PNGs written atomically, clear refusals, a sound correlation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.evaluation.figures import (
    plot_montage,
    plot_similarity_histogram,
    plot_slice_psnr,
    plot_uncertainty_and_error,
    uncertainty_error_correlation,
)

SHAPE = (32, 32, 20)
SPACING = (1.0, 1.0, 2.5)


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, np.ndarray]:
    """An MRI-like volume in [0, 1] (a graded ellipsoid) and its brain mask."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    mask = x**2 + y**2 + z**2 < 0.8
    return np.where(mask, 0.6 + 0.3 * x, 0.0), mask


def check_png(path: Path, returned: Path) -> np.ndarray:
    """The figure is a readable, non-blank PNG of a useful size, and the only file in its folder."""
    assert returned == path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert 300 < width < 3000 and 200 < height < 3000
    assert pixels.std() > 5  # something was drawn on the white background
    # atomic_path writes to ".tmp-<hex>-<name>" beside the target and renames it.
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    return pixels


def test_slice_psnr_with_gaps_nans_and_acquired_slices(tmp_path):
    depth = SHAPE[2]
    rng = np.random.default_rng(0)
    rebrain = 20 + rng.standard_normal(depth)
    rebrain[:3] = np.nan  # slices without brain
    rebrain[10] = np.inf  # an exact slice: not plottable, must not break the figure
    interp = 17 + rng.standard_normal(depth)
    interp[-2:] = np.nan
    acquired = np.arange(depth) % 2 == 0
    out = tmp_path / "psnr.png"
    check_png(out, plot_slice_psnr(out, {"rebrain": rebrain, "interp": interp}, acquired=acquired, title="case 1"))
    # Without acquired flags and with a method that has no finite value at all.
    other = tmp_path / "psnr_plain.png"
    check_png(other, plot_slice_psnr(other, {"rebrain": rebrain, "empty": np.full(depth, np.nan)}))


def test_slice_psnr_refuses_inconsistent_inputs(tmp_path):
    out = tmp_path / "psnr.png"
    with pytest.raises(ValueError, match="empty"):
        plot_slice_psnr(out, {})
    with pytest.raises(ValueError, match="same number of slices"):
        plot_slice_psnr(out, {"a": np.zeros(20), "b": np.zeros(19)})
    with pytest.raises(ValueError, match="acquired"):
        plot_slice_psnr(out, {"a": np.zeros(20)}, acquired=np.ones(19, dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        plot_slice_psnr(out, {"a": np.zeros(20)}, acquired=np.full(20, 0.5))
    with pytest.raises(ValueError, match="1-D"):
        plot_slice_psnr(out, {"a": np.zeros((4, 5))})
    # Refused before anything is written.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "similarities",
    [
        pytest.param(np.r_[np.linspace(0.9, 0.999, 50), [np.nan] * 5], id="spread-with-nan"),
        pytest.param(np.full(30, 0.99), id="all-equal"),
        pytest.param(np.full(30, np.nan), id="no-finite"),
        pytest.param(np.array([]), id="empty"),
        pytest.param(np.array([0.2, 0.3]), id="tau-outside-data"),
    ],
)
def test_similarity_histogram_always_writes_a_png(tmp_path, similarities):
    out = tmp_path / "similarity.png"
    check_png(out, plot_similarity_histogram(out, similarities, tau=0.981, title="retrieval"))


def test_similarity_histogram_refuses_a_non_finite_tau(tmp_path):
    with pytest.raises(ValueError, match="tau"):
        plot_similarity_histogram(tmp_path / "s.png", np.ones(5), tau=float("nan"))


def test_montage_writes_one_row_per_volume(tmp_path, head):
    mri, _ = head
    volumes = {"ground truth": mri, "interp": 0.9 * mri, "rebrain": np.clip(mri + 0.05, 0, 1)}
    three = check_png(tmp_path / "m3.png", plot_montage(tmp_path / "m3.png", volumes, SPACING, title="case 1"))
    one = check_png(tmp_path / "m1.png", plot_montage(tmp_path / "m1.png", {"rebrain": mri}, SPACING, z=3))
    # Rows stack vertically: three rows make a clearly taller image than one.
    assert three.shape[0] > 2 * one.shape[0]


def test_montage_refuses_inconsistent_inputs(tmp_path, head):
    mri, _ = head
    out = tmp_path / "m.png"
    with pytest.raises(ValueError, match="empty"):
        plot_montage(out, {}, SPACING)
    with pytest.raises(ValueError, match="share one shape") as refused:
        plot_montage(out, {"ground truth": mri, "rebrain": mri[:, :, :-1]}, SPACING)
    assert "rebrain" in str(refused.value)  # names the offending entry with its shape
    with pytest.raises(ValueError, match="3-D"):
        plot_montage(out, {"slice": mri[:, :, 0]}, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        plot_montage(out, {"a": mri}, (1.0, 0.0, 2.5))
    with pytest.raises(ValueError, match="z must be"):
        plot_montage(out, {"a": mri}, SPACING, z=SHAPE[2])
    assert list(tmp_path.iterdir()) == []


def test_uncertainty_and_error_figure(tmp_path, head):
    _, mask = head
    rng = np.random.default_rng(1)
    uncertainty = rng.uniform(0.0, 0.1, SHAPE)
    abs_error = np.abs(2 * uncertainty + 0.02 * rng.standard_normal(SHAPE))
    out = tmp_path / "uncertainty.png"
    check_png(out, plot_uncertainty_and_error(out, uncertainty, abs_error, mask, SPACING, title="case 1"))
    # A constant map (undefined correlation) and an empty mask still draw.
    flat = tmp_path / "flat.png"
    check_png(flat, plot_uncertainty_and_error(flat, np.zeros(SHAPE), abs_error, mask, SPACING, z=0))
    empty = tmp_path / "empty_mask.png"
    plot_uncertainty_and_error(empty, uncertainty, abs_error, np.zeros(SHAPE, dtype=bool), SPACING)
    assert empty.read_bytes().startswith(b"\x89PNG")


def test_uncertainty_and_error_refuses_inconsistent_inputs(tmp_path, head):
    _, mask = head
    ones = np.ones(SHAPE)
    out = tmp_path / "u.png"
    with pytest.raises(ValueError, match="same shape"):
        plot_uncertainty_and_error(out, ones, ones, mask[:, :, :-1], SPACING)
    with pytest.raises(ValueError, match="negative"):
        plot_uncertainty_and_error(out, ones, -ones, mask, SPACING)
    with pytest.raises(ValueError, match="z must be"):
        plot_uncertainty_and_error(out, ones, ones, mask, SPACING, z=-1)
    assert list(tmp_path.iterdir()) == []


def test_correlation_is_one_for_a_proportional_error_inside_the_mask(head):
    _, mask = head
    rng = np.random.default_rng(2)
    uncertainty = rng.uniform(0.0, 0.2, SHAPE)
    # Outside the mask the error is unrelated noise: it must not count.
    abs_error = np.where(mask, 2 * uncertainty, rng.uniform(0.0, 1.0, SHAPE))
    assert uncertainty_error_correlation(uncertainty, abs_error, mask) == pytest.approx(1.0, abs=1e-12)
    assert uncertainty_error_correlation(uncertainty, abs_error, np.ones(SHAPE, dtype=bool)) < 0.9


def test_correlation_is_near_zero_for_independent_maps():
    rng = np.random.default_rng(3)
    shape = (100, 100, 20)  # 200 000 voxels: the standard error of r is about 0.002
    r = uncertainty_error_correlation(rng.uniform(size=shape), rng.uniform(size=shape), np.ones(shape, dtype=bool))
    assert abs(r) < 0.05


def test_correlation_is_nan_when_undefined(head):
    _, mask = head
    varying = np.random.default_rng(4).uniform(size=SHAPE)
    assert math.isnan(uncertainty_error_correlation(np.full(SHAPE, 0.1), varying, mask))
    assert math.isnan(uncertainty_error_correlation(varying, np.full(SHAPE, 0.3), mask))
    assert math.isnan(uncertainty_error_correlation(varying, varying, np.zeros(SHAPE, dtype=bool)))


def test_correlation_ignores_non_finite_voxels(head):
    _, mask = head
    uncertainty = np.random.default_rng(5).uniform(size=SHAPE)
    abs_error = 3 * uncertainty
    abs_error[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    assert uncertainty_error_correlation(uncertainty, abs_error, mask) == pytest.approx(1.0, abs=1e-12)
