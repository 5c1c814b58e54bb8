"""Destriping (lib/data/destripe.py) on volumes whose stripes and detail are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from lib.consistency import measure_banding
from lib.data.destripe import smooth_along_z, stripe_sigma_slices

PERIOD = 5  # every 5th slice acquired, as a 5 mm CT on a 1 mm grid


def striped_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A smooth anatomy, a fine in-plane checkerboard (the detail to keep) and stripes: each
    acquired slice 0.05 brighter, and each generated slice off by its own random 0.03."""
    z, y, x = np.mgrid[:40, :64, :64]
    mask = (y - 32) ** 2 + (x - 32) ** 2 < 28**2
    anatomy = 0.5 + 0.2 * np.sin(y / 9.0) * np.cos(x / 11.0) + 0.002 * z
    detail = 0.05 * (((x + y + z) % 2) * 2 - 1)  # flips from slice to slice: z-averaging would erase it
    acquired = np.arange(40) % PERIOD == 0
    offsets = np.where(acquired, 0.05, np.random.default_rng(seed).normal(0.0, 0.03, 40))
    volume = np.where(mask, anatomy + detail + offsets[:, None, None], -1.0).astype(np.float32)
    return volume, mask, acquired, detail


def banding(volume: np.ndarray, mask: np.ndarray, acquired: np.ndarray) -> dict:
    # measure_banding takes (X, Y, Z); these volumes are (Z, H, W) like the model's slices.
    return measure_banding(np.moveaxis(volume, 0, -1), np.moveaxis(mask, 0, -1), acquired).to_dict()


def test_stripes_go_and_the_fine_detail_stays():
    volume, mask, acquired, detail = striped_volume()
    before = banding(volume, mask, acquired)["brightness_jump"]
    out = smooth_along_z(volume, mask, sigma_xy=3.0, sigma_z=stripe_sigma_slices(acquired))
    after = banding(out, mask, acquired)["brightness_jump"]
    for kind in ("acquired_generated", "generated_generated"):
        assert after[kind] < before[kind] / 5
    # The checkerboard (finer than sigma_xy) is still there in every slice at full strength:
    # its share of each slice, least squares inside the brain's interior, stays 1.
    inner = np.zeros_like(mask)
    inner[:, 12:52, 12:52] = mask[:, 12:52, 12:52]
    for z in range(volume.shape[0]):
        inside = inner[z]
        strength = (out[z][inside] * detail[z][inside]).sum() / (detail[z][inside] ** 2).sum()
        assert strength == pytest.approx(1.0, abs=0.05)


def test_outside_the_mask_and_without_gaps_nothing_changes():
    volume, mask, acquired, _ = striped_volume()
    out = smooth_along_z(volume, mask, sigma_xy=3.0, sigma_z=2.5)
    np.testing.assert_array_equal(out[~mask], volume[~mask])
    np.testing.assert_array_equal(smooth_along_z(volume, mask, sigma_xy=3.0, sigma_z=0.0), volume)


@pytest.mark.parametrize(
    ("acquired", "sigma"),
    [
        (np.arange(40) % 5 == 0, 2.5),
        (np.arange(40) % 2 == 0, 1.0),
        (np.ones(40, dtype=bool), 0.0),  # nothing generated: no stripes to remove
        (np.eye(1, 40, 0, dtype=bool)[0], 0.0),  # one acquired slice: no period
    ],
)
def test_the_z_sigma_follows_the_acquisition_step(acquired, sigma):
    assert stripe_sigma_slices(acquired) == sigma
