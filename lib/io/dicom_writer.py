"""Writing a :class:`Volume` as a DICOM series of single-frame slices (with exact geometry).

Each slice's ImagePositionPatient comes from the volume's ``(i, j, p)`` affine and its true
slice position, so irregular gaps and tilted stacks are written exactly as they are held.
Pixels are stored as 16-bit integers with RescaleSlope/Intercept so that the modality LUT
gives back the values (HU for CT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from lib.io.atomic import atomic_path
from lib.io.volume import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass
class SeriesDescription:
    """The identifying tags of a series to write.

    ``patient`` and ``study`` tags are copied as given (e.g. from the input series); new
    Series/SOP Instance UIDs are made unless given.
    """

    modality: str = "CT"
    series_description: str = ""
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    patient: dict[str, str] = field(default_factory=lambda: {"PatientName": "ANONYMOUS", "PatientID": "ANON"})
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    window: tuple[float, float] | None = None  # (center, width)
    extra: dict[str, object] = field(default_factory=dict)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike[str],
    description: SeriesDescription,
    file_names: list[str] | None = None,
) -> list[Path]:
    """Write every slice of ``volume`` as one DICOM file in ``folder`` (each file atomically).

    Rows run along the volume's second axis and columns along its first, flipped so that a
    canonical (RAS) volume is written in the usual DICOM axial orientation (row direction
    towards patient left, column direction towards posterior).

    Args:
        volume: the slices to write, values in the modality's units.
        folder: output folder (created).
        description: identifying tags and the rescale to use.
        file_names: one name per slice (default ``slice_0000.dcm``, ...).

    Returns:
        The written paths, in slice order.

    Raises:
        ValueError: values that do not fit 16-bit storage (signed or not) with the given rescale.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = volume.shape[2]
    names = file_names or [f"slice_{k:04d}.dcm" for k in range(count)]
    stored = np.round((volume.array - description.rescale_intercept) / description.rescale_slope)
    # Unsigned storage when the values allow it (the common CT encoding, intercept -1024),
    # signed otherwise (e.g. -3024 HU outside the scan field).
    if stored.min() >= 0 and stored.max() <= 65535:
        stored, pixel_representation = stored.astype(np.uint16), 0
    elif stored.min() >= -32768 and stored.max() <= 32767:
        stored, pixel_representation = stored.astype(np.int16), 1
    else:
        raise ValueError(
            f"values {volume.array.min()}..{volume.array.max()} do not fit 16 bits with slope "
            f"{description.rescale_slope}, intercept {description.rescale_intercept}"
        )

    x_size, y_size = volume.shape[:2]
    axis_i, axis_j = RAS_TO_LPS @ volume.affine[:3, 0], RAS_TO_LPS @ volume.affine[:3, 1]
    # Pixel (row r, column c) holds voxel (i = X-1-c, j = Y-1-r): moving along a row goes
    # towards -i (patient left for RAS), moving down a column towards -j (posterior).
    row_direction, column_direction = -_unit(axis_i), -_unit(axis_j)
    spacing_i, spacing_j = volume.pixel_spacing
    now = datetime.now()
    paths = []
    for k in range(count):
        corner = np.array([x_size - 1, y_size - 1, volume.positions[k], 1.0])
        position = RAS_TO_LPS @ (volume.affine @ corner)[:3]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS.get(description.modality, CTImageStorage)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(names[k], {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        for tag, value in description.patient.items():
            setattr(ds, tag, value)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = description.study_uid
        ds.SeriesInstanceUID = description.series_uid
        ds.FrameOfReferenceUID = description.frame_of_reference_uid
        ds.Modality = description.modality
        ds.SeriesDescription = description.series_description
        ds.ImageType = list(description.image_type)
        ds.SeriesNumber = description.series_number
        ds.InstanceNumber = k + 1
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in position]
        ds.ImageOrientationPatient = [float(f"{v:.8f}") for v in (*row_direction, *column_direction)]
        ds.PixelSpacing = [float(spacing_j), float(spacing_i)]  # row spacing, column spacing
        steps = volume.slice_steps
        ds.SliceThickness = float(np.median(steps)) if len(steps) else 1.0
        ds.SliceLocation = float(position[2])
        ds.Rows, ds.Columns = y_size, x_size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleSlope = f"{description.rescale_slope:.6g}"
        ds.RescaleIntercept = f"{description.rescale_intercept:.6g}"
        if description.window is not None:
            ds.WindowCenter, ds.WindowWidth = (f"{v:.6g}" for v in description.window)
        for tag, value in description.extra.items():
            setattr(ds, tag, value)
        ds.PixelData = np.ascontiguousarray(stored[::-1, ::-1, k].T).tobytes()
        path = folder / names[k]
        with atomic_path(path) as temporary:
            pydicom.dcmwrite(str(temporary), ds, write_like_original=False)
        paths.append(path)
    return paths
