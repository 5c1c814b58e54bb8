"""Turn a dataset layout into a prepared dataset of normalised, brain-cropped slices.

A prepared dataset folder holds::

    manifest.json               arguments, normalisation, versions, per-subject hashes and counts
    slices.csv                  one row per slice: subject, split, slice, position, brain_fraction,
                                input_coverage
    private_subject_map.json    anonymised key -> original case name (never copy into outputs)
    subjects/<key>/source.npy   float32 (Z, S, S) in [-1, 1]; slice z is source[z], axes (R, A)
    subjects/<key>/target.npy   float32 (Z, S, S) in [-1, 1]
    subjects/<key>/mask.npy     uint8   (Z, S, S) brain mask

Slices are stored first-axis so one slice is one contiguous read (``np.load(mmap_mode="r")``).
``position`` is the normalised axial position across the brain: 0 at the lowest slice with
brain, 1 at the highest; slices outside the brain get values below 0 or above 1.
``input_coverage`` is the fraction of the slice's brain voxels where the source image has signal
(1 where the slice has no brain). It finds pairs whose input misses part of the brain the target
shows: in BraTS case Brats18_2013_20_1 the FLAIR is background over about a third of the T1's
brain on nearly every slice, and training on such slices teaches the model to invent tissue from
nothing. Datasets prepared before the column existed read as full coverage.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from lib.data.layouts import (
    DEFAULT_OPEN_COUNT,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    Folders,
    Layout,
    SubjectPair,
    SubjectRecord,
    discover_subjects,
    file_sha256,
)
from lib.data.model_frame import resize_slices
from lib.data.normalise import CT_WINDOW_HU, MRI_PERCENTILES, check_ct_window, ct_to_unit, mri_to_unit
from lib.io.atomic import atomic_directory
from lib.progress import ProgressFn, report

PREPARED_FORMAT_VERSION = 1
SLICE_COLUMNS = ["subject", "split", "slice", "position", "brain_fraction", "input_coverage"]


@dataclass(frozen=True)
class PrepareConfig:
    """How volumes are turned into prepared slices."""

    size: int = 128
    z_spacing_mm: float = 1.0
    margin_voxels: int = 4
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    mri_percentiles: tuple[float, float] = MRI_PERCENTILES
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    split_seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, before any subject is read or synthesised (ct_to_unit checks it again).
        check_ct_window(self.ct_window_hu)


def anonymised_key(layout: str, name: str) -> str:
    """A stable key for a subject that does not contain its name."""
    return "sub-" + hashlib.sha256(f"{layout}:{name}".encode()).hexdigest()[:10]


def split_subjects(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each subject (never a slice) to train, val or test, reproducibly.

    With at least 3 subjects every split gets at least one; train always gets the rest.
    """
    order = sorted(keys)
    np.random.default_rng(seed).shuffle(order)
    count = len(order)
    n_val = max(1, round(count * val_fraction)) if count >= 3 and val_fraction > 0 else 0
    n_test = max(1, round(count * test_fraction)) if count >= 3 and test_fraction > 0 else 0
    splits = {}
    for index, key in enumerate(order):
        splits[key] = "val" if index < n_val else "test" if index < n_val + n_test else "train"
    return splits


def _resample_to_spacing(
    array: np.ndarray, spacing: tuple[float, float, float], target: float, order: int
) -> np.ndarray:
    """Resample to isotropic ``target`` mm (skipped when already there)."""
    factors = [s / target for s in spacing]
    if np.allclose(factors, 1.0, atol=1e-3):
        return array
    return ndimage.zoom(array, factors, order=order)


def _square_crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, int]:
    """In-plane box around the brain (union over slices), squared and with a margin."""
    footprint = mask.any(axis=2)
    rows, cols = np.nonzero(footprint)
    centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    side = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1 + 2 * margin
    starts = [int(round(c - side / 2)) for c in centre]
    return slice(starts[0], starts[0] + side), slice(starts[1], starts[1] + side), side


def _crop_pad(array: np.ndarray, box: tuple[slice, slice, int], fill: float) -> np.ndarray:
    """Crop the in-plane box, padding with ``fill`` where it leaves the array."""
    rows, cols, side = box
    out = np.full((side, side, array.shape[2]), fill, dtype=array.dtype)
    src_r = slice(max(rows.start, 0), min(rows.stop, array.shape[0]))
    src_c = slice(max(cols.start, 0), min(cols.stop, array.shape[1]))
    dst_r = slice(src_r.start - rows.start, src_r.stop - rows.start)
    dst_c = slice(src_c.start - cols.start, src_c.stop - cols.start)
    out[dst_r, dst_c] = array[src_r, src_c]
    return out


def _resize_slices(array: np.ndarray, size: int) -> np.ndarray:
    """(X, Y, Z) -> (Z, size, size), anti-aliased bilinear."""
    return resize_slices(np.moveaxis(array, 2, 0), (size, size))


