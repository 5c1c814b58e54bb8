"""DICOM series folders into the canonical frame: series choice, HU, slice order by position.

A folder as a scanner or PACS writes it holds several series (thin and thick axial,
reformats, a localizer), sometimes non-image objects and unreadable files, and file names
carry no order. :func:`scan_dicom_folder` groups what is readable by SeriesInstanceUID;
:func:`read_dicom_series` picks the CT (or MR) series (or the one asked for), orders slices by
ImagePositionPatient along the slice normal, converts to HU with RescaleSlope/Intercept,
and records which series it skipped and why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixel_data_handlers.util import apply_modality_lut

from lib.io.errors import VolumeReadError
from lib.io.nifti import check_finite_3d
from lib.io.volume import POSITION_TOLERANCE_MM, Volume, volume_from_slices

logger = logging.getLogger(__name__)

# DICOM patient axes are LPS; our world frame is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4
# A series whose normal is further than this from the patient's S axis is not axial.
AXIAL_MAX_ANGLE_DEG = 45.0


@dataclass
class DicomSeries:
    """The readable image files of one series (headers only, pixels not yet loaded)."""

    uid: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        """The header of the first file."""
        return self.headers[0]

    @property
    def modality(self) -> str:
        """The series' Modality tag."""
        return str(self.first.get("Modality", ""))

    @property
    def image_type(self) -> list[str]:
        """The ImageType values, upper case."""
        return [str(value).upper() for value in self.first.get("ImageType", [])]

    def describe(self) -> str:
        """A one-line human description of the series."""
        image_type = "\\".join(self.image_type) or "-"
        return (
            f"series {self.uid} ({self.modality or 'no modality'}, {len(self.files)} images, "
            f"ImageType {image_type}, "
            f"'{self.first.get('SeriesDescription', '')}')"
        )


@dataclass
class DicomFolderScan:
    """What a folder holds: image series, and the files that are not usable images."""

    folder: Path
    series: dict[str, DicomSeries]
    skipped_files: dict[str, str]


