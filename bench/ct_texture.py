"""Real CT texture for the synthesis: fit it on the real head CTs, compare synthetic CTs with them.

``python -m bench.ct_texture fit``: measures every real head CT this machine has (the head CT
study's two original axial series from ``../shared/data/head_ct_study``, Debian's Cranium from
invesalius-examples) with :func:`lib.data.ct_texture_fit.measure_texture` after brain extraction
(:func:`lib.data.ct_brain.extract_brain`) and writes ``lib/data/ct_texture.json``.

``python -m bench.ct_texture compare``: for each real scan, a synthetic pseudo-subject painted
with exactly that scan's texture (a BraTS T1 anatomy, its tumour left out to compare normal
brain with normal brain) is measured by the same code; prints a Markdown table of real against
synthetic and writes a figure (brain HU histograms, radial noise power spectra, one slice each).

``python -m bench.ct_texture lesions``: the FLAIR rule's agreement with the BraTS tumour labels
of the subjects that have them, and a figure of lesion-aware pseudo-subjects.

ITK (the atlas registration) uses ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench.ct_prepare import HEAD_CT_STUDY
from lib.data.ct_brain import extract_brain
from lib.data.ct_texture import TEXTURE_FILE, ScanTexture, load_scan_textures, save_scan_textures
from lib.data.ct_texture_fit import (
    CLASS_PROBABILITY,
    EROSION_MM,
    FIT_BAND,
    HOMOGENEITY_RANGE_HU,
    PATCH_MM,
    RIM_BANDS_MM,
    TextureMeasurement,
    measure_texture,
)
from lib.data.invesalius import CRANIUM_PATH, read_inv3
from lib.data.lesions import FLAIR_RULE, LesionLabel, flair_hyperintensity
from lib.data.synthesis import (
    CtAppearance,
    TissueModel,
    make_pseudo_subject,
    mni_ct_atlas,
    tissue_model_from_t1,
    with_lesions,
)
from lib.io import read_volume, scan_dicom_folder
from lib.io.dicom import is_axial
from lib.io.nifti import read_nifti
from lib.io.volume import Volume

SHARED_DATA = HEAD_CT_STUDY.parents[1]
# The anatomy of the synthetic side of the comparison: a 2023 BraTS T1 of good quality.
COMPARISON_ANATOMY = SHARED_DATA / "brats_dev" / "BraTS-GLI-00001-000"
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"

METHOD = (
    "Brain of each real CT (lib.data.ct_brain.extract_brain), axial slices resampled in-plane to 1 mm "
    f"(anti-aliased bilinear), mask eroded in-plane by {EROSION_MM} mm. Noise: {PATCH_MM} mm patches whose "
    f"3 mm-smoothed HU range is <= {HOMOGENEITY_RANGE_HU} HU, quadratic trend removed, Hann window; radial "
    f"noise power spectrum fitted by A exp(-4 pi^2 k^2 f^2) for f in {FIT_BAND} cycles/mm (log power linear "
    "in f^2); sd_hu is the model's integral; thickness_mm from the noise correlation of the same patch in "
    "adjacent slices (Gaussian slice profile). Classes: MNI152 tissue maps registered affinely (SimpleITK, "
    f"masks then Mattes MI); region = probability > {CLASS_PROBABILITY} in a 3x3 in-plane neighbourhood; "
    "grey/white: median and 1.4826 MAD; CSF: lower component of a 2-component Gaussian mixture of its region. "
    "tissue_sd_hu = sqrt(max(0, sd_white^2 - sd_noise^2)). Rim: median of (CT - atlas painted with the class HU) "
    f"in bands of distance to the brain mask's edge {RIM_BANDS_MM} mm, fitted by hu exp(-d / length_mm) + c. "
    "Written by `python -m bench.ct_texture fit`."
)


@dataclass
class RealScan:
    """A real head CT to measure."""

    name: str
    source: str
    volume: Volume
    nominal_thickness_mm: float | None


def real_scans() -> list[RealScan]:
    """The real head CTs on this machine (warns about those missing)."""
    scans = []
    if HEAD_CT_STUDY.is_dir():
        scan = scan_dicom_folder(HEAD_CT_STUDY)
        for uid, series in sorted(scan.series.items(), key=lambda item: -len(item[1].files)):
            if "ORIGINAL" not in series.image_type or not is_axial(series) or len(series.files) < 10:
                continue
            volume = read_volume(HEAD_CT_STUDY, series_uid=uid)
            thickness = float(volume.meta["slice_thickness"])
            scans.append(
                RealScan(
                    name=f"study_{thickness:g}mm",
                    source=(
                        f"shared/data/head_ct_study, original axial series ...{uid[-10:]} ({len(series.files)} slices, "
                        f"{thickness:g} mm, GE Revolution EVO, 120 kV, kernel STANDARD)"
                    ),
                    volume=volume,
                    nominal_thickness_mm=thickness,
                )
            )
    else:
        warnings.warn(f"{HEAD_CT_STUDY} missing: the head CT study is not measured", stacklevel=2)
    if CRANIUM_PATH.is_file():
        scans.append(
            RealScan(
                name="cranium",
                source=f"{CRANIUM_PATH} (Debian invesalius-examples; 1.5 mm slice spacing, thickness not recorded)",
                volume=read_inv3(CRANIUM_PATH),
                nominal_thickness_mm=None,
            )
        )
    else:
        warnings.warn(f"{CRANIUM_PATH} missing (apt-get install invesalius-examples): not measured", stacklevel=2)
    return scans


def _measure(
    hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, name: str, source: str, nominal
) -> TextureMeasurement:
    """:func:`measure_texture` with the MNI152 atlas painted as a noise-free CT (literature HU,
    :func:`lib.data.synthesis.mni_ct_atlas`)."""
    painted, atlas = mni_ct_atlas()
    return measure_texture(
        hu, mask, affine, painted, atlas.mask, atlas.affine, atlas.probabilities, name, source, nominal
    )


def measure_real() -> list[TextureMeasurement]:
    """Measure every real scan."""
    measured = []
    for scan in real_scans():
        started = time.perf_counter()
        brain = extract_brain(scan.volume)
        if brain is None:
            raise ValueError(f"{scan.name}: no skull found, not a head CT")
        measured.append(
            _measure(
                scan.volume.array,
                brain.mask,
                scan.volume.voxel_affine(),
                scan.name,
                scan.source,
                scan.nominal_thickness_mm,
            )
        )
        print(f"measured {scan.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return measured


def measure_synthetic(texture: ScanTexture, anatomy: TissueModel, seed: int) -> TextureMeasurement:
    """A pseudo-subject with exactly ``texture``'s appearance, sampled at the scan's slice spacing."""
    rng = np.random.default_rng(seed)
    subject = make_pseudo_subject(
        anatomy, seed, appearance=CtAppearance.of_texture(texture, rng), calcification_probability=0.0
    )
    step = max(1, int(round(texture.slice_spacing_mm / anatomy.voxel_size[2])))
    affine = subject.affine.copy()
    affine[:3, 2] *= step
    return _measure(
        subject.ct[:, :, ::step],
        subject.mask[:, :, ::step],
        affine,
        f"synthetic {texture.name}",
        f"pseudo-subject seed {seed} of {COMPARISON_ANATOMY.name}, every {step} mm",
        None,
    )


def _row(label: str, measurement: TextureMeasurement) -> str:
    texture = measurement.texture
    brain = measurement.brain_hu
    p5, p50, p95 = np.percentile(brain, [5, 50, 95])
    classes = " / ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(texture.class_hu, texture.class_sd_hu))
    noise = texture.noise
    return (
        f"| {label} | {classes} | {noise.sd_hu:.2f} | {noise.kernel_mm:.2f} | {texture.adjacent_slice_correlation:.2f} "
        f"@ {texture.slice_spacing_mm:g} mm | {noise.thickness_mm:.1f} | {texture.tissue_sd_hu:.1f} | "
        f"{texture.rim.hu:.1f} / {texture.rim.length_mm:.1f} | {p50:.1f} ({p5:.1f}-{p95:.1f}) |"
    )


TABLE_HEADER = (
    "| scan | CSF / grey / white HU (median ± SD) | noise SD HU | kernel mm | adjacent-slice corr. | "
    "slice profile FWHM mm | tissue SD HU | rim HU / mm | brain HU median (p5-p95) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def fit(out: Path) -> None:
    """Measure the real scans and write the texture file."""
    measured = measure_real()
    save_scan_textures([m.texture for m in measured], out, METHOD)
    print(f"wrote {out}\n\n{TABLE_HEADER}")
    for measurement in measured:
        print(_row(measurement.texture.name, measurement))
        print(
            f"  ({measurement.noise.patch_count} patches, {measurement.noise.pair_count} slice pairs, "
            f"class regions {measurement.classes.voxels} voxels)"
        )


def compare(figure: Path, seed: int) -> None:
    """Real against synthetic: table and figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, atlas = mni_ct_atlas()
    real = {m.texture.name: m for m in measure_real()}
    fitted = {t.name: t for t in load_scan_textures()}
    t1 = read_nifti(COMPARISON_ANATOMY / "t1n.nii.gz", modality="MR")
    anatomy = tissue_model_from_t1(t1.array, t1.array > 0, t1.voxel_affine(), atlas=atlas)
    print(TABLE_HEADER)
    pairs = []
    for name, measurement in real.items():
        synthetic = measure_synthetic(fitted.get(name, measurement.texture), anatomy, seed)
        pairs.append((measurement, synthetic))
        print(_row(f"{name} real", measurement))
        print(_row(f"{name} synthetic", synthetic))

    fig, axes = plt.subplots(3, len(pairs), figsize=(5.2 * len(pairs), 12.5), squeeze=False)
    bins = np.arange(-20.0, 90.0, 1.0)
    for column, (real_m, synth_m) in enumerate(pairs):
        name = real_m.texture.name
        top, bottom, rim = axes[0, column], axes[1, column], axes[2, column]
        for measurement, colour, label in ((real_m, "black", "real"), (synth_m, "tab:red", "synthetic")):
            top.hist(measurement.brain_hu, bins=bins, density=True, histtype="step", color=colour, label=label)
            noise = measurement.noise
            inside = noise.frequency > 0
            bottom.semilogy(
                noise.frequency[inside], noise.power[inside], "o", ms=4, color=colour, label=f"{label}, measured"
            )
            f = np.linspace(0.0, 0.5, 100)
            bottom.semilogy(
                f,
                measurement.texture.noise.in_plane_nps(f),
                "-",
                color=colour,
                lw=1,
                label=f"{label}, fit: SD {noise.model.sd_hu:.1f} HU, kernel {noise.model.kernel_mm:.2f} mm",
            )
            model = measurement.rim.model
            rim.plot(
                measurement.rim.distance_mm, measurement.rim.excess_hu, "o", color=colour, label=f"{label}, measured"
            )
            d = np.linspace(0.0, RIM_BANDS_MM[-1], 100)
            rim.plot(
                d,
                model.hu * np.exp(-d / model.length_mm),
                "-",
                color=colour,
                lw=1,
                label=f"{label}, fit: {model.hu:.1f} HU x exp(-d / {model.length_mm:.1f} mm)",
            )
        top.set_title(f"{name}: brain HU (1 mm in-plane, eroded {EROSION_MM:g} mm)")
        top.set_xlabel("HU")
        top.legend(fontsize=8)
        bottom.axvspan(*FIT_BAND, color="0.93", zorder=0)
        bottom.set_title(f"{name}: radial noise power spectrum (fit band shaded)")
        bottom.set_xlabel("spatial frequency (cycles/mm)")
        bottom.set_ylabel("NPS (HU² mm²)")
        bottom.legend(fontsize=7)
        rim.axhline(0.0, color="0.6", lw=0.8)
        rim.set_title(f"{name}: HU above the tissue classes' (rim)")
        rim.set_xlabel("distance to the brain's edge (mm)")
        rim.set_ylabel("excess HU (median)")
        rim.legend(fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=90)
    print(f"wrote {figure}")