def prepare_subject(pair: SubjectPair, config: PrepareConfig) -> dict[str, np.ndarray]:
    """Normalise, brain-crop and resize one subject.

    Returns:
        ``source``, ``target`` (float32 (Z, S, S) in [-1, 1]), ``mask`` (uint8), ``position``
        ``brain_fraction`` and ``input_coverage`` (float (Z,)).

    Raises:
        ValueError: if the brain mask is empty.
    """
    if not pair.mask.any():
        raise ValueError(f"{pair.target.source}: empty brain mask")
    spacing = (*pair.source.pixel_spacing, float(np.median(pair.source.slice_steps)))
    mask = pair.mask.astype(np.float32)
    source_norm = (
        ct_to_unit(pair.source.array, config.ct_window_hu)
        if pair.source_is_ct
        else mri_to_unit(pair.source.array, pair.mask, config.mri_percentiles)
    )
    target_norm = mri_to_unit(pair.target.array, pair.mask, config.mri_percentiles)
    source_norm = _resample_to_spacing(source_norm, spacing, config.z_spacing_mm, order=1)
    target_norm = _resample_to_spacing(target_norm, spacing, config.z_spacing_mm, order=1)
    mask = _resample_to_spacing(mask, spacing, config.z_spacing_mm, order=0) > 0.5

    box = _square_crop_box(mask, config.margin_voxels)
    source_crop = _crop_pad(source_norm, box, -1.0)
    target_crop = _crop_pad(target_norm, box, -1.0)
    mask_crop = _crop_pad(mask.astype(np.float32), box, 0.0)

    # An anti-aliased mask thresholded at half is the brain at the new size; outside it the
    # images are set to exactly -1, so that resizing blur never smears brain into background.
    resized_mask = _resize_slices(mask_crop, config.size) > 0.5
    brain_slices = np.nonzero(mask.any(axis=(0, 1)))[0]
    low, high = brain_slices.min(), brain_slices.max()
    positions = (np.arange(mask.shape[2]) - low) / max(high - low, 1)
    source_slices = np.where(resized_mask, np.clip(_resize_slices(source_crop, config.size), -1, 1), -1.0)
    brain_voxels = resized_mask.sum(axis=(1, 2))
    # Normalised background is exactly -1; the darkest brain voxels sit at the low percentile,
    # which a little above -1 separates from "no signal at all" after resizing.
    covered = ((source_slices > -1.0 + 1e-3) & resized_mask).sum(axis=(1, 2))
    return {
        "source": source_slices.astype(np.float32),
        "target": np.where(resized_mask, np.clip(_resize_slices(target_crop, config.size), -1, 1), -1.0).astype(
            np.float32
        ),
        "mask": resized_mask.astype(np.uint8),
        "position": positions.astype(np.float32),
        "brain_fraction": resized_mask.mean(axis=(1, 2)).astype(np.float32),
        "input_coverage": np.where(brain_voxels > 0, covered / np.maximum(brain_voxels, 1), 1.0).astype(np.float32),
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def prepare_dataset(
    layout: Layout | str,
    src: Folders,
    out: str | os.PathLike[str],
    source: str = "t2f",
    target: str = "t1n",
    config: PrepareConfig = PrepareConfig(),
    open_count: int = DEFAULT_OPEN_COUNT,
    max_subjects: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict:
    """Prepare every subject of a dataset into ``out`` (see the module docstring).

    The dataset is written into a temporary folder beside ``out`` and renamed when complete,
    so ``out`` is never half-written.

    Args:
        progress: called with (subjects prepared, subjects) before the first and after each subject.

    Returns:
        The manifest that was written.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: unknown layout, no subjects, or a subject that cannot be prepared.
    """
    layout = Layout(layout)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    records: list[SubjectRecord] = discover_subjects(layout, src, source, target, open_count)
    if max_subjects is not None:
        records = records[:max_subjects]
    keys = [anonymised_key(layout.value, record.name) for record in records]
    splits = split_subjects(keys, config.val_fraction, config.test_fraction, config.split_seed)

    started = time.perf_counter()
    with atomic_directory(out) as staging:
        rows, subjects = [], []
        report(progress, 0, len(records))
        for record, key in zip(records, keys):
            subject_started = time.perf_counter()
            try:
                prepared = prepare_subject(record.load(), config)
            except ValueError as error:
                raise ValueError(f"subject {record.name}: {error}") from error
            folder = staging / "subjects" / key
            folder.mkdir(parents=True)
            for name in ("source", "target", "mask"):
                _save_npy(folder / f"{name}.npy", prepared[name])
            for index, (position, fraction, coverage) in enumerate(
                zip(prepared["position"], prepared["brain_fraction"], prepared["input_coverage"])
            ):
                rows.append(
                    (
                        key,
                        splits[key],
                        index,
                        round(float(position), 5),
                        round(float(fraction), 5),
                        round(float(coverage), 4),
                    )
                )
            subjects.append(
                {
                    "key": key,
                    "split": splits[key],
                    "slices": int(prepared["source"].shape[0]),
                    "brain_slices": int((prepared["brain_fraction"] > 0).sum()),
                    "input_coverage": round(
                        float((prepared["input_coverage"] * prepared["brain_fraction"]).sum())
                        / max(float(prepared["brain_fraction"].sum()), 1e-9),
                        4,
                    ),
                    "inputs": {path.name: file_sha256(path) for path in record.files},
                    "provenance": record.provenance,
                    "seconds": round(time.perf_counter() - subject_started, 2),
                }
            )
            report(progress, len(subjects), len(records))
        pd.DataFrame(rows, columns=SLICE_COLUMNS).to_csv(staging / "slices.csv", index=False)
        (staging / "private_subject_map.json").write_text(
            json.dumps({key: record.name for record, key in zip(records, keys)}, indent=1)
        )
        manifest = {
            "format_version": PREPARED_FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "layout": layout.value,
            "source": "ct" if layout is not Layout.BRATS else source,
            "target": "t1" if layout is not Layout.BRATS else target,
            "config": {
                **config.__dict__,
                "ct_window_hu": list(config.ct_window_hu),
                "mri_percentiles": list(config.mri_percentiles),
            },
            "array_axes": "(slice, R, A); slice runs inferior to superior",
            "value_range": [-1.0, 1.0],
            "subjects": subjects,
            "counts": {split: sum(1 for s in subjects if s["split"] == split) for split in ("train", "val", "test")},
            "total_slices": len(rows),
            "seconds": round(time.perf_counter() - started, 1),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
