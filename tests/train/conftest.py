"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from lib.data.prepare import PrepareConfig, prepare_dataset
from tests.conftest import SHARED_DATA, require


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Three real BraTS subjects prepared at 32 x 32 (train and val splits), shared by the BBDM tests."""
    out = tmp_path_factory.mktemp("bbdm") / "prepared"
    prepare_dataset("brats", require(SHARED_DATA / "brats_dev"), out, config=PrepareConfig(size=32), max_subjects=3)
    return out
