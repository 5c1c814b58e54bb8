"""The real head CT in Debian's invesalius-examples (the demo input)."""

from __future__ import annotations

import io
import plistlib
import tarfile

import numpy as np
import pytest
from scipy import ndimage

from lib.data.invesalius import read_inv3
from lib.io import VolumeReadError


def test_cranium_is_a_real_head_ct_in_hu(cranium):
    assert cranium.shape == (256, 256, 108) and cranium.modality == "CT"
    np.testing.assert_allclose(cranium.pixel_spacing, (0.9570312, 0.9570312), atol=1e-6)
    np.testing.assert_allclose(cranium.slice_steps, 1.5)
    values = cranium.array
    air, soft, bone = (values < -900).mean(), ((values > 0) & (values < 80)).mean(), (values > 700).mean()
    # A head CT: mostly air around the head, a large soft-tissue volume, a few percent bone.
    assert air > 0.3 and soft > 0.1 and 0.005 < bone < 0.1


def test_cranium_orientation_face_is_anterior_and_top_is_superior(cranium):
    values = cranium.array
    head = values > -300
    # Anterior (high j): the sinuses and nasal cavity are air pockets enclosed by the head,
    # and they lie in front of the head's centre.
    filled = np.stack([ndimage.binary_fill_holes(head[:, :, k]) for k in range(head.shape[2])], axis=2)
    pockets = filled & ~head
    assert pockets.sum() > 1000
    assert np.nonzero(pockets)[1].mean() > np.nonzero(head)[1].mean() + 10
    # The skull vertex is at the top: the head's cross-section shrinks towards high k.
    area = head.sum(axis=(0, 1))
    assert area[-5:].mean() < area[len(area) // 2]


def test_corrupt_inv3_is_refused(tmp_path):
    bad = tmp_path / "bad.inv3"
    bad.write_bytes(b"not a tar")
    with pytest.raises(VolumeReadError, match="bad.inv3: not a readable InVesalius"):
        read_inv3(bad)
    # A well-formed archive whose matrix is shorter than its plist says.
    short = tmp_path / "short.inv3"
    with tarfile.open(short, "w:gz") as archive:
        for name, payload in (
            (
                "p/main.plist",
                plistlib.dumps(
                    {
                        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [2, 4, 4]},
                        "spacing": [1.0, 1.0, 1.0],
                    }
                ),
            ),
            ("p/matrix.dat", b"\0" * 10),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with pytest.raises(VolumeReadError, match="matrix holds 10 bytes"):
        read_inv3(short)
