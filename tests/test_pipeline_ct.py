"""The pipeline on a real head CT with a CT preset: brain extraction on by default, off on request,
skipped for a CT that is already brain-only."""

from __future__ import annotations

import numpy as np
import pytest

from lib.data.ct_brain import extract_brain
from lib.io.volume import Volume
from lib.pipeline import ReBrainPipeline, ReconstructionOptions

from tests.tiny_preset import make_tiny_preset


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return ReBrainPipeline(make_tiny_preset(tmp_path_factory.mktemp("preset"), "tinyct", layout="open", max_subjects=3))


@pytest.fixture(scope="module")
def head_cut(real_ct_volume):
    middle = real_ct_volume.shape[2] // 2
    return real_ct_volume.take_slices(list(range(middle - 6, middle + 6, 2)))


def test_real_ct_gets_the_brain_only(pipeline, head_cut):
    result = pipeline.reconstruct(head_cut, ReconstructionOptions(steps=2))
    record = result.summary["brain_extraction"]
    assert record["applied"] is True and 0.05 < record["brain_fraction"] < 0.6 and record["brain_volume_ml"] > 100
    brain = extract_brain(head_cut).mask
    for k in np.flatnonzero(result.grid.acquired):
        # The synthetic MRI exists only inside the intracranial mask (never on skull or scalp).
        assert not np.any((result.mri[:, :, k] > 0) & ~brain[:, :, result.grid.source_index[k]])
    assert result.mri.max() > 0
    # The display CT is the input's, skull included.
    assert result.ct.max() > 1000


def test_brain_extraction_can_be_turned_off(pipeline, head_cut):
    result = pipeline.reconstruct(head_cut, ReconstructionOptions(steps=2, brain_extraction=False))
    assert result.summary["brain_extraction"] == {"applied": False, "reason": "turned off (input already brain-only)"}
    brain = extract_brain(head_cut).mask
    k = int(np.flatnonzero(result.grid.acquired)[0])
    # Without it the head (skull, scalp) is the foreground and gets synthetic MRI values too.
    assert np.any((result.mri[:, :, k] > 0) & ~brain[:, :, result.grid.source_index[k]])


def test_a_brain_only_ct_is_used_as_it_is(pipeline):
    array = np.full((48, 56, 6), -1000.0, dtype=np.float32)
    array[10:38, 12:44, :] = 32.0
    volume = Volume(array=array, affine=np.diag([2.0, 2.0, 1.0, 1.0]), positions=np.arange(6) * 4.0, modality="CT")
    result = pipeline.reconstruct(volume, ReconstructionOptions(steps=2))
    assert result.summary["brain_extraction"]["applied"] is False and "no skull" in result.summary["brain_extraction"]["reason"]