def _is_image(header: Dataset) -> bool:
    """True for an object with pixels placed in patient space (not SR, RT plans, ...)."""
    return all(tag in header for tag in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"))


def scan_dicom_folder(folder: str | os.PathLike[str]) -> DicomFolderScan:
    """Read the headers of every file under ``folder`` (recursively) and group them by series.

    Unreadable files and non-image objects are listed in ``skipped_files`` with the reason.

    Raises:
        VolumeReadError: if the folder is missing or holds no file at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeReadError(folder, "no such folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    if not files:
        raise VolumeReadError(folder, "empty folder: no files to read")
    series: dict[str, DicomSeries] = {}
    skipped: dict[str, str] = {}
    for path in files:
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as error:
            skipped[str(path)] = f"not a readable DICOM file ({type(error).__name__}: {error})"
            continue
        if not _is_image(header):
            skipped[str(path)] = f"not an image ({header.get('SOPClassUID', 'unknown SOP class')!s})"
            continue
        uid = str(header.get("SeriesInstanceUID", "no-series-uid"))
        entry = series.setdefault(uid, DicomSeries(uid=uid))
        entry.files.append(path)
        entry.headers.append(header)
    return DicomFolderScan(folder=folder, series=series, skipped_files=skipped)


def _normal_lps(header: Dataset) -> np.ndarray:
    orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def is_axial(series: DicomSeries) -> bool:
    """True when the slices' normal is within 45 degrees of the patient's S axis."""
    normal = _normal_lps(series.first)
    return abs(normal[2]) >= np.cos(np.deg2rad(AXIAL_MAX_ANGLE_DEG))


def why_unusable(series: DicomSeries, modality: str) -> str | None:
    """The reason a series is not a usable volume of ``modality`` (CT, MR), or None when it is."""
    if series.modality != modality:
        return f"modality {series.modality or 'missing'}, not {modality}"
    if "LOCALIZER" in series.image_type:
        return "a localizer (scout) image"
    if len(series.files) < 2:
        return "a single image, not a volume"
    return None


def choose_series(scan: DicomFolderScan, series_uid: str | None = None, modality: str = "CT") -> tuple[DicomSeries, dict[str, str]]:
    """Pick the series to read and say why every other one was skipped.

    Without ``series_uid`` the choice is among ``modality`` (DICOM Modality: CT, MR) series
    that are not localizers: original acquisitions before derived reformats, axial before
    other planes, then the most images (the thinnest slices of the study).

    Returns:
        The chosen series and ``{uid: reason}`` for the others.

    Raises:
        VolumeReadError: no usable series, or ``series_uid`` not in the folder.
    """
    if not scan.series:
        reasons = "; ".join(f"{Path(k).name}: {v}" for k, v in list(scan.skipped_files.items())[:5])
        raise VolumeReadError(scan.folder, f"no readable DICOM image in the folder ({reasons})")
    if series_uid is not None:
        if series_uid not in scan.series:
            raise VolumeReadError(
                scan.folder, f"no series with SeriesInstanceUID {series_uid}; found {sorted(scan.series)}"
            )
        chosen = scan.series[series_uid]
        return chosen, {uid: "not the requested series" for uid in scan.series if uid != series_uid}

    skipped: dict[str, str] = {}
    candidates = []
    for uid, series in scan.series.items():
        reason = why_unusable(series, modality)
        if reason:
            skipped[uid] = reason
        else:
            candidates.append(series)
    if not candidates:
        details = "; ".join(f"{scan.series[uid].describe()}: {reason}" for uid, reason in skipped.items())
        raise VolumeReadError(scan.folder, f"no {modality} image series in the folder ({details})")

    def preference(series: DicomSeries) -> tuple[bool, bool, int]:
        return ("ORIGINAL" in series.image_type, is_axial(series), len(series.files))

    candidates.sort(key=preference, reverse=True)
    chosen = candidates[0]
    for other in candidates[1:]:
        skipped[other.uid] = f"another {modality} series was preferred ({chosen.describe()})"
    return chosen, skipped


def check_consistent(series: DicomSeries) -> None:
    """Refuse series whose images do not form one stack of parallel slices."""
    first = series.first
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    for path, header in zip(series.files, series.headers):
        if not np.allclose(np.asarray(header.ImageOrientationPatient, dtype=np.float64), orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeReadError(path, f"mixed orientations in {series.describe()}: slices are not parallel")
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise VolumeReadError(path, f"image size {header.Rows}x{header.Columns} differs from {first.Rows}x{first.Columns} in the same series")
        if not np.allclose(np.asarray(header.PixelSpacing, dtype=float), np.asarray(first.PixelSpacing, dtype=float), atol=1e-4):
            raise VolumeReadError(path, "pixel spacing differs between slices of the same series")


def _read_pixels(path: Path) -> np.ndarray:
    """The modality-LUT-applied pixels of one file (HU for CT)."""
    try:
        dataset = pydicom.dcmread(str(path))
        pixels = dataset.pixel_array
        values = apply_modality_lut(pixels, dataset)
    except Exception as error:  # pixel decoding raises many types for truncated or odd data
        raise VolumeReadError(path, f"cannot decode the pixel data ({type(error).__name__}: {error})") from error
    if values.ndim != 2:
        raise VolumeReadError(path, f"a multi-frame or colour image of shape {values.shape}; single-frame greyscale slices are needed")
    return values.astype(np.float32)


def read_dicom_series(folder: str | os.PathLike[str], series_uid: str | None = None, modality: str = "CT") -> Volume:
    """Read one series of a DICOM folder into a canonical :class:`Volume`.

    Args:
        folder: a folder with the series' files (any names, any depth, other series allowed).
        series_uid: SeriesInstanceUID to read; by default the best series of ``modality``
            (CT or MR; see :func:`choose_series`).
        modality: the DICOM Modality to look for when no ``series_uid`` is given.

    Returns:
        The volume in HU (for CT); ``meta`` holds ``series_uid``, ``skipped_series``
        (uid -> reason), ``skipped_files`` (path -> reason), ``gantry_tilt_deg``,
        ``slice_thickness`` and ``reference_header`` (the first slice's header, no pixels).

    Raises:
        VolumeReadError: empty folder, nothing readable, mixed orientations, a single slice,
            two slices at one position, undecodable pixels, NaN values.
    """
    scan = scan_dicom_folder(folder)
    series, skipped_series = choose_series(scan, series_uid, modality)
    for uid, reason in skipped_series.items():
        logger.info("skipped %s: %s", scan.series[uid].describe(), reason)
    return read_series(series, folder, skipped_series, scan.skipped_files)


def read_series(series: DicomSeries, folder: str | os.PathLike[str], skipped_series: dict[str, str] | None = None, skipped_files: dict[str, str] | None = None) -> Volume:
    """Read one scanned series (see :func:`scan_dicom_folder`) into a canonical :class:`Volume`.

    Args:
        series: the series' files and headers.
        folder: where it was found (recorded as the volume's source and named in errors).
        skipped_series, skipped_files: what the caller skipped, kept in ``meta``.

    Raises:
        VolumeReadError: as :func:`read_dicom_series`.
    """
    if len(series.files) < 2:
        raise VolumeReadError(series.files[0], f"{series.describe()} is a single 2-D image; a volume needs at least 2 slices")
    check_consistent(series)

    first = series.first
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    origins = np.array([np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in series.headers])
    distances = origins @ normal
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    steps = np.diff(distances)
    if np.any(steps < POSITION_TOLERANCE_MM):
        duplicate = series.files[order[int(np.argmin(steps)) + 1]]
        raise VolumeReadError(duplicate, f"two slices of {series.describe()} lie at the same position (repeated acquisition?)")

    # Direction in which slice origins move per mm of normal distance: equals the normal
    # for an ordinary stack, and leans along the column direction for a gantry tilt.
    sorted_origins = origins[order]
    motion = (sorted_origins[-1] - sorted_origins[0]) / (distances[-1] - distances[0])
    tilt_deg = float(np.degrees(np.arccos(np.clip(motion @ normal / np.linalg.norm(motion), -1.0, 1.0))))
    if tilt_deg > 0.5:
        logger.warning("%s: gantry tilt of %.1f degrees", folder, tilt_deg)

    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    # Array index (r, c) = (row, column): moving one row goes along the column direction.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = column_direction * row_spacing
    affine_lps[:3, 1] = row_direction * column_spacing
    affine_lps[:3, 2] = motion
    affine_lps[:3, 3] = sorted_origins[0] - motion * distances[0]
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ affine_lps[:3]

    stack = np.stack([_read_pixels(series.files[index]) for index in order], axis=-1)
    check_finite_3d(stack, folder)
    try:
        volume = volume_from_slices(
            stack,
            affine,
            distances,
            source=str(folder),
            modality=series.modality or "unknown",
            meta={
                "format": "dicom",
                "series_uid": series.uid,
                "skipped_series": dict(skipped_series or {}),
                "skipped_files": dict(skipped_files or {}),
                "gantry_tilt_deg": tilt_deg,
                "slice_thickness": float(first.get("SliceThickness", 0) or 0),
                "reference_header": first,
            },
        )
    except ValueError as error:
        raise VolumeReadError(folder, f"{series.describe()}: {error}") from error
    return volume
