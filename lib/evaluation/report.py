"""The evaluation report folder: metrics.csv, report.md (Table-1 style) and figures.

Written atomically: the folder appears complete or not at all, and an earlier report under
the same name is replaced only by a complete new one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib.consistency import ATLAS_CORE_PROBABILITY, MAX_CALIBRATION_HU, PARENCHYMA_HU, TissueCheckConfig
from lib.evaluation.figures import plot_montage, plot_similarity_histogram, plot_slice_psnr, plot_uncertainty_and_error
from lib.evaluation.harness import LOW_INPUT_COVERAGE, METRIC_COLUMNS, EvaluationResult
from lib.io.atomic import atomic_directory, check_replaceable_folder

TABLE_METRICS = (("nrmse", "NRMSE", 4), ("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("issim", "I-SSIM", 3))
# The same metrics on the generated (gap) slices, where gap filling is tested, and the acquired ones.
PART_METRICS = (
    ("psnr_gap", "gap PSNR (dB)", 2),
    ("ssim_gap", "gap SSIM", 3),
    ("psnr_acquired", "acquired PSNR (dB)", 2),
    ("ssim_acquired", "acquired SSIM", 3),
)
# Checks without ground truth (lib/consistency.py): the synthetic T1 against the CT's tissue
# classes (CT presets), and the stripes where acquired and generated slices meet.
TISSUE_METRICS = (
    ("tissue_order", "W > G > CSF (share)", 2),
    ("t1_white", "T1 white", 3),
    ("t1_grey", "T1 grey", 3),
    ("t1_csf", "T1 CSF", 3),
    ("d_white_grey", "d white-grey", 2),
    ("d_grey_csf", "d grey-CSF", 2),
    ("csf_dice", "CSF Dice", 3),
    ("csf_dice_chance", "CSF Dice by chance", 3),
    ("atlas_order", "atlas W > G > CSF (share)", 2),
    ("atlas_d_white_grey", "atlas d white-grey", 2),
    ("atlas_ct_d_grey_white", "CT d grey-white in atlas", 2),
)
BANDING_METRICS = (
    ("banding_brightness_ratio", "brightness jump ratio", 2),
    ("banding_voxel_ratio", "voxel jump ratio", 2),
)
_CHECK = TissueCheckConfig()  # what the pipeline records with
_RANGES = (
    f"CSF [{_CHECK.csf_hu[0]:g}, {_CHECK.csf_hu[1]:g}), white matter [{_CHECK.white_hu[0]:g}, {_CHECK.white_hu[1]:g}) "
    f"and grey matter [{_CHECK.grey_hu[0]:g}, {_CHECK.grey_hu[1]:g})"
)
TISSUE_DEFINITIONS = f"""Tissue consistency (lib/consistency.py; no ground truth): on the acquired slices only, the
input CT's brain, eroded by {_CHECK.erosion_mm:g} mm and smoothed by a {_CHECK.smoothing_mm:g} mm Gaussian in-plane, is
classified by HU as {_RANGES} (the rest unclassified),
every range shifted by the scan's calibration: its own white/grey boundary (the isodata
threshold of its brain HU in {PARENCHYMA_HU[0]:g}-{PARENCHYMA_HU[1]:g} HU) minus the literature's \
{_CHECK.white_grey_boundary():g} HU, at most +-{MAX_CALIBRATION_HU:g} HU
(the shift is in provenance.json). A real T1 orders the classes white > grey > CSF. Share: runs
where the synthetic T1's class means keep that order; T1 columns: those means; d: Cohen's d
(mean difference over the pooled standard deviation), positive in the T1 order; CSF Dice: the
T1's n darkest classified voxels (n = CSF voxels) against the CT's CSF; by chance: the Dice of
a random dark set of that size (the CSF share). Atlas columns: the same order and d in the cores
(probability > {ATLAS_CORE_PROBABILITY:g} over 3 x 3 voxels) of the MNI152 tissue maps registered affinely to the
CT, which do not depend on the CT separating grey from white by HU; CT d grey-white in atlas: the
contrast the input itself carried there (1.7-1.9 on the head CT study, 0.5 on Cranium)."""
BANDING_DEFINITIONS = """Banding (no ground truth): for adjacent output slices, inside the brain of both, the
|difference of their brain means| (brightness) and the mean absolute voxel difference (voxel),
averaged over acquired/generated pairs and divided by the same over generated/generated pairs:
1 means a boundary slice steps no more than any other, above 1 stripes. Undefined (-) without
two generated slices in a row (e.g. sparsity 2 at the source's spacing)."""
DEFINITIONS = """Definitions (lib/metrics.py, lib/evaluation/score.py): the ground truth is brought to [0, 1]
by its 0.5/99.5 brain percentiles, the reconstruction is already there; every metric is taken
inside the ground truth's brain mask on the reconstructed slices. NRMSE = RMSE / range of the
ground truth; PSNR = 10 log10(1 / MSE); SSIM = mean 2-D SSIM over slices (Gaussian window,
sigma 1.5); I-SSIM = mean SSIM between adjacent slices of the reconstruction (continuity; the
ground truth's own is given for scale). Each cell is the mean +- standard deviation over seeds
of the mean over subjects; seeds move the sparsity phase (slice seed mod k is the first one
kept) and the sampler seed."""


def group_columns(metrics: pd.DataFrame) -> list[str]:
    """What a table row is: sparsity and method, and the variant (ablation) when there are several."""
    return (["variant"] if metrics["variant"].nunique() > 1 else []) + ["sparsity", "method"]


def summary_table(metrics: pd.DataFrame, columns=TABLE_METRICS) -> pd.DataFrame:
    """Mean +- std over seeds of the per-seed subject means, per sparsity and method (strings)."""
    available = [
        (name, label, digits) for name, label, digits in columns if name in metrics and metrics[name].notna().any()
    ]
    groups = group_columns(metrics)
    per_seed = metrics.groupby([*groups, "seed"], sort=False)[[name for name, _, _ in available]].mean()
    grouped = per_seed.groupby(level=groups, sort=False)
    means, stds = grouped.mean(), grouped.std(ddof=0)
    table = pd.DataFrame(index=means.index)
    for name, label, digits in available:
        # A group whose runs all lack the metric (e.g. banding without two gap slices in a row): "-".
        table[label] = [
            "-" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(means[name], stds[name])
        ]
    return table.reset_index()


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    return header + "".join(
        "| " + " | ".join(str(value) for value in row) + " |\n" for row in table.itertuples(index=False)
    )


def is_report_folder(folder: Path) -> bool:
    """True for a report folder :func:`write_report` wrote and nothing else."""
    entries = {entry.name: entry for entry in folder.iterdir()}
    return (
        (folder / "metrics.csv").is_file()
        and (folder / "report.md").is_file()
        and set(entries) <= {"metrics.csv", "report.md", "figures"}
        and all(not entry.is_symlink() for entry in entries.values())
        and all(f.is_file() and f.suffix == ".png" and not f.is_symlink() for f in (folder / "figures").glob("*"))
    )


def check_report_folder(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse a report folder that :func:`write_report` could not replace safely, before the
    evaluation runs: it must be new, empty or an earlier report (a report replaces the whole
    folder, and a file ReBrain did not write is never deleted); it is tried for writing.

    Raises:
        FileExistsError: a file, a link, or a folder holding anything else.
        OSError: the folder cannot be created or written.
    """
    return check_replaceable_folder(
        out_dir, is_report_folder, "an earlier ReBrain report (metrics.csv, report.md, figures/)"
    )


def write_report(out_dir: str | os.PathLike[str], result: EvaluationResult, header: dict[str, str]) -> Path:
    """Write ``metrics.csv``, ``report.md`` and ``figures/*.png`` into ``out_dir`` atomically
    (refused as :func:`check_report_folder` says).

    Args:
        out_dir: the report folder.
        result: from :func:`lib.evaluation.harness.evaluate_subjects`.
        header: lines for the report's heading (preset, command, data), in order.
    """
    check_report_folder(out_dir)
    metrics = pd.DataFrame(result.rows).reindex(columns=METRIC_COLUMNS)
    with atomic_directory(out_dir) as staging:
        metrics.to_csv(staging / "metrics.csv", index=False, float_format="%.6g")
        figures = staging / "figures"
        figures.mkdir()
        lines = ["# ReBrain evaluation", ""] + [f"- {key}: {value}" for key, value in header.items()] + [""]
        lines += [
            f"{len(metrics)} runs: {metrics['subject'].nunique()} subject(s) "
            f"({', '.join(sorted(metrics['split'].unique()))}), "
            f"methods {', '.join(metrics['method'].unique())}, sparsity "
            f"{sorted(metrics['sparsity'].unique())}, seeds {sorted(metrics['seed'].unique())}.",
            "",
        ]
        lines += ["## Results", "", _markdown(summary_table(metrics)), DEFINITIONS, ""]
        coverage = metrics.groupby("subject", sort=False)["input_coverage"].first()
        low = coverage[coverage < LOW_INPUT_COVERAGE]
        if not low.empty:
            lines += [
                "**Warning:** the input has signal over only "
                + ", ".join(f"{value:.0%} ({key})" for key, value in low.items())
                + f" of the ground truth's brain (under {LOW_INPUT_COVERAGE:.0%}): there every method outputs "
                "background where the truth has tissue, so these subjects' scores measure the missing input, "
                "not the method. They are included in the means above; see metrics.csv per subject.",
                "",
            ]
        if metrics["psnr_gap"].notna().any():
            lines += [
                "### Gap and acquired slices apart",
                "",
                _markdown(summary_table(metrics, PART_METRICS)),
                "The same brain-masked metrics on the generated (gap) slices only, where the gap filling "
                "is tested, and on the acquired slices only.",
                "",
            ]
        lines += _check_sections(metrics)
        if metrics["issim_reference"].notna().any():
            lines += [f"Ground truth I-SSIM (mean over runs): {metrics['issim_reference'].mean():.3f}.", ""]
        rates = (
            metrics.groupby(group_columns(metrics), sort=False)[["retrieval_success_rate", "fallback_rate", "seconds"]]
            .mean()
            .reset_index()
        )
        rates = rates.map(
            lambda v: "-" if isinstance(v, float) and np.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else v)
        )
        kb_note = (
            (
                " Variants: `preset` is the shipped setting; `kb=F` keeps a share F of the knowledge base's "
                "subjects (METHOD.md Table 5), "
                "`bbdm=NAME` uses another BBDM without ControlNet (Table 2), `encoder=NAME` another retrieval "
                "encoder (Table 3)."
            )
            if "variant" in rates
            else ""
        )
        lines += [
            "## Retrieval and time",
            "",
            "Mean over runs: share of generated slices whose retrieval passed tau, share that fell back to the SLERP "
            "control, seconds per volume." + kb_note,
            "",
            _markdown(rates),
        ]
        lines += ["## Figures", ""] + [f"![{name}](figures/{name}.png)" for name in _figures(figures, result)] + [""]
        (staging / "report.md").write_text("\n".join(lines))
    return Path(out_dir)


def _check_sections(metrics: pd.DataFrame) -> list[str]:
    """The report's lines on the checks without ground truth; none when no run has them."""
    # order_holds is True/False/None per run; as 1/0/NaN its mean is the share of runs.
    numeric = metrics.assign(
        **{
            name: metrics[name].map({True: 1.0, False: 0.0}).astype(float)
            for name in ("tissue_order", "atlas_order")
            if name in metrics
        }
    )
    lines: list[str] = []
    for title, columns, definitions in (
        ("Tissue consistency with the input CT", TISSUE_METRICS, TISSUE_DEFINITIONS),
        ("Banding at acquired/generated slices", BANDING_METRICS, BANDING_DEFINITIONS),
    ):
        if any(numeric[name].notna().any() for name, _, _ in columns):
            lines += [f"### {title}", "", _markdown(summary_table(numeric, columns)), definitions, ""]
    return lines


def _figures(folder: Path, result: EvaluationResult) -> list[str]:
    """The figures of the first subject; returns their names."""
    names = []
    if not result.example:
        return names
    first = next(iter(result.example.values()))
    spacing = first.grid.voxel_spacing
    acquired = np.asarray(first.grid.acquired, dtype=bool)
    if result.slice_psnr:
        plot_slice_psnr(folder / "slice_psnr.png", result.slice_psnr, acquired, title="PSNR per slice (first subject)")
        names.append("slice_psnr")
    retrieval = next((r for method, r in result.example.items() if method == "rebrain"), None) or first
    plot_similarity_histogram(
        folder / "similarity.png",
        retrieval.similarities,
        float(retrieval.summary.tau),
        title="retrieval similarity (first subject)",
    )
    names.append("similarity")
    volumes = (
        {"ground truth": result.example_truth * result.example_mask}
        if result.example_truth is not None
        else {"input (SLERP-filled)": _unit(first.ct)}
    )
    volumes.update({method: reconstruction.mri for method, reconstruction in result.example.items()})
    plot_montage(folder / "montage.png", volumes, spacing, title="SYNTHETIC reconstructions (first subject)")
    names.append("montage")
    if result.uncertainty is not None and result.example_truth is not None:
        error = np.abs(result.uncertainty.mri - result.example_truth) * result.example_mask
        plot_uncertainty_and_error(
            folder / "uncertainty.png",
            result.uncertainty.uncertainty,
            error,
            result.example_mask,
            spacing,
            title=f"rebrain, {result.uncertainty.summary.samples} samples",
        )
        names.append("uncertainty")
    return names


def _unit(volume: np.ndarray) -> np.ndarray:
    """A display scaling of an input without ground truth: its 1st-99th percentiles to [0, 1]."""
    low, high = np.percentile(volume, [1, 99])
    return np.clip((volume - low) / max(high - low, 1e-6), 0.0, 1.0)
