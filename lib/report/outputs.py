"""Write a reconstruction's output folder: mri.nii.gz, uncertainty.nii.gz, provenance.json, preview.png.

The folder is written under a staging name and renamed when complete, so a crash or a bad
input never leaves a half-written result (and an existing result is replaced only by a
complete one). Only a new or empty folder or a previous ReBrain output is written: a folder
holding anything else (a user's files, the input scan) is refused, never replaced. Both NIfTI
headers say the image is synthetic, and the provenance says it again (``"synthetic": true``).
Nothing that could identify the input's patient or a reference patient is written: the input
is described by its geometry only, references by anonymised keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lib.io.atomic import atomic_directory, check_replaceable_folder
from lib.io.nifti import write_nifti
from lib.io.volume import Volume
from lib.reconstruction import Reconstruction, Summary
from lib.report.preview import write_preview

MRI_DESCRIPTION = "SYNTHETIC MRI by ReBrain ({preset}); not an acquired image"
UNCERTAINTY_DESCRIPTION = "SYNTHETIC: ReBrain per-voxel std over {samples} sample(s)"
OUTPUT_FILES = ("mri.nii.gz", "uncertainty.nii.gz", "provenance.json", "preview.png")
# batch adds the synthetic DICOM series in this subfolder.
DICOM_FOLDER = "dicom"


def is_rebrain_output(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is an output folder ReBrain wrote and nothing else.

    Such a folder may be replaced by a new result: its provenance.json says it is synthetic, and
    every entry in it is one of :data:`OUTPUT_FILES` or the :data:`DICOM_FOLDER` of ``.dcm``
    files. A folder holding anything else (a user's file, the input scan) is not ours to delete.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        if json.loads((folder / "provenance.json").read_text()).get("synthetic") is not True:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    for entry in folder.iterdir():
        if entry.name == DICOM_FOLDER and entry.is_dir() and not entry.is_symlink():
            if any(not (item.is_file() and item.suffix == ".dcm") or item.is_symlink() for item in entry.iterdir()):
                return False
        elif entry.name not in OUTPUT_FILES or not entry.is_file() or entry.is_symlink():
            return False
    return True


def check_output_folder(out_dir: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an output folder a result may not be written to, before any work is done.

    A result replaces ``out_dir`` as a whole, so ``out_dir`` must be new, empty, or a previous
    ReBrain output (:func:`is_rebrain_output`): a file ReBrain did not write is never deleted.
    The missing parent folders are created and the place is tried for writing
    (:func:`lib.io.atomic.check_writable_folder`), so that an unwritable destination fails
    before the computation rather than after it.

    Args:
        out_dir: the output folder.
        inputs: the files or folders the result is made from; none may lie in ``out_dir``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``out_dir`` is, or holds, one of ``inputs``.
        FileExistsError: ``out_dir`` is a file or a link, or a non-empty folder that is not a
            ReBrain output.
        OSError: the folder cannot be created or written.
    """
    out = Path(out_dir)
    resolved = out.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if source_path == resolved or resolved in source_path.parents:
            raise ValueError(
                f"{out}: the output folder holds the input {source}, and a result replaces the whole folder; "
                "choose another output folder"
            )
    return check_replaceable_folder(out, is_rebrain_output, f"a ReBrain output ({', '.join(OUTPUT_FILES)})")


def input_geometry(volume: Volume, sparsity: int | None) -> dict:
    """What the provenance records about the input: geometry only, no names or paths."""
    return {
        "modality": volume.modality,
        "shape": list(volume.shape),
        "pixel_spacing_mm": [round(v, 4) for v in volume.pixel_spacing],
        "acquired_positions_mm": [round(float(p), 3) for p in volume.positions],
        "gantry_tilt_deg": volume.meta.get("gantry_tilt_deg"),
        "simulated_sparsity": sparsity,
    }


def slice_status(reconstruction: Reconstruction) -> list[str]:
    """Per output slice: ``acquired``, ``retrieved`` (generated, retrieval succeeded) or ``fallback``."""
    return ["acquired" if r.acquired else ("retrieved" if r.success else "fallback") for r in reconstruction.slices]


# Display names of the prepared datasets' contrast names (BraTS 2023 suffixes, CT).
CONTRAST_LABELS = {"ct": "CT", "t2f": "FLAIR", "t1n": "T1", "t1": "T1", "t1c": "T1 post-contrast", "t2w": "T2"}


def contrast_label(name: str) -> str:
    """``"t2f"`` -> ``"FLAIR"``; unknown names are shown as they are."""
    return CONTRAST_LABELS.get(name.lower(), name)


def write_outputs(out_dir: str | os.PathLike[str], reconstruction: Reconstruction, input_info: dict) -> Path:
    """Write the four output files into ``out_dir`` atomically; returns the folder.

    Raises:
        FileExistsError, OSError: see :func:`check_output_folder`, checked again here because
            the folder may have changed during the computation.
    """
    check_output_folder(out_dir)
    summary = reconstruction.summary
    source = contrast_label(summary.source)
    affine = reconstruction.grid.affine
    with atomic_directory(out_dir) as staging:
        write_nifti(
            staging / "mri.nii.gz", reconstruction.mri, affine, MRI_DESCRIPTION.format(preset=summary.preset)[:80]
        )
        write_nifti(
            staging / "uncertainty.nii.gz",
            reconstruction.uncertainty,
            affine,
            UNCERTAINTY_DESCRIPTION.format(samples=summary.samples)[:80],
        )
        provenance = {
            "synthetic": True,
            "notice": f"Synthetic MRI generated from {source} by ReBrain; not an acquired image; not for diagnosis.",
            "input": input_info,
            "output": {
                "shape": list(reconstruction.mri.shape),
                "affine": np.round(affine, 6).tolist(),
                "slice_spacing_mm": reconstruction.grid.spacing,
                "value_range": [0.0, 1.0],
            },
            **reconstruction.provenance(),
        }
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=1))
        write_preview(
            staging / "preview.png",
            reconstruction.ct,
            reconstruction.mri,
            reconstruction.grid.voxel_spacing,
            slice_status(reconstruction),
            reconstruction.similarities,
            summary.tau,
            title=f"ReBrain {summary.preset}: SYNTHETIC {contrast_label(summary.target)}; slice positions from "
            f"the {positions_source(summary, why=False)}",
            source_label=source,
        )
    return Path(out_dir)


def positions_source(summary: Summary, why: bool = True) -> str:
    """Where a reconstruction's slice positions came from: the CT head template (registered, with
    its metric) or the brain's own extent (with the reason unless ``why`` is false)."""
    alignment = summary.alignment
    if alignment.get("applied"):
        return f"CT head template (MI {alignment['metric']:.2f})"
    return f"brain extent ({alignment.get('reason', 'not recorded')})" if why else "brain extent"
