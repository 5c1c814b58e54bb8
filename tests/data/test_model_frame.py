"""ModelFrame: the prepare step's crop/resize/positions applied to input volumes, and the way back."""

from __future__ import annotations

import numpy as np
import pytest

from lib.data.layouts import brats_subjects
from lib.data.model_frame import ModelFrame, foreground_mask, normalise_source
from lib.data.prepare import PrepareConfig, prepare_subject
from lib.io import read_volume
from tests.conftest import SHARED_DATA, require


def ball(shape=(60, 50, 30), centre=(30, 25, 15), radius=12) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.array(centre), axis=-1) <= radius


def test_frame_is_square_in_mm_and_positions_span_the_brain():
    mask = ball()
    positions = np.arange(30) * 2.0  # 2 mm slices
    frame = ModelFrame.fit(mask, positions, pixel_spacing=(1.0, 2.0), size=16, margin_voxels=0)
    rows, cols = frame.rows[1] - frame.rows[0], frame.cols[1] - frame.cols[0]
    assert rows * 1.0 == pytest.approx(cols * 2.0, abs=2.0)  # square in millimetres
    assert frame.low_mm == 3 * 2.0 and frame.high_mm == 27 * 2.0  # first/last slices of the ball
    np.testing.assert_allclose(frame.normalised_positions([6.0, 54.0, 30.0]), [0.0, 1.0, 0.5])


def test_round_trip_reproduces_a_smooth_image_inside_the_brain():
    mask = ball(shape=(64, 64, 5), centre=(32, 32, 2), radius=20)
    x, y = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
    image = np.repeat((0.5 * np.sin(2 * x) * np.cos(y))[:, :, None], 5, axis=2).astype(np.float32)
    frame = ModelFrame.fit(mask, np.arange(5.0), (1.0, 1.0), size=48)
    model, model_mask = frame.to_model(np.where(mask, image, -1.0), mask)
    assert model.shape == (5, 48, 48) and model_mask.any()
    back = frame.from_model(model, (64, 64), fill=-1.0)
    inner = ball(shape=(64, 64, 5), centre=(32, 32, 2), radius=16)  # away from the resized edge
    assert np.abs(back[inner] - image[inner]).max() < 0.05


def test_a_box_leaving_the_image_is_padded_and_cut_back():
    mask = np.zeros((20, 20, 3), dtype=bool)
    mask[0:6, 14:20] = True  # brain touching two image edges: the box leaves the image
    frame = ModelFrame.fit(mask, np.arange(3.0), (1.0, 1.0), size=8, margin_voxels=4)
    assert frame.rows[0] < 0 and frame.cols[1] > 20
    model, _ = frame.to_model(np.where(mask, 0.5, -1.0).astype(np.float32), mask)
    assert model.shape == (3, 8, 8)
    assert frame.from_model(model, (20, 20), fill=0.0).shape == (20, 20, 3)


def test_foreground_mask_keeps_the_head_and_fills_holes():
    head = ball(shape=(40, 40, 6), centre=(20, 20, 3), radius=15)
    ct = np.where(head, 30.0, -1000.0)
    ct[18:22, 18:22, :] = -1000.0  # an air pocket inside (filled: it is enclosed)
    ct[0, 0, :] = 50.0  # a speck outside (dropped: not the largest component)
    mask = foreground_mask(ct, "ct")
    assert mask[20, 20, 3] and not mask[0, 0, 3]
    assert mask.sum() == pytest.approx(head.sum(), rel=0.02)


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="no brain"):
        ModelFrame.fit(np.zeros((5, 5, 3), dtype=bool), np.arange(3.0), (1.0, 1.0), size=8)


def test_matches_the_prepare_step_on_a_real_volume():
    """A volume framed by the pipeline looks like the prepared training slices (same recipe)."""
    record = brats_subjects(require(SHARED_DATA / "brats_dev"))[0]
    pair = record.load()
    prepared = prepare_subject(pair, PrepareConfig(size=32))
    volume = read_volume(record.files[0], modality="MR")
    mask = foreground_mask(volume.array, "mri")
    frame = ModelFrame.fit(mask, volume.positions, volume.pixel_spacing, 32)
    model, _ = frame.to_model(normalise_source(volume.array, mask, "mri"), mask)
    brain = prepared["brain_fraction"] > 0.2
    # Same slices, same crop (up to the target contrast's share of the mask): close images.
    assert np.abs(model[brain] - prepared["source"][brain]).mean() < 0.1
    np.testing.assert_allclose(
        frame.normalised_positions(volume.positions)[brain], prepared["position"][brain], atol=0.03
    )