def _lesion_model(case: Path, atlas: TissueModel) -> TissueModel:
    """A BraTS case's tissue model with its lesions, as the ``open`` layout builds it."""
    t1 = read_nifti(case / "t1n.nii.gz", modality="MR")
    model = tissue_model_from_t1(t1.array, t1.array > 0, t1.voxel_affine(), atlas=atlas)
    labels = read_nifti(case / "seg.nii.gz").array if (case / "seg.nii.gz").is_file() else None
    return with_lesions(model, labels, read_nifti(case / "t2f.nii.gz", modality="MR").array)


def lesions(figure: Path, seed: int) -> None:
    """The FLAIR rule against the BraTS labels, and a figure of lesion-aware pseudo-subjects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, atlas = mni_ct_atlas()
    print("| subject | tumour ml (labels) | FLAIR rule ml | Dice | precision | recall |\n|---|---|---|---|---|---|")
    scores = []
    for case in sorted((SHARED_DATA / "brats_more").glob("Brats18_*")):
        t1 = read_nifti(case / "t1n.nii.gz", modality="MR")
        model = tissue_model_from_t1(t1.array, t1.array > 0, t1.voxel_affine(), atlas=atlas)
        tumour = read_nifti(case / "seg.nii.gz").array > 0
        flair = read_nifti(case / "t2f.nii.gz", modality="MR").array
        found = flair_hyperintensity(flair, model.mask, model.probabilities[2], model.voxel_size)
        overlap = float((found & tumour).sum())
        dice = 2 * overlap / max(found.sum() + tumour.sum(), 1)
        precision, recall = overlap / max(found.sum(), 1), overlap / max(tumour.sum(), 1)
        scores.append((dice, precision, recall))
        print(
            f"| {case.name} | {tumour.sum() / 1000:.0f} | {found.sum() / 1000:.0f} | {dice:.2f} | {precision:.2f} "
            f"| {recall:.2f} |",
            flush=True,
        )
    scores = np.array(scores)
    print(
        f"\nFLAIR rule {FLAIR_RULE}: Dice mean {scores[:, 0].mean():.2f}, median {np.median(scores[:, 0]):.2f}; "
        f"precision mean {scores[:, 1].mean():.2f}; recall mean {scores[:, 2].mean():.2f} ({len(scores)} subjects)"
    )

    examples = [SHARED_DATA / "brats_more" / "Brats18_TCIA02_135_1", SHARED_DATA / "brats_dev" / "Brats18_CBICA_ASA_1"]
    examples = [case for case in examples if case.is_dir()]
    fig, axes = plt.subplots(len(examples), 4, figsize=(13, 3.9 * len(examples)), squeeze=False)
    colours = plt.get_cmap("tab10")
    # No deformation: the real FLAIR shown beside the pseudo-subject stays aligned with it.
    still = {"max_displacement_mm": 0.0, "max_rotation_deg": 0.0, "scale_range": (1.0, 1.0)}
    for index, (row, case) in enumerate(zip(axes, examples)):
        model = _lesion_model(case, atlas)
        subject = make_pseudo_subject(model, seed + index, **still, calcification_probability=1.0)
        flair = read_nifti(case / "t2f.nii.gz", modality="MR").array
        z = int(np.argmax((subject.lesions > 0).sum(axis=(0, 1))))
        panels = [
            (subject.t1[:, :, z], f"{case.name}: T1 (real)", None),
            (flair[:, :, z], "FLAIR (real)", None),
            (
                np.clip(subject.ct[:, :, z], 0, 80),
                f"synthetic CT, brain window 0-80 HU\n{subject.appearance.description}",
                None,
            ),
            (subject.t1[:, :, z], f"lesions (from {model.lesion_source})", subject.lesions[:, :, z]),
        ]
        for axis, (image, title, overlay) in zip(row, panels):
            axis.imshow(image.T, cmap="gray", origin="lower")
            if overlay is not None:
                shown = np.ma.masked_equal(overlay.T, LesionLabel.NONE)
                axis.imshow(shown, cmap=colours, vmin=0, vmax=10, origin="lower", interpolation="nearest")
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    labels = [label for label in LesionLabel if label != LesionLabel.NONE]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(int(label))) for label in labels]
    fig.legend(handles, [label.name.lower() for label in labels], loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=80)
    print(f"wrote {figure}")


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ct_texture", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="ITK threads (default 1)")
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="measure the real CTs, write the texture file")
    fit_parser.add_argument("--out", type=Path, default=TEXTURE_FILE)
    compare_parser = commands.add_parser("compare", help="real against synthetic: table and figure")
    compare_parser.add_argument("--figure", type=Path, default=FIGURES / "ct_texture.png")
    compare_parser.add_argument("--seed", type=int, default=7)
    lesions_parser = commands.add_parser("lesions", help="FLAIR rule against labels; lesion figure")
    lesions_parser.add_argument("--figure", type=Path, default=FIGURES / "synthesis_lesions.png")
    lesions_parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.command == "fit":
        fit(args.out)
    elif args.command == "compare":
        compare(args.figure, args.seed)
    else:
        lesions(args.figure, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
