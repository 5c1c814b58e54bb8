"""Figure: the CT brain mask (lib.data.ct_brain) on the two real head CTs.

Top row: the real head CT study (2.5 mm axial series, ../shared/data/head_ct_study/DICOM);
bottom row: Debian's Cranium CT (invesalius-examples). Three axial slices each (low, middle,
high in the mask's extent), windowed 0-80 HU, the mask as a red contour over a light tint.

Run from the repository root::

    .venv/bin/python scripts/plot_ct_brain_mask.py --out docs/figures/ct_brain_mask.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script (not a module), so the repository root must be importable.
sys.path.insert(0, str(ROOT))

from lib.data.ct_brain import extract_brain  # noqa: E402
from lib.data.invesalius import CRANIUM_PATH, read_inv3  # noqa: E402
from lib.io import read_volume  # noqa: E402

HEAD_CT_STUDY = ROOT.parent / "shared" / "data" / "head_ct_study" / "DICOM"
WINDOW_HU = (0.0, 80.0)
# Where in the mask's slice range the three shown slices lie (low, middle, high).
SLICE_FRACTIONS = (0.2, 0.5, 0.8)


def _row(axes, volume, name: str) -> None:
    start = time.perf_counter()
    result = extract_brain(volume)
    seconds = time.perf_counter() - start
    if result is None:
        raise SystemExit(f"{name}: no bone found, not a head CT")
    present = np.nonzero(result.mask.any(axis=(0, 1)))[0]
    stats = result.stats
    for ax, fraction in zip(axes, SLICE_FRACTIONS):
        k = int(round(present[0] + fraction * (present[-1] - present[0])))
        # Array axes run towards R, A, S: transpose so that x is horizontal and anterior is up.
        ax.imshow(volume.array[:, :, k].T, origin="lower", cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
        ax.imshow(
            np.ma.masked_where(~result.mask[:, :, k].T, result.mask[:, :, k].T),
            origin="lower",
            cmap="autumn",
            alpha=0.25,
        )
        ax.contour(result.mask[:, :, k].T, [0.5], colors="red", linewidths=0.8)
        ax.set_title(f"slice {k} of {volume.shape[2]}", fontsize=9)
        ax.axis("off")
    axes[0].text(
        -0.05,
        0.5,
        f"{name}\n{result.brain_volume_ml:.0f} ml, median {stats['median_hu']:.0f} HU,\n"
        f"{100 * stats['fraction_above_150_hu']:.2f} % > 150 HU, {seconds:.1f} s",
        transform=axes[0].transAxes,
        rotation=90,
        ha="right",
        va="center",
        fontsize=9,
    )
    print(f"{name}: {result.summary()} stats={ {k: round(v, 4) for k, v in stats.items()} } in {seconds:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """Draw the montage and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "figures" / "ct_brain_mask.png", help="PNG to write"
    )
    parser.add_argument("--dicom", type=Path, default=HEAD_CT_STUDY, help="the real head CT study folder")
    parser.add_argument("--inv3", type=Path, default=CRANIUM_PATH, help="Debian's Cranium.inv3")
    args = parser.parse_args(argv)

    study = read_volume(args.dicom)
    cranium = read_inv3(args.inv3)
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.4))
    _row(axes[0], study, f"head CT study, {study.slice_steps[0]:.1f} mm")
    _row(axes[1], cranium, "Cranium CT, 1.5 mm")
    fig.suptitle(
        f"CT brain mask (lib.data.ct_brain), window {WINDOW_HU[0]:.0f}-{WINDOW_HU[1]:.0f} HU, anterior up", fontsize=11
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
