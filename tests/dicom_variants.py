"""Damaged and odd variants of a small series made from the real head CT study, for reader tests.

Two bases, both four 5 mm slices of the real study:

* ``plain``: the real CT downsampled to 128 x 128 and written uncompressed by
  :func:`write_dicom_series` (header mutations: cheap to read and, when a variant is valid, to
  reconstruct);
* ``jpeg``: four consecutive files of the study's own 5 mm axial series, JPEG Lossless with the
  scanner's headers (damage to a compressed pixel stream).

A variant copies a base into a folder as a new series (new Series and SOP Instance UIDs) and
damages one file, :data:`TARGET`: the third, never the first, so that a check comparing slices
with the first one must name the damaged file and not its neighbour. A ``whole_series`` variant
damages every file alike, as a misconfigured writer would; the first file is then the one named.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from lib.io.dicom_writer import SeriesDescription, write_dicom_series
from lib.io.errors import VolumeReadError
from lib.io.volume import Volume

TARGET = 2
# Consecutive slices of the real study's 5 mm axial series (positions 70.75 ... 85.75 mm).
JPEG_FILES = ("I20", "I21", "I22", "I23")
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"

# What reading a variant must give.
REFUSED = "refused"  # a VolumeReadError naming the damaged file
SAME = "same"  # exactly the volume of the undamaged series
EITHER = "either"  # random damage whose effect cannot be known beforehand: refused, or the same volume

# ``damage(files, index)`` changes ``files[index]`` of a copied series in place.
Damage = Callable[[list[Path], int], None]


@dataclass(frozen=True)
class Variant:
    """One way to damage a series.

    Attributes:
        name: unique, used as the variant's folder name.
        base: ``"plain"`` or ``"jpeg"``.
        damage: what is done to the file (see :data:`Damage`).
        outcome: :data:`REFUSED`, :data:`SAME` or :data:`EITHER`.
        whole_series: damage every file, not only :data:`TARGET`.
    """

    name: str
    base: str
    damage: Damage
    outcome: str = REFUSED
    whole_series: bool = False

    def named_file(self, files: list[Path]) -> Path:
        """The file a refusal must name."""
        return files[0] if self.whole_series else files[TARGET]


def names(error: VolumeReadError, path: Path) -> bool:
    """True when ``error`` names ``path``: as the file at fault, or in its reason (the slice
    before a gap names the one after it)."""
    return error.path == str(path) or f"{path.name}," in error.reason


def make_bases(ct: Volume, study: Path, folder: Path) -> dict[str, list[Path]]:
    """The files of both bases: ``plain``, four 5 mm slices from the middle of ``ct`` (the real
    2.5 mm CT, downsampled) written into ``folder``; ``jpeg``, the real files in ``study``."""
    middle = ct.shape[2] // 2
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=["variant base", kind]) for kind in ("study", "series", "frame")
    )
    description = SeriesDescription(
        modality="CT",
        series_description="variant base",
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        patient={"PatientName": "Doe^Jane", "PatientID": "PID-4711"},
    )
    plain = write_dicom_series(ct.take_slices([middle + 2 * k for k in range(4)]), folder / "plain", description)
    return {"plain": plain, "jpeg": [study / name for name in JPEG_FILES]}


def copy_as_new_series(files: list[Path], folder: Path) -> list[Path]:
    """Copy ``files`` into ``folder`` under their own names, as a series of its own.

    The new UIDs derive from the folder's name, so a variant's bytes, and where random damage
    lands in them, are the same in every run.
    """
    folder.mkdir(parents=True)
    series_uid = generate_uid(entropy_srcs=[folder.name])
    copies = []
    for source in files:
        ds = pydicom.dcmread(str(source))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[folder.name, source.name]
        )
        ds.save_as(str(folder / source.name))
        copies.append(folder / source.name)
    return copies


def make_variant(variant: Variant, base: list[Path], folder: Path) -> list[Path]:
    """The variant's series in ``folder`` (created); returns its files."""
    files = copy_as_new_series(base, folder)
    for index in range(len(files)) if variant.whole_series else [TARGET]:
        variant.damage(files, index)
    return files


def edit(change: Callable[[Dataset], object]) -> Damage:
    """Damage that changes a header with pydicom (``change`` may return anything)."""

    def damage(files: list[Path], index: int) -> None:
        ds = pydicom.dcmread(str(files[index]))
        change(ds)
        ds.save_as(str(files[index]))

    return damage


def remove(keyword: str) -> Damage:
    """Damage that deletes one tag."""
    return edit(lambda ds: delattr(ds, keyword))


def put(keyword: str, value: object) -> Damage:
    """Damage that sets one tag."""
    return edit(lambda ds: setattr(ds, keyword, value))


def rewrite(change: Callable[[bytes], bytes]) -> Damage:
    """Damage to a file's raw bytes."""

    def damage(files: list[Path], index: int) -> None:
        files[index].write_bytes(change(files[index].read_bytes()))

    return damage


