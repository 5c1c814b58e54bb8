"""DICOM series folders into the canonical frame: series choice, HU, slice order by position.

A folder as a scanner or PACS writes it holds several series (thin and thick axial,
reformats, a localizer), sometimes non-image objects and unreadable files, and file names
carry no order. :func:`scan_dicom_folder` groups what is readable by SeriesInstanceUID;
:func:`read_dicom_series` picks the CT (or MR) series (or the one asked for), orders slices by
ImagePositionPatient along the slice normal, converts to HU with RescaleSlope/Intercept,
and records which series it skipped and why.

DICOM has no checksum, so damage shows only as values that break the standard or physics. Every
header is decoded in full when the folder is scanned, and every value the geometry and the
pixels depend on is checked (unit orthogonal orientation vectors, plausible pixel spacing and
slice gaps, 16-bit CT, plausible HU) before a volume is made. A damaged file is never dropped
silently, which would leave a gap the reconstruction then fills: it fails the series it belongs
to, named in the error.
"""

from __future__ import annotations

import logging
import os
import re
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixel_data_handlers.util import apply_modality_lut
from pydicom.uid import UID, CTImageStorage, MediaStorageDirectoryStorage, MRImageStorage

from lib.io.errors import VolumeReadError
from lib.io.limits import MAX_VOLUME_BYTES, check_volume_bytes
from lib.io.volume import POSITION_TOLERANCE_MM, Volume, volume_from_slices

logger = logging.getLogger(__name__)

# DICOM patient axes are LPS; our world frame is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4
# ImageOrientationPatient holds two unit vectors at right angles; written with a few decimals.
UNIT_VECTOR_TOLERANCE = 1e-3
# A series whose normal is further than this from the patient's S axis is not axial.
AXIAL_MAX_ANGLE_DEG = 45.0
# In-plane pixel size (mm): from micro-CT to a coarse scout, exclusive of the lower bound.
PIXEL_SPACING_RANGE_MM = (0.01, 20.0)
# Consecutive slices further apart than this (mm) are not one scan of a head, however sparse.
MAX_SLICE_GAP_MM = 50.0
# CT values (HU) a scanner produces: air is -1000, dense bone about 2000, metal beyond. The padding
# outside the circular scan field (-2000, -2048 or -3024 by vendor) is the slice minimum below this
# range; it is not counted, but it never covers the centre of the image, which the scan field does.
PLAUSIBLE_HU = (-2000.0, 5000.0)
# Real slices have no such pixel; a damaged compressed stream or rescale has many.
MAX_IMPLAUSIBLE_FRACTION = 0.01
# The IODs whose Image Plane module (position, orientation, spacing) is mandatory: such a file
# without it is damaged, not a non-image object.
PLANE_IMAGE_CLASSES = (CTImageStorage, MRImageStorage)
# SeriesInstanceUID (0020,000E) in little-endian bytes: explicit VR ("UI" and a 2-byte length) or
# implicit VR (a 4-byte length); the value starts 8 bytes after the tag either way.
SERIES_UID_ELEMENT = re.compile(rb"\x20\x00\x0e\x00(?:UI(..)|(....))", re.DOTALL)
# It lies in the header, before the pixel data: no more of a damaged file than this is searched.
HEADER_SEARCH_BYTES = 1024**2
VALID_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass
class DicomSeries:
    """The readable image files of one series (headers only, pixels not yet loaded).

    ``damaged`` holds the files that belong to the series (by their SeriesInstanceUID, or by
    lying among its slices when the UID cannot be read) but cannot be read: reading the series
    fails on them.
    """

    uid: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)
    damaged: dict[Path, str] = field(default_factory=dict)

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
        """A one-line description of the series (no free text: a description may name the patient)."""
        image_type = "\\".join(self.image_type) or "-"
        return f"series {self.uid} ({self.modality or 'no modality'}, {len(self.files)} images, ImageType {image_type})"


