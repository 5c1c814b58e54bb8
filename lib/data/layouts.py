"""Dataset layouts: where the paired source/target volumes of each subject are.

* ``brats``: ``<case>/<case>-t2f.nii.gz`` (BraTS 2023 naming) or ``<case>/t2f.nii.gz``
  (the form in ``shared/data``); source and target are two contrasts (default FLAIR -> T1).
* ``synthrad``: SynthRAD2023 brain, ``<case>/ct.nii.gz``, ``mr.nii.gz``, ``mask.nii.gz``.
* ``open``: pseudo-subjects whose CT/T1 pairs are synthesised (:mod:`lib.data.synthesis`) from
  real images a fresh machine can install: nilearn's MNI152 T1 and tissue maps, plus the
  BraTS cases under the ``--src`` folders when given (their T1 is the anatomy; their tumour
  labels ``seg``, or else their FLAIR ``t2f``, give the lesions the CT shows).
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lib.data import synthesis
from lib.io.errors import VolumeReadError
from lib.io.nifti import read_nifti
from lib.io.volume import Volume, volume_from_voxel_affine


class Layout(enum.StrEnum):
    """The dataset layouts ``prepare`` understands."""

    BRATS = "brats"
    SYNTHRAD = "synthrad"
    OPEN = "open"


@dataclass
class SubjectPair:
    """One subject's co-registered source and target volumes and brain mask (canonical frame)."""

    source: Volume
    target: Volume
    mask: np.ndarray
    source_is_ct: bool


@dataclass
class SubjectRecord:
    """A subject found in a layout: its name, the files it comes from, and how to load it."""

    name: str
    files: list[Path]
    load: Callable[[], SubjectPair]
    provenance: str = ""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_grid(reference: Volume, other: Volume) -> None:
    if reference.shape != other.shape or not np.allclose(reference.affine, other.affine, atol=1e-3):
        raise VolumeReadError(
            other.source, f"not on the same voxel grid as {reference.source} (shape {other.shape} vs {reference.shape})"
        )


def _find_contrast(case: Path, contrast: str) -> Path | None:
    for name in (
        f"{case.name}-{contrast}.nii.gz",
        f"{contrast}.nii.gz",
        f"{case.name}-{contrast}.nii",
        f"{contrast}.nii",
    ):
        if (case / name).is_file():
            return case / name
    return None


def _load_mri_pair(source_path: Path, target_path: Path) -> SubjectPair:
    source = read_nifti(source_path, modality="MR")
    target = read_nifti(target_path, modality="MR")
    _same_grid(source, target)
    # Skull-stripped BraTS volumes are zero outside the brain in every contrast.
    mask = (source.array > 0) | (target.array > 0)
    return SubjectPair(source=source, target=target, mask=mask, source_is_ct=False)


def brats_subjects(src: Path, source: str = "t2f", target: str = "t1n") -> list[SubjectRecord]:
    """Every case folder under ``src`` that holds both contrasts (others are reported)."""
    records = []
    for case in sorted(path for path in src.iterdir() if path.is_dir()):
        source_path, target_path = _find_contrast(case, source), _find_contrast(case, target)
        if source_path is None or target_path is None:
            continue
        records.append(
            SubjectRecord(
                name=case.name,
                files=[source_path, target_path],
                load=lambda s=source_path, t=target_path: _load_mri_pair(s, t),
            )
        )
    return records


def _load_synthrad(case: Path) -> SubjectPair:
    ct = read_nifti(case / "ct.nii.gz", modality="CT")
    mr = read_nifti(case / "mr.nii.gz", modality="MR")
    mask = read_nifti(case / "mask.nii.gz")
    _same_grid(ct, mr)
    _same_grid(ct, mask)
    return SubjectPair(source=ct, target=mr, mask=mask.array > 0.5, source_is_ct=True)


def synthrad_subjects(src: Path) -> list[SubjectRecord]:
    """Every ``<case>/`` under ``src`` with ct, mr and mask NIfTI files."""
    records = []
    for case in sorted(path for path in src.iterdir() if path.is_dir()):
        files = [case / name for name in ("ct.nii.gz", "mr.nii.gz", "mask.nii.gz")]
        if all(path.is_file() for path in files):
            records.append(SubjectRecord(name=case.name, files=files, load=lambda c=case: _load_synthrad(c)))
    return records


def _lesion_inputs(case: Path) -> tuple[Path | None, Path | None]:
    """A BraTS case's tumour label map and FLAIR, where present."""
    return _find_contrast(case, "seg"), _find_contrast(case, "t2f")


@lru_cache(maxsize=16)
def _tissue_model(base: str) -> synthesis.TissueModel:
    """The tissue model of a base image with its lesions, computed once per process (reused by many subjects)."""
    if base == "mni":
        return synthesis.tissue_model_from_mni()
    t1 = read_nifti(base, modality="MR")
    model = synthesis.tissue_model_from_t1(t1.array, t1.array > 0, t1.voxel_affine(), atlas=_tissue_model("mni"))
    labels_path, flair_path = _lesion_inputs(Path(base).parent)
    lesion_inputs = {}
    for key, path, modality in (("labels", labels_path, "unknown"), ("flair", flair_path, "MR")):
        if path is not None:
            volume = read_nifti(path, modality=modality)
            _same_grid(t1, volume)
            lesion_inputs[key] = volume.array
    return synthesis.with_lesions(model, **lesion_inputs)


