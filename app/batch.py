"""``python main.py batch``: every CT series under a folder tree to a synthetic MRI series.

nnU-Net-style batch semantics: one output folder per series, written under a staging name and
renamed when complete (:func:`lib.io.atomic.atomic_directory`), so a folder under its final
name is always complete; ``--resume`` skips those and redoes anything half-written. One
failing series is recorded and the others go on; the manifest (CSV and JSON, rewritten
atomically after every series) says what happened to each, and the exit code is 1 when any
series failed. The input tree is only read.

A SeriesInstanceUID comes from the input and may be anything (``../victim``, an absolute
path), so output folders are named by :func:`output_folder` and always lie directly inside the
output root; an existing folder is replaced only when it is ReBrain's own output. The manifest
names inputs by UID or by their path relative to the input root: an absolute path, or a
series' free-text description, may hold a patient's name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from lib.consistency import CHECK_COLUMNS, check_columns
from lib.data.sparse import simulate_sparse_volume
from lib.io import VolumeReadError
from lib.io.atomic import STAGING_PREFIX, atomic_directory, atomic_path
from lib.io.dicom import (
    VALID_UID,
    DicomSeries,
    NotOneStackError,
    check_consistent,
    is_axial,
    read_series,
    scan_dicom_folder,
    why_unusable,
)
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from lib.reconstruction import Summary
from lib.report.dicom_output import write_synthetic_mri_series
from lib.report.outputs import (
    DICOM_FOLDER,
    OUTPUT_FILES,
    input_geometry,
    is_rebrain_output,
    positions_source,
    write_outputs,
)

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = (
    "series_uid",
    "status",
    "seconds",
    "slices",
    "retrieval_success_rate",
    "fallback_count",
    "positions",
    # The checks without ground truth (lib/consistency.py): tissue consistency and banding.
    *CHECK_COLUMNS,
    "output",
    "pushed",
    "message",
)
# The header batch wrote before the check columns: an output root it made is still its own.
EARLIER_MANIFEST_FIELDS = tuple(name for name in MANIFEST_FIELDS if name not in CHECK_COLUMNS)
# What atomic_directory names its staging folders: STAGING_PREFIX, 8 hex digits, a dash.
STAGING_NAME = re.compile(rf"{re.escape(STAGING_PREFIX)}[0-9a-f]{{8}}-.+")


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
    checks: dict = field(default_factory=dict)  # CHECK_COLUMNS (lib.consistency.check_columns)

    def row(self) -> dict:
        """The manifest row: :data:`MANIFEST_FIELDS`, the checks among them (None where not measured)."""
        values = {**asdict(self), **self.checks}
        return {name: values.get(name) for name in MANIFEST_FIELDS}


@dataclass
class BatchPlan:
    """What a run will do: the series to reconstruct and everything it skips, with reasons."""

    series: list[DicomSeries]
    skipped: list[SeriesOutcome] = field(default_factory=list)


def plan_batch(input_root: Path, modality: str) -> BatchPlan:
    """Scan ``input_root`` recursively and sort its series into inputs and skipped ones.

    Skipped: series of another modality, localizers, single images, multi-planar reformats and
    other stacks that are not parallel axial slices (by SeriesInstanceUID), and files that are
    not images or cannot be read and belong to no series (by path relative to ``input_root``).
    """
    scan = scan_dicom_folder(input_root)
    plan = BatchPlan(series=[])
    for uid, series in sorted(scan.series.items()):
        reason = why_unusable(series, modality) or stack_problem(series)
        if reason:
            plan.skipped.append(
                SeriesOutcome(
                    series_uid=uid, status="skipped", message=without_root(f"{series.describe()}: {reason}", input_root)
                )
            )
        else:
            plan.series.append(series)
    for path, reason in sorted(scan.skipped_files.items()):
        plan.skipped.append(
            SeriesOutcome(series_uid="", status="skipped", message=without_root(f"{path}: {reason}", input_root))
        )
    return plan


def stack_problem(series: DicomSeries) -> str | None:
    """Why a series is not one axial stack of parallel slices (e.g. a multi-planar reformat), or None.

    A series with a damaged or implausible header is not skipped here: reading it fails, and the
    manifest records that failure with the file at fault.
    """
    try:
        check_consistent(series)
    except NotOneStackError as error:
        return f"not one stack of parallel slices ({error})"
    except VolumeReadError:
        return None
    if not is_axial(series):
        return "not axial (a coronal or sagittal stack); ReBrain reconstructs axial slices"
    return None


def without_root(message: str, input_root: Path) -> str:
    """``message`` with the input files' paths made relative to ``input_root``: the absolute path
    may name the patient (a folder per patient), the relative one says which file it was."""
    return message.replace(f"{input_root}{os.sep}", "").replace(str(input_root), ".")


def failure_message(error: Exception, input_root: Path) -> str:
    """The manifest message of a failed series: the reason (and the file) without ``input_root``."""
    message = (
        str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    )  # VolumeReadError is a ValueError
    return without_root(message, input_root)


def output_folder(output_root: Path, uid: str) -> Path:
    """The output folder of series ``uid``: named by the UID when it is a valid DICOM UID (digits
    and dots, at most 64 characters), otherwise ``series-<first 16 hex digits of its SHA-256>``;
    either way a plain name directly inside ``output_root``."""
    name = (
        uid
        if len(uid) <= 64 and VALID_UID.fullmatch(uid)
        else f"series-{hashlib.sha256(uid.encode()).hexdigest()[:16]}"
    )
    return output_root / name


def check_replaceable(folder: Path) -> None:
    """Refuse to write ``folder`` unless it is new or ReBrain's own output.

    Its name (see :func:`output_folder`) cannot leave the output root; a link could, so a link
    is refused too.

    Raises:
        FileExistsError: ``folder`` is a link, or holds anything ReBrain did not write.
    """
    if folder.is_symlink():
        raise FileExistsError(f"output folder {folder.name} is a link; nothing is written through it")
    if folder.exists() and not is_rebrain_output(folder):
        raise FileExistsError(
            f"output folder {folder.name} exists and was not written by ReBrain; it is left untouched"
        )


def is_complete(folder: Path) -> bool:
    """True when a series' output folder is ReBrain's and holds every output (final name means atomically complete)."""
    if not is_rebrain_output(folder) or not all((folder / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        slices = len(json.loads((folder / "provenance.json").read_text())["slices"])
    except (OSError, ValueError, KeyError):
        return False
    return len(list((folder / DICOM_FOLDER).glob("*.dcm"))) == slices


def remove_half_written(output_root: Path) -> list[Path]:
    """Delete staging folders a killed run left behind (named as atomic_directory names them); returns them."""
    leftovers = [
        path
        for path in output_root.iterdir()
        if STAGING_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
    ]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


MANIFEST_FILES = ("manifest.json", "manifest.csv")


def is_own_manifest(path: Path) -> bool:
    """True when ``path`` is a manifest batch wrote (its JSON keys, or its CSV header row)."""
    try:
        if path.suffix == ".json":
            return set(json.loads(path.read_text())) == {"series", "failed"}
        return path.read_text().splitlines()[0] in (",".join(MANIFEST_FIELDS), ",".join(EARLIER_MANIFEST_FIELDS))
    except (OSError, ValueError, IndexError, TypeError):
        return False


def check_manifests(output_root: Path) -> None:
    """Refuse an output root whose manifest files batch did not write (they would be replaced).

    Raises:
        VolumeReadError: naming the file.
    """
    for name in MANIFEST_FILES:
        path = output_root / name
        if path.is_symlink() or (path.exists() and not is_own_manifest(path)):
            raise VolumeReadError(
                path, "exists and was not written by ReBrain batch; it is left untouched (choose another OUTPUT_ROOT)"
            )


def write_manifest(output_root: Path, outcomes: list[SeriesOutcome]) -> None:
    """manifest.json and manifest.csv, each written atomically."""
    rows = [outcome.row() for outcome in outcomes]
    with atomic_path(output_root / "manifest.json") as temporary:
        temporary.write_text(
            json.dumps({"series": rows, "failed": sum(r["status"] == "failed" for r in rows)}, indent=1)
        )
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


def reconstruct_series(
    series: DicomSeries, out: Path, pipeline: ReBrainPipeline, options: ReconstructionOptions, sparsity: int | None
) -> SeriesOutcome:
    """Reconstruct one series into the folder ``out`` (atomically; see :func:`check_replaceable`)."""
    started = time.perf_counter()
    check_replaceable(out)
    volume = read_series(series, series.files[0].parent)
    if sparsity:
        volume = simulate_sparse_volume(volume, factor=sparsity)
    reconstruction = pipeline.reconstruct(volume, options)
    with atomic_directory(out) as staging:
        write_outputs(staging, reconstruction, input_geometry(volume, sparsity))
        write_synthetic_mri_series(reconstruction, volume, staging / DICOM_FOLDER, series.first)
    summary = reconstruction.summary
    return SeriesOutcome(
        series_uid=series.uid,
        status="done",
        seconds=round(time.perf_counter() - started, 2),
        slices=summary.slices,
        retrieval_success_rate=summary.retrieval_success_rate,
        fallback_count=summary.fallback_count,
        positions=positions_source(summary),
        output=out.name,
        checks=check_columns(summary.tissue_check, summary.banding),
    )


@dataclass(frozen=True)
class SeriesJob:
    """One series to reconstruct and its output folder: what an engine's worker is given."""

    series: DicomSeries
    out: Path