@dataclass
class DicomFolderScan:
    """What a folder holds: image series, and the files that are not usable images."""

    folder: Path
    series: dict[str, DicomSeries]
    skipped_files: dict[str, str]


class NotOneStackError(VolumeReadError):
    """The files of a series are not parallel slices (e.g. a multi-planar reformat)."""


def _is_image(header: Dataset) -> bool:
    """True for an object with pixels placed in patient space (not SR, RT plans, ...)."""
    return all(tag in header for tag in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"))


def _read_header(path: Path) -> Dataset:
    """The header (no pixels) with every element decoded.

    pydicom decodes elements when first used; decoding all of them here makes a corrupt VR or
    value fail this file now rather than a later step that cannot say which file it was.

    Raises:
        InvalidDicomError: not a DICOM file; any other exception for a damaged one.
    """
    header = pydicom.dcmread(str(path), stop_before_pixels=True)
    for _ in (*header.file_meta.iterall(), *header.iterall()):
        pass
    return header


def _series_uid_in_bytes(path: Path) -> str | None:
    """The SeriesInstanceUID of a file pydicom cannot parse, found in its raw bytes, or None."""
    with open(path, "rb") as file:
        data = file.read(HEADER_SEARCH_BYTES)
    for match in SERIES_UID_ELEMENT.finditer(data):
        length = int.from_bytes(match.group(1) or match.group(2), "little")
        value = data[match.end() : match.end() + length].rstrip(b"\0 ").decode("ascii", "replace")
        if VALID_UID.fullmatch(value):
            return value
    return None


def _named_alike(path: Path, other: Path) -> bool:
    """True for files in one folder with the same extension (``.dcm``; none, or the numeric end of
    a UID used as the name, count as no extension): files a writer made together."""
    extension = lambda name: name.suffix.lower() if any(c.isalpha() for c in name.suffix) else ""  # noqa: E731
    return path.parent == other.parent and extension(path) == extension(other)


def _header_damage(header: Dataset) -> str | None:
    """Why a parsed header is a damaged (e.g. truncated) file rather than a usable one, or None."""
    if not _is_image(header):
        sop_class, media_class = header.get("SOPClassUID"), header.file_meta.get("MediaStorageSOPClassUID")
        if media_class == MediaStorageDirectoryStorage:
            return None  # a DICOMDIR: the only object without the SOP Common module
        if not sop_class or (media_class and media_class != sop_class):
            return (
                f"SOP class {sop_class or 'missing'} in the data set, {media_class or 'missing'} in the meta "
                "header: a truncated or damaged header"
            )
        if sop_class in PLANE_IMAGE_CLASSES:
            missing = [
                tag
                for tag in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient")
                if tag not in header
            ]
            return f"a {UID(sop_class).name} file without {', '.join(missing)}: a truncated or damaged header"
        return None
    uid = header.get("SeriesInstanceUID")
    if not uid:
        return "an image without SeriesInstanceUID: a truncated or damaged header"
    if not (str(uid).isascii() and str(uid).isprintable()):
        return "a SeriesInstanceUID with characters outside ASCII: damaged bytes"
    return None


def scan_dicom_folder(folder: str | os.PathLike[str]) -> DicomFolderScan:
    """Read the headers of every file under ``folder`` (recursively) and group them by series.

    Non-image objects are listed in ``skipped_files`` with the reason. A file that cannot be
    read (damaged or truncated, or not DICOM at all) is charged to its series by the
    SeriesInstanceUID found in it; without one, to every series with a file named alike in the
    same folder (an empty ``.dcm`` among ``.dcm`` slices, see :func:`_named_alike`); with
    neither, it is skipped with the reason.

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
    unreadable: list[tuple[Path, str | None, str]] = []  # (file, its series if known, reason)
    for path in files:
        try:
            header = _read_header(path)
        except InvalidDicomError as error:
            unreadable.append((path, None, f"not a DICOM file ({error})"))
            continue
        except OSError as error:
            unreadable.append((path, None, f"cannot be read ({error})"))
            continue
        except (
            Exception
        ) as error:  # pydicom raises many types for damaged bytes (NotImplementedError for an unknown VR, ...)
            unreadable.append(
                (path, _series_uid_in_bytes(path), f"a damaged DICOM file ({type(error).__name__}: {error})")
            )
            continue
        damage = _header_damage(header)
        uid = str(header.get("SeriesInstanceUID", ""))
        if damage:
            unreadable.append((path, uid, damage))
        elif not _is_image(header):
            skipped[str(path)] = f"not an image ({header.get('SOPClassUID', 'unknown SOP class')!s})"
        else:
            entry = series.setdefault(uid, DicomSeries(uid=uid))
            entry.files.append(path)
            entry.headers.append(header)
    for path, uid, reason in unreadable:
        owners = (
            [series[uid]]
            if uid in series
            else [s for s in series.values() if any(_named_alike(f, path) for f in s.files)]
        )
        for owner in owners:
            owner.damaged[path] = reason
        if not owners:
            skipped[str(path)] = reason
    return DicomFolderScan(folder=folder, series=series, skipped_files=skipped)


def _integer(path: Path, header: Dataset, keyword: str) -> int:
    """A required integer tag.

    Raises:
        VolumeReadError: naming ``path``: missing, or not one integer.
    """
    value = _numbers(path, header, keyword, 1)[0]
    if not value.is_integer():
        raise VolumeReadError(path, f"{keyword} {value} is not an integer")
    return int(value)


def _numbers(path: Path, header: Dataset, keyword: str, count: int) -> np.ndarray:
    """The ``count`` finite numbers of a numeric tag.

    Raises:
        VolumeReadError: naming ``path``: the tag is missing, has another number of values, or a
            value that is not a finite number.
    """
    value = header.get(keyword)
    if value is None or value == "":
        raise VolumeReadError(path, f"no {keyword}")
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        raise VolumeReadError(
            path, f"{keyword} {reprlib.repr(values)} is not {count} finite number{'s' if count > 1 else ''}"
        )
    return numbers


@dataclass(frozen=True)
class SliceGeometry:
    """Where one file's pixels lie in patient space (LPS mm), checked.

    Attributes:
        orientation: ``(6,)`` ImageOrientationPatient: row direction, then column direction.
        position: ``(3,)`` ImagePositionPatient, the centre of the first pixel.
        spacing: ``(2,)`` PixelSpacing: between rows, between columns.
        shape: ``(Rows, Columns)``.
    """

    orientation: np.ndarray
    position: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int]


def check_slice(path: Path, header: Dataset) -> SliceGeometry:
    """Check the header values one file's geometry and pixels depend on; return its geometry.

    Raises:
        VolumeReadError: naming ``path`` and the value at fault.
    """
    orientation = _numbers(path, header, "ImageOrientationPatient", 6)
    row_direction, column_direction = orientation[:3], orientation[3:]
    if not np.allclose(np.linalg.norm([row_direction, column_direction], axis=1), 1.0, atol=UNIT_VECTOR_TOLERANCE):
        raise VolumeReadError(path, f"ImageOrientationPatient {orientation.tolist()} does not hold two unit vectors")
    if abs(row_direction @ column_direction) > UNIT_VECTOR_TOLERANCE:
        raise VolumeReadError(
            path,
            f"ImageOrientationPatient {orientation.tolist()}: the row and column directions are not at right angles",
        )
    position = _numbers(path, header, "ImagePositionPatient", 3)
    spacing = _numbers(path, header, "PixelSpacing", 2)
    low, high = PIXEL_SPACING_RANGE_MM
    if np.any(spacing <= low) or np.any(spacing > high):
        raise VolumeReadError(path, f"PixelSpacing {spacing.tolist()} mm is outside ({low}, {high}] mm")
    rows, columns = _integer(path, header, "Rows"), _integer(path, header, "Columns")
    if rows < 1 or columns < 1:
        raise VolumeReadError(path, f"an image of {rows}x{columns} pixels")
    if _integer(path, header, "SamplesPerPixel") != 1:
        raise VolumeReadError(
            path, f"a colour image (SamplesPerPixel {header.SamplesPerPixel}); greyscale slices are needed"
        )
    bits_allocated, bits_stored = _integer(path, header, "BitsAllocated"), _integer(path, header, "BitsStored")
    is_ct = header.get("Modality") == "CT"
    if bits_allocated not in ((16, 32) if is_ct else (8, 16, 32)):
        raise VolumeReadError(
            path, f"BitsAllocated {bits_allocated}: {'CT needs 16 or 32' if is_ct else 'needs 8, 16 or 32'}"
        )
    if not 1 <= bits_stored <= bits_allocated:
        raise VolumeReadError(path, f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")
    if _integer(path, header, "PixelRepresentation") not in (0, 1):
        raise VolumeReadError(
            path, f"PixelRepresentation {header.PixelRepresentation} is neither 0 (unsigned) nor 1 (signed)"
        )
    # CT's rescale is mandatory (it makes HU); other modalities may store values as they are.
    if is_ct or "RescaleSlope" in header or "RescaleIntercept" in header:
        if _numbers(path, header, "RescaleSlope", 1)[0] == 0:
            raise VolumeReadError(path, "RescaleSlope 0 makes every pixel the same value")
        _numbers(path, header, "RescaleIntercept", 1)
    return SliceGeometry(orientation=orientation, position=position, spacing=spacing, shape=(rows, columns))


def _normal_lps(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def is_axial(series: DicomSeries) -> bool:
    """True when the slices' normal is within 45 degrees of the patient's S axis."""
    try:
        orientation = _numbers(series.files[0], series.first, "ImageOrientationPatient", 6)
    except VolumeReadError:
        return False  # not preferred; reading the series says what is wrong
    return abs(_normal_lps(orientation)[2]) >= np.cos(np.deg2rad(AXIAL_MAX_ANGLE_DEG))


def why_unusable(series: DicomSeries, modality: str) -> str | None:
    """The reason a series is not a usable volume of ``modality`` (CT, MR), or None when it is."""
    if series.modality != modality:
        return f"modality {series.modality or 'missing'}, not {modality}"
    if "LOCALIZER" in series.image_type:
        return "a localizer (scout) image"
    # A damaged file counts: a series of one readable and one damaged slice fails, naming it.
    if len(series.files) + len(series.damaged) < 2:
        return "a single image, not a volume"
    return None


def choose_series(
    scan: DicomFolderScan, series_uid: str | None = None, modality: str = "CT"
) -> tuple[DicomSeries, dict[str, str]]:
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


def check_consistent(series: DicomSeries) -> list[SliceGeometry]:
    """Check every file of ``series`` (see :func:`check_slice`) and that they form one stack of
    parallel slices of one size and modality; returns the files' geometries.

    Raises:
        NotOneStackError: the slices are not parallel (e.g. a multi-planar reformat).
        VolumeReadError: any other problem, naming the file.
    """
    geometries = [check_slice(path, header) for path, header in zip(series.files, series.headers)]
    first, first_name = geometries[0], series.files[0].name
    for path, header, geometry in zip(series.files, series.headers, geometries):
        if str(header.get("Modality", "")) != series.modality:
            raise VolumeReadError(
                path,
                f"Modality {header.get('Modality') or 'missing'} differs from {series.modality or 'missing'} "
                f"of {first_name} in the same series",
            )
        if not np.allclose(geometry.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise NotOneStackError(path, f"mixed orientations in {series.describe()}: slices are not parallel")
        if geometry.shape != first.shape:
            raise VolumeReadError(
                path,
                f"image size {geometry.shape[0]}x{geometry.shape[1]} differs from "
                f"{first.shape[0]}x{first.shape[1]} of {first_name} in the same series",
            )
        if not np.allclose(geometry.spacing, first.spacing, atol=1e-4):
            raise VolumeReadError(
                path,
                f"pixel spacing {geometry.spacing.tolist()} differs from {first.spacing.tolist()} of "
                f"{first_name} in the same series",
            )
    return geometries


def _implausible_ct(values: np.ndarray) -> str | None:
    """Why a CT slice's values (HU) cannot come from a scanner (see :data:`PLAUSIBLE_HU`), or None."""
    low, high = PLAUSIBLE_HU
    minimum = values.min()
    padding = values == minimum if minimum < low else np.zeros(values.shape, dtype=bool)
    outside = np.mean(((values < low) | (values > high))[~padding]) if not padding.all() else 1.0
    if outside > MAX_IMPLAUSIBLE_FRACTION:
        return (
            f"{outside:.1%} of the pixels are outside {low:.0f}..{high:.0f} HU (values "
            f"{minimum:.0f}..{values.max():.0f})"
        )
    rows, columns = values.shape
    centre = np.mean(padding[rows // 3 : 2 * rows // 3, columns // 3 : 2 * columns // 3])
    if centre > MAX_IMPLAUSIBLE_FRACTION:
        return (
            f"{centre:.1%} of the centre of the image has the padding value {minimum:.0f} HU of the area outside "
            "the scan field"
        )
    return None


def _read_pixels(path: Path) -> np.ndarray:
    """The modality-LUT-applied pixels of one file (HU for CT), checked to be finite and, for CT, plausible."""
    try:
        dataset = pydicom.dcmread(str(path))
        pixels = dataset.pixel_array
        values = apply_modality_lut(pixels, dataset)
    except Exception as error:  # pixel decoding raises many types for truncated or odd data
        raise VolumeReadError(path, f"cannot decode the pixel data ({type(error).__name__}: {error})") from error
    if values.ndim != 2:
        raise VolumeReadError(
            path, f"a multi-frame or colour image of shape {values.shape}; single-frame greyscale slices are needed"
        )
    if not np.all(np.isfinite(values)):
        raise VolumeReadError(path, f"{int(np.size(values) - np.isfinite(values).sum())} pixels are NaN or infinite")
    implausible = _implausible_ct(values) if dataset.get("Modality") == "CT" else None
    if implausible:
        raise VolumeReadError(path, f"{implausible}: damaged pixel data or rescale")
    return values.astype(np.float32)


def read_dicom_series(
    folder: str | os.PathLike[str],
    series_uid: str | None = None,
    modality: str = "CT",
    max_bytes: int | None = MAX_VOLUME_BYTES,
) -> Volume:
    """Read one series of a DICOM folder into a canonical :class:`Volume`.

    Args:
        folder: a folder with the series' files (any names, any depth, other series allowed).
        series_uid: SeriesInstanceUID to read; by default the best series of ``modality``
            (CT or MR; see :func:`choose_series`).
        modality: the DICOM Modality to look for when no ``series_uid`` is given.
        max_bytes: refuse a series whose headers announce more than this as float32, before
            any pixel data is decoded (None: no limit).

    Returns:
        The volume in HU (for CT); ``meta`` holds ``series_uid``, ``skipped_series``
        (uid -> reason), ``skipped_files`` (path -> reason), ``gantry_tilt_deg``,
        ``slice_thickness`` and ``reference_header`` (the first slice's header, no pixels).

    Raises:
        VolumeReadError: empty folder, nothing readable, a damaged file of the series, a header
            value out of the standard or of physics, mixed orientations, a single slice, two
            slices at one position or too far apart, undecodable or implausible pixels;
            :class:`~lib.io.limits.VolumeTooLarge` over ``max_bytes``.
    """
    scan = scan_dicom_folder(folder)
    series, skipped_series = choose_series(scan, series_uid, modality)
    for uid, reason in skipped_series.items():
        logger.info("skipped %s: %s", scan.series[uid].describe(), reason)
    return read_series(series, folder, skipped_series, scan.skipped_files, max_bytes=max_bytes)


def read_series(
    series: DicomSeries,
    folder: str | os.PathLike[str],
    skipped_series: dict[str, str] | None = None,
    skipped_files: dict[str, str] | None = None,
    max_bytes: int | None = MAX_VOLUME_BYTES,
) -> Volume:
    """Read one scanned series (see :func:`scan_dicom_folder`) into a canonical :class:`Volume`.

    Args:
        series: the series' files and headers.
        folder: where it was found (recorded as the volume's source and named in errors).
        skipped_series, skipped_files: what the caller skipped, kept in ``meta``.
        max_bytes: as :func:`read_dicom_series`.

    Raises:
        VolumeReadError: as :func:`read_dicom_series`.
    """
    if series.damaged:
        path, reason = next(iter(series.damaged.items()))
        raise VolumeReadError(
            path,
            f"{reason}; it belongs to (or lies among the slices of) {series.describe()}, which is incomplete "
            "without it",
        )
    if len(series.files) < 2:
        raise VolumeReadError(
            series.files[0], f"{series.describe()} is a single 2-D image; a volume needs at least 2 slices"
        )
    geometries = check_consistent(series)
    first, names = geometries[0], [path.name for path in series.files]
    check_volume_bytes(folder, (*first.shape, len(series.files)), max_bytes)

    row_direction, column_direction = first.orientation[:3], first.orientation[3:]
    normal = _normal_lps(first.orientation)
    origins = np.array([geometry.position for geometry in geometries])
    distances = origins @ normal
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    steps = np.diff(distances)
    if np.any(steps < POSITION_TOLERANCE_MM):
        duplicate = series.files[order[int(np.argmin(steps)) + 1]]
        raise VolumeReadError(
            duplicate, f"two slices of {series.describe()} lie at the same position (repeated acquisition?)"
        )
    if np.any(steps > MAX_SLICE_GAP_MM):
        gap = int(np.argmax(steps))
        raise VolumeReadError(
            series.files[order[gap + 1]],
            f"{steps[gap]:.1f} mm from {names[order[gap]]}, the slice before it: slices over "
            f"{MAX_SLICE_GAP_MM:.0f} mm apart are not one scan",
        )

    # Direction in which slice origins move per mm of normal distance: equals the normal
    # for an ordinary stack, and leans along the column direction for a gantry tilt.
    sorted_origins = origins[order]
    motion = (sorted_origins[-1] - sorted_origins[0]) / (distances[-1] - distances[0])
    # Every origin lies on that line (a stack, tilted or not); one off it is misplaced.
    offsets = np.linalg.norm(sorted_origins - (sorted_origins[0] + np.outer(distances - distances[0], motion)), axis=1)
    if offsets.max() > first.spacing.max():
        stray = int(np.argmax(offsets))
        raise VolumeReadError(
            series.files[order[stray]],
            f"its origin lies {offsets[stray]:.1f} mm off the line through the other slices' origins: not one stack",
        )
    tilt_deg = float(np.degrees(np.arccos(np.clip(motion @ normal / np.linalg.norm(motion), -1.0, 1.0))))
    if tilt_deg > 0.5:
        logger.warning("%s: gantry tilt of %.1f degrees", folder, tilt_deg)

    row_spacing, column_spacing = first.spacing
    # Array index (r, c) = (row, column): moving one row goes along the column direction.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = column_direction * row_spacing
    affine_lps[:3, 1] = row_direction * column_spacing
    affine_lps[:3, 2] = motion
    affine_lps[:3, 3] = sorted_origins[0] - motion * distances[0]
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ affine_lps[:3]

    header = series.first
    thickness = (
        _numbers(series.files[0], header, "SliceThickness", 1)[0]
        if header.get("SliceThickness") not in (None, "")
        else 0.0
    )
    stack = np.stack([_read_pixels(series.files[index]) for index in order], axis=-1)
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
                "slice_thickness": float(thickness),
                "reference_header": header,
            },
        )
    except ValueError as error:
        raise VolumeReadError(folder, f"{series.describe()}: {error}") from error
    return volume