def pixel_value_offset(data: bytes) -> int:
    """Where the PixelData value starts (explicit VR: tag, VR, 2 reserved bytes, 4-byte length)."""
    return data.rindex(PIXEL_DATA_TAG) + 12


def flip(region: str, seed: int, count: int) -> Damage:
    """XOR ``count`` bytes with 0xFF at random places of the ``"pixels"`` or the ``"header"``
    (after the preamble and DICM, before PixelData)."""

    def change(data: bytes) -> bytes:
        start, stop = (
            (pixel_value_offset(data), len(data)) if region == "pixels" else (132, data.rindex(PIXEL_DATA_TAG))
        )
        damaged = bytearray(data)
        for position in random.Random(seed).sample(range(start, stop), count):
            damaged[position] ^= 0xFF
        return bytes(damaged)

    return rewrite(change)


def corrupt_vr(tag: tuple[int, int]) -> Damage:
    """Replace the VR of ``tag`` (explicit VR little endian) by the unknown ``ZZ``."""
    needle = tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little")

    def change(data: bytes) -> bytes:
        at = data.index(needle, 132) + 4
        return data[:at] + b"ZZ" + data[at + 2 :]

    return rewrite(change)


def truncate(keep: Callable[[bytes], int]) -> Damage:
    """Cut a file after ``keep(data)`` bytes."""
    return rewrite(lambda data: data[: keep(data)])


def copy_position_of(source: int) -> Damage:
    """A file takes the ImagePositionPatient of ``files[source]`` (two slices at one place)."""

    def damage(files: list[Path], index: int) -> None:
        position = pydicom.dcmread(str(files[source]), stop_before_pixels=True).ImagePositionPatient
        put("ImagePositionPatient", position)(files, index)

    return damage


def move(offset_lps_mm: tuple[float, float, float]) -> Damage:
    """Shift ImagePositionPatient by ``offset_lps_mm``."""
    return edit(
        lambda ds: setattr(
            ds, "ImagePositionPatient", [float(v) + d for v, d in zip(ds.ImagePositionPatient, offset_lps_mm)]
        )
    )


def stretch_positions(factor: float) -> Damage:
    """Multiply the height (S) of ImagePositionPatient by ``factor``: slices 5 mm apart become 5 m apart at 1000."""
    return edit(
        lambda ds: setattr(
            ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) * factor]
        )
    )


def scale_orientation(factor: float) -> Damage:
    """Multiply ImageOrientationPatient by ``factor`` (non-unit direction vectors)."""
    return edit(
        lambda ds: setattr(ds, "ImageOrientationPatient", [float(v) * factor for v in ds.ImageOrientationPatient])
    )


def keep_half_of_pixel_data(ds: Dataset) -> None:
    """Cut PixelData to half its length, the header left as it was."""
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def declare_transfer_syntax(stored: str, declared: str) -> Damage:
    """Say the pixel data is encoded as ``declared`` (a UID as long as ``stored``, so that no
    length in the meta header changes): the decoder gets a stream of the wrong kind."""
    return rewrite(lambda data: data.replace(stored.encode(), declared.encode(), 1))


def header_end(data: bytes) -> int:
    """Offset of the PixelData tag: everything before it is header."""
    return data.rindex(PIXEL_DATA_TAG)


