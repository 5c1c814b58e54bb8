"""``python main.py batch``: every CT series under a folder tree to a synthetic MRI series.

nnU-Net-style batch semantics: one output folder per series, written under a staging name and
renamed when complete (:func:`lib.io.atomic.atomic_directory`), so a folder under its final
name is always complete; ``--resume`` skips those and redoes anything half-written. One
failing series is recorded and the others go on; the manifest (CSV and JSON, rewritten
atomically after every series) says what happened to each, and the exit code is 1 when any
series failed. The input tree is only read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lib.data.sparse import simulate_sparse_volume
from lib.io import VolumeReadError
from lib.io.atomic import STAGING_PREFIX, atomic_directory, atomic_path
from lib.io.dicom import DicomSeries, check_consistent, is_axial, read_series, scan_dicom_folder, why_unusable
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from lib.report.dicom_output import write_synthetic_mri_series
from lib.report.outputs import DICOM_FOLDER, OUTPUT_FILES, input_geometry, positions_source, write_outputs

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("series_uid", "status", "seconds", "slices", "retrieval_success_rate", "fallback_count", "positions", "output", "pushed", "message")


@dataclass
class SeriesOutcome:
    """One row of the manifest."""

    series_uid: str
    status: str  # done, complete (resumed: already done), skipped (not an input), failed
    seconds: float = 0.0
    slices: int | None = None
    retrieval_success_rate: float | None = None
    fallback_count: int | None = None
    positions: str = ""  # where the slices' normalised positions came from (template or brain extent)
    output: str = ""
    pushed: bool | None = None
    message: str = ""


@dataclass
class BatchPlan:
    """What a run will do: the series to reconstruct and everything it skips, with reasons."""

    series: list[DicomSeries]
    skipped: list[SeriesOutcome] = field(default_factory=list)


def plan_batch(input_root: Path, modality: str) -> BatchPlan:
    """Scan ``input_root`` recursively and sort its series into inputs and skipped ones.

    Skipped: series of another modality, localizers, single images, multi-planar reformats and
    other stacks that are not parallel axial slices (by SeriesInstanceUID), and unreadable or
    non-image files (by path).
    """
    scan = scan_dicom_folder(input_root)
    plan = BatchPlan(series=[])
    for uid, series in sorted(scan.series.items()):
        reason = why_unusable(series, modality) or stack_problem(series)
        if reason:
            plan.skipped.append(SeriesOutcome(series_uid=uid, status="skipped", message=f"{series.describe()}: {reason}"))
        else:
            plan.series.append(series)
    for path, reason in sorted(scan.skipped_files.items()):
        plan.skipped.append(SeriesOutcome(series_uid="", status="skipped", message=f"{Path(path).relative_to(input_root)}: {reason}"))
    return plan


def stack_problem(series: DicomSeries) -> str | None:
    """Why a series is not one axial stack of parallel slices (e.g. a multi-planar reformat), or None."""
    try:
        check_consistent(series)
    except VolumeReadError as error:
        return f"not one stack of parallel slices ({error.reason})"
    if not is_axial(series):
        return "not axial (a coronal or sagittal stack); ReBrain reconstructs axial slices"
    return None


def is_complete(folder: Path) -> bool:
    """True when a series' output folder holds every output (final name means atomically complete)."""
    if not all((folder / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        slices = len(json.loads((folder / "provenance.json").read_text())["slices"])
    except (OSError, ValueError, KeyError):
        return False
    return len(list((folder / DICOM_FOLDER).glob("*.dcm"))) == slices


def remove_half_written(output_root: Path) -> list[Path]:
    """Delete staging folders a killed run left behind; returns them."""
    leftovers = [path for path in output_root.glob(f"{STAGING_PREFIX}*") if path.is_dir()]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def write_manifest(output_root: Path, outcomes: list[SeriesOutcome]) -> None:
    """manifest.json and manifest.csv, each written atomically."""
    rows = [asdict(outcome) for outcome in outcomes]
    with atomic_path(output_root / "manifest.json") as temporary:
        temporary.write_text(json.dumps({"series": rows, "failed": sum(r["status"] == "failed" for r in rows)}, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(output_root / "manifest.csv") as temporary:
        temporary.write_text(buffer.getvalue())


def push_series(folder: Path, url: str) -> None:
    """Send every DICOM file of ``folder`` to a DICOMweb server with STOW-RS.

    Raises:
        RuntimeError: the server refused or could not be reached (with its reason).
    """
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(str(path)) for path in sorted(folder.glob("*.dcm"))]
    try:
        DICOMwebClient(url=url).store_instances(datasets)
    except Exception as error:  # requests and dicomweb-client raise several types
        raise RuntimeError(f"STOW-RS to {url} failed: {type(error).__name__}: {error}") from None


def reconstruct_series(series: DicomSeries, output_root: Path, pipeline: ReBrainPipeline, options: ReconstructionOptions, sparsity: int | None) -> SeriesOutcome:
    """Reconstruct one series into ``output_root/<SeriesInstanceUID>`` (atomically)."""
    started = time.perf_counter()
    volume = read_series(series, series.files[0].parent)
    if sparsity:
        volume = simulate_sparse_volume(volume, factor=sparsity)
    reconstruction = pipeline.reconstruct(volume, options)
    out = output_root / series.uid
    with atomic_directory(out) as staging:
        write_outputs(staging, reconstruction, input_geometry(volume, sparsity))
        write_synthetic_mri_series(reconstruction, volume, staging / DICOM_FOLDER, series.first)
    summary = reconstruction.summary
    return SeriesOutcome(
        series_uid=series.uid, status="done", seconds=round(time.perf_counter() - started, 2), slices=summary["slices"],
        retrieval_success_rate=summary["retrieval_success_rate"], fallback_count=summary["fallback_count"], positions=positions_source(summary),
        output=str(out.relative_to(output_root)),
    )


def run_batch(
    input_root: Path, output_root: Path, pipeline: ReBrainPipeline, options: ReconstructionOptions, resume: bool = False,
    push_url: str | None = None, sparsity: int | None = None, progress: bool = True,
) -> list[SeriesOutcome]:
    """Process every input series; returns the manifest rows (also written to ``output_root``).

    Raises:
        VolumeReadError: ``input_root`` is missing, empty, or ``output_root`` lies inside it.
    """
    from tqdm import tqdm

    input_root, output_root = Path(input_root).resolve(), Path(output_root).resolve()
    if output_root == input_root or input_root in output_root.parents:
        raise VolumeReadError(output_root, "the output folder must not lie inside the input tree (the input is never modified)")
    plan = plan_batch(input_root, pipeline.preset.input_modality)
    output_root.mkdir(parents=True, exist_ok=True)
    for leftover in remove_half_written(output_root):
        logger.warning("removed half-written output %s", leftover.name)
    outcomes: list[SeriesOutcome] = list(plan.skipped)
    write_manifest(output_root, outcomes)
    for series in tqdm(plan.series, desc="series", unit="series", disable=not progress):
        if resume and is_complete(output_root / series.uid):
            summary = json.loads((output_root / series.uid / "provenance.json").read_text())["summary"]
            outcomes.append(SeriesOutcome(
                series_uid=series.uid, status="complete", slices=summary["slices"], retrieval_success_rate=summary["retrieval_success_rate"],
                fallback_count=summary["fallback_count"], positions=positions_source(summary), output=series.uid, message="already complete (resume)",
            ))
        else:
            try:
                outcome = reconstruct_series(series, output_root, pipeline, options, sparsity)
            except Exception as error:  # one series' failure is recorded; the others go on
                logger.warning("series %s failed: %s", series.uid, error)
                message = str(error) if isinstance(error, (VolumeReadError, ValueError)) else f"{type(error).__name__}: {error}"
                outcome = SeriesOutcome(series_uid=series.uid, status="failed", message=message)
            if push_url and outcome.status == "done":
                try:
                    push_series(output_root / series.uid / DICOM_FOLDER, push_url)
                    outcome.pushed = True
                except RuntimeError as error:
                    outcome.pushed, outcome.status, outcome.message = False, "failed", str(error)
            outcomes.append(outcome)
        write_manifest(output_root, outcomes)
    return outcomes