def attempt_series(
    job: SeriesJob,
    pipeline: ReBrainPipeline,
    options: ReconstructionOptions,
    sparsity: int | None,
    input_root: Path,
) -> SeriesOutcome:
    """:func:`reconstruct_series`, with a failure recorded as a failed outcome (the others go on)."""
    try:
        return reconstruct_series(job.series, job.out, pipeline, options, sparsity)
    except Exception as error:  # one series' failure is recorded; the others go on
        message = failure_message(error, input_root)
        logger.warning("series %s failed: %s", job.series.uid, message)
        return SeriesOutcome(series_uid=job.series.uid, status="failed", message=message)


class SeriesRunner(Protocol):
    """An engine: reconstructs jobs and yields one outcome per job as each finishes."""

    def run(self, jobs: Sequence[SeriesJob]) -> Iterator[SeriesOutcome]:
        """Each job's outcome (done or failed), in the order they finish."""
        ...


@dataclass
class LocalRunner:
    """The default engine: the series one after another, in this process, with one loaded pipeline."""

    pipeline: ReBrainPipeline
    options: ReconstructionOptions
    sparsity: int | None
    input_root: Path

    def run(self, jobs: Sequence[SeriesJob]) -> Iterator[SeriesOutcome]:
        """Each job's outcome, in order."""
        for job in jobs:
            yield attempt_series(job, self.pipeline, self.options, self.sparsity, self.input_root)


