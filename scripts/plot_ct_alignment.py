"""Figure: real head CTs registered to the CT head template (lib.data.ct_alignment).

One row per CT: the real head CT study (2.5 mm series), its upper 40 % with a simulated 15
degree gantry tilt, and Debian's Cranium CT. Columns: the CT resampled into the template (MNI)
on the template's mid-sagittal plane, the same with the template's bone edge (red) and brain
extent (dashed lines at normalised positions 0 and 1) drawn over it, and an axial template
slice (halfway through the CT's slices) with the CT's bone edge (red) over the template. A good
registration puts the CT's skull on the template's.

Run from the repository root::

    .venv/bin/python scripts/plot_ct_alignment.py --out docs/figures/ct_alignment.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script (not a module), so the repository root must be importable.
sys.path.insert(0, str(ROOT))

from lib.data.ct_alignment import align_to_template, load_ct_template  # noqa: E402
from lib.data.invesalius import read_inv3  # noqa: E402
from lib.io import read_volume  # noqa: E402
from tests.tilted import make_tilted  # noqa: E402

HEAD_CT_STUDY = ROOT.parent / "shared" / "data" / "head_ct_study" / "DICOM"
WINDOW_HU = (-100.0, 150.0)
BONE_HU = 400.0


def _sagittal(array_zyx: np.ndarray) -> np.ndarray:
    """Mid-sagittal plane (template x = 0 is the middle column), superior up."""
    return array_zyx[:, :, array_zyx.shape[2] // 2]


def _row(axes, volume, name: str, template) -> None:
    alignment = align_to_template(volume)
    moved = sitk.GetArrayFromImage(alignment.resample_to_template(volume, fill=-1000.0))
    reference = sitk.GetArrayFromImage(template.image)
    z_index = [
        template.image.TransformPhysicalPointToContinuousIndex((0.0, 0.0, z))[2]
        for z in (alignment.brain_inferior_mm, alignment.brain_superior_mm)
    ]
    axes[0].imshow(_sagittal(moved), origin="lower", cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[0].set_title("CT in template space (mid-sagittal)", fontsize=8)
    axes[1].imshow(_sagittal(moved), origin="lower", cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[1].contour(_sagittal(reference), [BONE_HU], colors="red", linewidths=0.7)
    for z in z_index:
        axes[1].axhline(z, color="cyan", linestyle="--", linewidth=0.7)
    axes[1].set_title("+ template bone, brain extent 0..1", fontsize=8)
    # The axial plane halfway through the CT's own slices (in the template brain's extent, capped at 0.8).
    positions = alignment.normalised_positions(volume)
    middle = min(float(np.clip(np.median(positions), 0.0, 1.0)), 0.8)
    z_mm = alignment.brain_inferior_mm + middle * (alignment.brain_superior_mm - alignment.brain_inferior_mm)
    axial = int(round(template.image.TransformPhysicalPointToContinuousIndex((0.0, 0.0, z_mm))[2]))
    axes[2].imshow(reference[axial], origin="lower", cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
    axes[2].contour(moved[axial], [BONE_HU], colors="red", linewidths=0.7)
    axes[2].set_title(f"template axial z = {z_mm:.0f} mm + CT bone", fontsize=8)
    summary = alignment.summary()
    axes[0].text(
        -0.08,
        0.5,
        f"{name}\nMI {summary['metric']:.2f}, rotation {np.round(summary['rotation_deg'], 1).tolist()} deg\n"
        f"slice positions {positions[0]:.2f}..{positions[-1]:.2f}, {summary['seconds']:.1f} s",
        transform=axes[0].transAxes,
        rotation=90,
        ha="right",
        va="center",
        fontsize=8,
    )
    for ax in axes:
        ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "ct_alignment.png")
    args = parser.parse_args()
    template = load_ct_template()
    study = read_volume(HEAD_CT_STUDY)
    count = study.shape[2]
    rows = [
        (study, "head CT study, 2.5 mm"),
        (make_tilted(study, 15.0).take_slices(list(range(int(count * 0.6), count))), "upper 40 %, 15 deg gantry tilt"),
        (read_inv3(), "Debian Cranium CT"),
    ]
    figure, axes = plt.subplots(len(rows), 3, figsize=(9.5, 3.3 * len(rows)))
    for row, (volume, name) in zip(axes, rows):
        _row(row, volume, name, template)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