def _load_pseudo_subject(base: str, seed: int) -> SubjectPair:
    model = _tissue_model(base)
    subject = synthesis.make_pseudo_subject(model, seed)
    ct = volume_from_voxel_affine(
        subject.ct, model.affine, source=f"open:{Path(base).parent.name or base}:{seed}", modality="CT"
    )
    t1 = volume_from_voxel_affine(subject.t1, model.affine, source=ct.source, modality="MR")
    mask = volume_from_voxel_affine(subject.mask.astype(np.float32), model.affine).array > 0.5
    return SubjectPair(source=ct, target=t1, mask=mask, source_is_ct=True)


def open_subjects(src: Path | Sequence[Path] | None, count: int) -> list[SubjectRecord]:
    """``count`` pseudo-subjects, cycling over the MNI template and the BraTS cases in ``src``.

    ``src`` is one folder or several (their cases in folder order). A case is a base when it
    has a T1; its tumour labels or else its FLAIR, when present, give the lesions.

    Raises:
        ValueError: one case name in two folders.
    """
    folders = [] if src is None else [Path(src)] if isinstance(src, str | os.PathLike) else [Path(f) for f in src]
    bases: list[tuple[str, list[Path], str]] = [("mni", [], "nilearn MNI152 2009 T1 + GM/WM maps, no lesion")]
    seen: dict[str, Path] = {}
    for folder in folders:
        for case in sorted(path for path in folder.iterdir() if path.is_dir()):
            t1 = _find_contrast(case, "t1n")
            if t1 is None:
                continue
            if case.name in seen:
                raise ValueError(f"case {case.name!r} is in both {seen[case.name]} and {folder}")
            seen[case.name] = folder
            labels, flair = _lesion_inputs(case)
            if labels is not None:
                lesions = f"lesions from tumour labels {labels.name}"
            elif flair is not None:
                lesions = f"lesions from FLAIR hyperintensity of {flair.name}"
            else:
                lesions = "no lesion"
            files = [path for path in (t1, labels, flair) if path is not None]
            bases.append((str(t1), files, f"real T1 {t1.name} of a BraTS case, {lesions}"))
    records = []
    for index in range(count):
        base, files, description = bases[index % len(bases)]
        label = "mni" if base == "mni" else Path(base).parent.name
        records.append(
            SubjectRecord(
                name=f"open-{label}-{index:03d}",
                files=files,
                load=lambda b=base, s=index: _load_pseudo_subject(b, s),
                provenance=f"{description}, deformation/appearance/intensity seed {index}",
            )
        )
    return records


# How many pseudo-subjects the `open` layout makes unless told otherwise.
DEFAULT_OPEN_COUNT = 12
# Shares of a dataset's subjects that `prepare` puts in the validation and test splits unless
# told otherwise (`evaluate` recomputes the same split from them).
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2


Folders = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


def discover_subjects(
    layout: Layout | str,
    src: Folders,
    source: str = "t2f",
    target: str = "t1n",
    open_count: int = DEFAULT_OPEN_COUNT,
) -> list[SubjectRecord]:
    """The subjects of a dataset in the given layout, from one folder or several.

    Several folders of one layout are one dataset: their subjects in the order of the folders
    (each folder's in its own order), so that the subject split is the same wherever the same
    folders are given in the same order.

    Raises:
        ValueError: unknown layout, missing ``src`` folder, the same subject name in two folders,
            or no subject found.
    """
    layout = Layout(layout)
    folders = [] if src is None else [Path(src)] if isinstance(src, str | os.PathLike) else [Path(f) for f in src]
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder")
    if layout is Layout.OPEN:
        records = open_subjects(folders, open_count)
    elif not folders:
        raise ValueError(f"the {layout.value} layout needs its dataset folder (src)")
    else:
        records = []
        for folder in folders:
            found = brats_subjects(folder, source, target) if layout is Layout.BRATS else synthrad_subjects(folder)
            if not found:
                raise _no_subject(folder, layout, source, target)
            records.extend(found)
        _check_unique_names(records)
    if not records:
        where = folders[0] if folders else "open"
        raise _no_subject(where, layout, source, target)
    return records


def _no_subject(where: Path | str, layout: Layout, source: str, target: str) -> ValueError:
    """The error for a folder without subjects, saying what a subject of the layout looks like."""
    expected = {
        Layout.BRATS: f"<case>/<case>-{source}.nii.gz and -{target}.nii.gz (or <case>/{source}.nii.gz)",
        Layout.SYNTHRAD: "<case>/ct.nii.gz, mr.nii.gz, mask.nii.gz",
        Layout.OPEN: "at least one pseudo-subject (open_count >= 1)",
    }[layout]
    return ValueError(f"{where}: no subject found for layout {layout.value}; expected {expected}")


def _check_unique_names(records: list[SubjectRecord]) -> None:
    """Refuse one subject name in two folders: its anonymised key would be the same."""
    seen: dict[str, Path] = {}
    for record in records:
        folder = record.files[0].parent if record.files else Path()
        if record.name in seen:
            raise ValueError(f"subject {record.name!r} is in both {seen[record.name]} and {folder}")
        seen[record.name] = folder