def resumed_outcome(series: DicomSeries, out: Path) -> SeriesOutcome:
    """The manifest row of a series whose complete output ``out`` a previous run wrote."""
    summary = Summary.from_dict(json.loads((out / "provenance.json").read_text())["summary"])
    return SeriesOutcome(
        series_uid=series.uid,
        status="complete",
        slices=summary.slices,
        retrieval_success_rate=summary.retrieval_success_rate,
        fallback_count=summary.fallback_count,
        positions=positions_source(summary),
        output=out.name,
        message="already complete (resume)",
        checks=check_columns(summary.tissue_check, summary.banding),
    )


def run_batch(
    input_root: Path,
    output_root: Path,
    pipeline: ReBrainPipeline,
    options: ReconstructionOptions,
    resume: bool = False,
    push_url: str | None = None,
    sparsity: int | None = None,
    progress: bool = True,
) -> list[SeriesOutcome]:
    """Process every input series in this process (the local engine); see :func:`run_batch_with`."""
    runner = LocalRunner(pipeline, options, sparsity, Path(input_root).resolve())
    return run_batch_with(
        input_root, output_root, runner, pipeline.preset.input_modality, resume, push_url, progress=progress
    )


def run_batch_with(
    input_root: Path,
    output_root: Path,
    runner: SeriesRunner,
    modality: str,
    resume: bool = False,
    push_url: str | None = None,
    progress: bool = True,
) -> list[SeriesOutcome]:
    """Process every input series with an engine; returns the manifest rows (also written to ``output_root``).

    The driver's part, the same for every engine: the scan and the series selection, resume
    (complete outputs are not redone, half-written ones removed), the manifest rewritten as
    each outcome arrives, the DICOMweb push and the progress bar over series.

    Args:
        modality: the preset's input modality (series of others are skipped).

    Raises:
        VolumeReadError: ``input_root`` is missing, empty, or ``output_root`` lies inside it or
            holds manifest files batch did not write.
    """
    from tqdm import tqdm

    input_root, output_root = Path(input_root).resolve(), Path(output_root).resolve()
    if output_root == input_root or input_root in output_root.parents:
        raise VolumeReadError(
            output_root, "the output folder must not lie inside the input tree (the input is never modified)"
        )
    check_manifests(output_root)
    plan = plan_batch(input_root, modality)
    output_root.mkdir(parents=True, exist_ok=True)
    for leftover in remove_half_written(output_root):
        logger.warning("removed half-written output %s", leftover.name)
    outcomes: list[SeriesOutcome] = list(plan.skipped)
    write_manifest(output_root, outcomes)
    jobs = []
    with tqdm(total=len(plan.series), desc="series", unit="series", disable=not progress) as bar:
        for series in plan.series:
            out = output_folder(output_root, series.uid)
            if resume and is_complete(out):
                outcomes.append(resumed_outcome(series, out))
                write_manifest(output_root, outcomes)
                bar.update()
            else:
                jobs.append(SeriesJob(series, out))
        for outcome in runner.run(jobs):
            if push_url and outcome.status == "done":
                try:
                    push_series(output_root / outcome.output / DICOM_FOLDER, push_url)
                    outcome.pushed = True
                except RuntimeError as error:
                    outcome.pushed, outcome.status, outcome.message = False, "failed", str(error)
            outcomes.append(outcome)
            write_manifest(output_root, outcomes)
            bar.update()
    return outcomes