VARIANTS: tuple[Variant, ...] = (
    # Geometry tags: absent, absurd, inconsistent.
    Variant("pixel-spacing-zero", "plain", put("PixelSpacing", [0, 0])),
    Variant("pixel-spacing-negative", "plain", put("PixelSpacing", [-0.98, -0.98])),
    Variant("pixel-spacing-missing", "plain", remove("PixelSpacing")),
    Variant("pixel-spacing-one-value", "plain", put("PixelSpacing", [0.98])),
    Variant("pixel-spacing-absurd", "plain", put("PixelSpacing", [500, 500])),
    Variant("pixel-spacing-differs", "plain", put("PixelSpacing", [1.5, 1.5])),
    Variant("pixel-spacing-not-a-number", "plain", put("PixelSpacing", ["nan", "nan"])),
    Variant("orientation-scaled-6x", "plain", scale_orientation(6.0)),
    Variant("orientation-zero", "plain", put("ImageOrientationPatient", [0, 0, 0, 0, 0, 0])),
    Variant("orientation-not-orthogonal", "plain", put("ImageOrientationPatient", [-1, 0, 0, -0.6, -0.8, 0])),
    Variant("orientation-five-values", "plain", put("ImageOrientationPatient", [-1, 0, 0, 0, -1])),
    Variant("orientation-missing", "plain", remove("ImageOrientationPatient")),
    Variant("orientation-coronal", "plain", put("ImageOrientationPatient", [1, 0, 0, 0, 0, -1])),
    Variant("position-5-m-away", "plain", move((0.0, 0.0, 5000.0))),
    Variant("position-beside-the-stack", "plain", move((40.0, 0.0, 0.0))),
    Variant("position-duplicate", "plain", copy_position_of(1)),
    Variant("position-missing", "plain", remove("ImagePositionPatient")),
    Variant("position-two-values", "plain", put("ImagePositionPatient", [1.0, 2.0])),
    # Pixel description and values.
    Variant("bits-allocated-8", "plain", put("BitsAllocated", 8)),
    Variant("bits-stored-over-allocated", "plain", put("BitsStored", 20)),
    Variant("pixel-representation-flipped", "plain", put("PixelRepresentation", 0)),
    Variant("samples-per-pixel-3", "plain", put("SamplesPerPixel", 3)),
    Variant("rows-mismatch", "plain", put("Rows", 64)),
    Variant("columns-mismatch", "plain", put("Columns", 200)),
    Variant("rows-zero", "plain", put("Rows", 0)),
    Variant("two-frames", "plain", put("NumberOfFrames", 2)),
    Variant("rescale-slope-zero", "plain", put("RescaleSlope", 0)),
    Variant("rescale-slope-absurd", "plain", put("RescaleSlope", 1e6)),
    Variant("rescale-slope-negative", "plain", put("RescaleSlope", -1)),
    Variant("rescale-intercept-absurd", "plain", put("RescaleIntercept", 1e5)),
    Variant("rescale-intercept-missing", "plain", remove("RescaleIntercept")),
    Variant("pixel-data-missing", "plain", remove("PixelData")),
    Variant("pixel-data-half", "plain", edit(keep_half_of_pixel_data)),
    Variant("declared-rle", "plain", declare_transfer_syntax(ExplicitVRLittleEndian, RLELossless)),
    # Identity of the series.
    Variant("modality-mr", "plain", put("Modality", "MR")),
    Variant("modality-missing", "plain", remove("Modality")),
    Variant("series-uid-missing", "plain", remove("SeriesInstanceUID")),
    # Damage to the encoding itself.
    Variant("meta-vr-corrupt-transfer-syntax", "plain", corrupt_vr((0x0002, 0x0010))),
    Variant("meta-vr-corrupt-implementation", "plain", corrupt_vr((0x0002, 0x0012))),
    Variant("dataset-vr-corrupt-modality", "plain", corrupt_vr((0x0008, 0x0060))),
    Variant(
        "truncated-to-nothing", "plain", truncate(lambda data: 0)
    ),  # no DICOM at all, but named like its neighbours
    Variant("truncated-in-meta", "plain", truncate(lambda data: 200)),
    Variant("truncated-in-header", "plain", truncate(lambda data: header_end(data) // 2)),
    Variant("truncated-before-pixels", "plain", truncate(header_end)),
    Variant("truncated-in-pixels", "plain", truncate(lambda data: len(data) - 5000)),
    Variant("truncated-last-byte", "plain", truncate(lambda data: len(data) - 1)),
    # The same damage in every file of the series.
    Variant("whole-orientation-scaled-6x", "plain", scale_orientation(6.0), whole_series=True),
    Variant("whole-orientation-zero", "plain", put("ImageOrientationPatient", [0, 0, 0, 0, 0, 0]), whole_series=True),
    Variant("whole-pixel-spacing-zero", "plain", put("PixelSpacing", [0, 0]), whole_series=True),
    Variant("whole-pixel-spacing-negative", "plain", put("PixelSpacing", [-0.98, -0.98]), whole_series=True),
    Variant("whole-pixel-spacing-missing", "plain", remove("PixelSpacing"), whole_series=True),
    Variant("whole-bits-allocated-8", "plain", put("BitsAllocated", 8), whole_series=True),
    Variant("whole-rescale-slope-absurd", "plain", put("RescaleSlope", 1e6), whole_series=True),
    Variant("whole-positions-5-m-apart", "plain", stretch_positions(1000.0), whole_series=True),
    # Valid but different: tags the reader does not need.
    Variant("instance-number-missing", "plain", remove("InstanceNumber"), SAME),
    Variant("slice-thickness-missing", "plain", remove("SliceThickness"), SAME),
    Variant("image-type-missing", "plain", remove("ImageType"), SAME),
    # A few header bytes flipped anywhere: refused or harmless, never a silently different volume.
    *(Variant(f"header-flips-{seed}", "plain", flip("header", seed, 2), EITHER) for seed in range(10)),
    # The scanner's own JPEG Lossless files.
    *(Variant(f"jpeg-pixel-flips-{seed}", "jpeg", flip("pixels", seed, 20)) for seed in range(6)),
    Variant(
        "jpeg-truncated-in-pixels",
        "jpeg",
        truncate(lambda data: pixel_value_offset(data) + (len(data) - pixel_value_offset(data)) // 2),
    ),
    Variant("jpeg-truncated-near-the-end", "jpeg", truncate(lambda data: len(data) - 100)),
    Variant("jpeg-declared-jpeg-2000", "jpeg", declare_transfer_syntax(JPEGLosslessSV1, JPEG2000Lossless)),
    Variant("jpeg-meta-vr-corrupt", "jpeg", corrupt_vr((0x0002, 0x0010))),
    Variant("jpeg-rows-mismatch", "jpeg", put("Rows", 256)),
    Variant("jpeg-bits-allocated-8", "jpeg", put("BitsAllocated", 8)),
)

VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}
