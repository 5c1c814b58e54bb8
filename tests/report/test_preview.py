"""The reconstruction preview PNG: written atomically, readable, honest about provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from lib.report import preview
from lib.report.preview import STATUS_COLOURS, SliceStatus, status_colours, write_preview

SHAPE = (40, 48, 30)
SPACING = (1.0, 1.0, 2.5)


@pytest.fixture(scope="module")
def volumes() -> tuple[np.ndarray, np.ndarray]:
    """A head-like CT in HU (air outside an ellipsoid of 0-80 HU tissue) and an MRI in [0, 1]."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    inside = x**2 + y**2 + z**2 < 0.8
    rng = np.random.default_rng(0)
    ct = np.where(inside, 30 + 10 * rng.standard_normal(SHAPE), -1000.0)
    mri = np.where(inside, 0.6 + 0.3 * x, 0.0)
    return ct, mri


def mixed_statuses(depth: int) -> list[str]:
    return ["acquired" if k % 3 == 0 else ("fallback" if k % 5 == 0 else "retrieved") for k in range(depth)]


def render(path: Path, volumes, statuses: list[str], **kwargs) -> np.ndarray:
    ct, mri = volumes
    similarity = np.where(np.array(statuses) == "acquired", np.nan, np.linspace(0.4, 0.95, len(statuses)))
    write_preview(path, ct, mri, SPACING, statuses, similarity, tau=0.7, **kwargs)
    return mpimg.imread(path)[..., :3]


def pixels_near(image: np.ndarray, colour: tuple[float, float, float], tolerance: float = 0.03) -> int:
    return int(np.all(np.abs(image - np.asarray(colour)) < tolerance, axis=-1).sum())


def test_writes_a_readable_png_and_leaves_no_temporaries(tmp_path, volumes):
    out = tmp_path / "preview.png"
    image = render(out, volumes, mixed_statuses(SHAPE[2]), title="case 7")
    assert out.read_bytes().startswith(b"\x89PNG")
    height, width = image.shape[:2]
    assert 600 <= height <= 2000 and 600 <= width <= 2000
    # Not blank: the greyscale views and the coloured strip are there.
    assert image.std() > 0.05
    assert sorted(path.name for path in tmp_path.iterdir()) == ["preview.png"]


def test_strip_colours_follow_the_statuses(tmp_path, volumes):
    depth = SHAPE[2]
    fallback = render(tmp_path / "fallback.png", volumes, ["fallback"] * depth)
    acquired = render(tmp_path / "acquired.png", volumes, ["acquired"] * depth)
    orange, blue = STATUS_COLOURS[SliceStatus.FALLBACK], STATUS_COLOURS[SliceStatus.ACQUIRED]
    # The strip fills a wide band; the legend shows every colour as one small patch in both.
    assert pixels_near(fallback, orange) > 10 * pixels_near(acquired, orange) > 0
    assert pixels_near(acquired, blue) > 10 * pixels_near(fallback, blue) > 0


def test_status_colours_maps_each_slice():
    colours = status_colours(["acquired", "retrieved", "fallback", SliceStatus.ACQUIRED])
    assert colours.shape == (4, 3)
    np.testing.assert_allclose(colours[0], STATUS_COLOURS[SliceStatus.ACQUIRED])
    np.testing.assert_allclose(colours[1], STATUS_COLOURS[SliceStatus.RETRIEVED])
    np.testing.assert_allclose(colours[2], STATUS_COLOURS[SliceStatus.FALLBACK])
    np.testing.assert_allclose(colours[3], colours[0])
    assert len({tuple(c) for c in STATUS_COLOURS.values()}) == 3
    assert status_colours([]).shape == (0, 3)


def test_ct_window_is_the_brain_window_only_for_hounsfield_units():
    assert preview._ct_display_range(np.array([-1000.0, 20.0, 1500.0])) == (0.0, 80.0)
    assert preview._ct_display_range(np.array([-1.0, 0.5, 1.0])) == (-1.0, 1.0)
    assert preview._ct_display_range(np.full(4, 3.0)) == (3.0, 4.0)


def test_overwrites_an_existing_preview(tmp_path, volumes):
    out = tmp_path / "preview.png"
    out.write_bytes(b"old")
    render(out, volumes, mixed_statuses(SHAPE[2]))
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mri": np.zeros((40, 48, 29))}, r"same grid"),
        ({"ct": np.zeros((40, 48))}, r"3-D"),
        ({"slice_status": ["acquired"] * 29}, r"29 entries for 30 slices"),
        (
            {"slice_status": ["acquired"] * 29 + ["guessed"]},
            r"slice_status\[29\] is 'guessed'.*acquired.*retrieved.*fallback",
        ),
        ({"similarity": np.zeros(31)}, r"one value per slice \(30\)"),
        ({"spacing": (1.0, 0.0, 2.0)}, r"spacing"),
        ({"spacing": (1.0, 1.0)}, r"spacing"),
        ({"tau": float("nan")}, r"tau"),
    ],
)
def test_bad_arguments_raise_value_error_and_write_nothing(tmp_path, volumes, change, message):
    ct, mri = volumes
    arguments = {
        "ct": ct,
        "mri": mri,
        "spacing": SPACING,
        "slice_status": mixed_statuses(SHAPE[2]),
        "similarity": np.zeros(SHAPE[2]),
        "tau": 0.7,
    } | change
    out = tmp_path / "preview.png"
    with pytest.raises(ValueError, match=message):
        write_preview(out, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_failed_render_leaves_no_partial_file(tmp_path, volumes, monkeypatch):
    from matplotlib.figure import Figure

    def crash(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise RuntimeError("renderer crashed (simulated)")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        render(tmp_path / "preview.png", volumes, mixed_statuses(SHAPE[2]))
    assert list(tmp_path.iterdir()) == []
