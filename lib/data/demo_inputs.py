"""The inputs of ``make demo``, prepared from sources that a fresh machine can reach.

* ``cranium_ct.nii.gz``: Debian's real head CT (``invesalius-examples``, read with
  :func:`lib.data.invesalius.read_inv3`), in HU, as ``python main.py export-cranium`` writes it.
* ``pair_ct.nii.gz`` / ``pair_t1.nii.gz``: one SYNTHETIC paired CT (HU) / T1 pseudo-subject with
  ground truth, made by :func:`lib.data.synthesis.make_pseudo_subject` from nilearn's MNI152
  template (it ships inside the nilearn pip package, so no download is needed).

The pseudo-subject's seed is ``DEMO_SEED_OFFSET + seed``. The ``open`` layout
(:func:`lib.data.layouts.open_subjects`) seeds its training pseudo-subjects with their index
``0 .. --subjects - 1``, so the demo subject is never one the models were trained on unless
a dataset of more than a million pseudo-subjects is prepared.

No file holds a patient identifier: the NIfTI files carry only voxels, the affine and a
description (the synthetic ones say SYNTHETIC).

Command line: ``python -m lib.data.demo_inputs OUT_DIR [--seed N] [--downsample K] [--cranium INV3]``.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from lib.data.invesalius import CRANIUM_PATH, read_inv3
from lib.data.synthesis import TissueModel, make_pseudo_subject
from lib.io.atomic import atomic_path
from lib.io.nifti import write_nifti

__all__ = ["CRANIUM_DESCRIPTION", "DEMO_SEED_OFFSET", "DEMO_FILES", "make_demo_inputs", "main"]

# Far above any index the open layout uses as a seed (see the module docstring).
DEMO_SEED_OFFSET = 1_000_000

# Key -> file name in the output folder.
DEMO_FILES: dict[str, str] = {
    "cranium_ct": "cranium_ct.nii.gz",
    "pair_ct": "pair_ct.nii.gz",
    "pair_t1": "pair_t1.nii.gz",
}

# Same text as app/cli.py's export-cranium, so both paths produce the same file.
CRANIUM_DESCRIPTION = "Real head CT (InVesalius Cranium example), HU"


def _mni_model(downsample: int) -> TissueModel:
    """The MNI152 tissue model of the ``open`` layout, keeping every ``downsample``-th voxel."""
    # The open layout's per-process cache: the same model it trains on, loaded once (~5 s).
    from lib.data.layouts import _tissue_model

    model = _tissue_model("mni")
    if downsample == 1:
        return model
    step = slice(None, None, downsample)
    return TissueModel(
        t1=model.t1[step, step, step],
        mask=model.mask[step, step, step],
        probabilities=model.probabilities[:, step, step, step],
        affine=model.affine @ np.diag([downsample, downsample, downsample, 1.0]),
    )


def make_demo_inputs(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    downsample: int = 1,
    cranium_path: str | os.PathLike[str] = CRANIUM_PATH,
) -> dict[str, Path]:
    """Write the demo inputs (see the module docstring) into ``out_dir``.

    All three files are computed first and then written under temporary names; they are
    renamed into place only once every one is complete, so an error leaves no partial or
    half-written file, and an earlier set in ``out_dir`` is replaced only by a complete one.
    Other files in ``out_dir`` are left alone. Calling again overwrites the same files with
    the same content.

    Args:
        out_dir: the output folder (created if needed).
        seed: selects the pseudo-subject; its synthesis seed is ``DEMO_SEED_OFFSET + seed``.
        downsample: keep every ``downsample``-th voxel of the 1 mm MNI model (1 = full 1 mm
            resolution, for the demo; larger values make fast test volumes). Deformation sizes
            are scaled so that they stay the same in millimetres.
        cranium_path: the InVesalius Cranium project file.

    Returns:
        ``{"cranium_ct": ..., "pair_ct": ..., "pair_t1": ...}``, the written paths.

    Raises:
        FileNotFoundError: the Cranium file is missing (install ``invesalius-examples``).
        ValueError: a negative ``seed`` or a ``downsample`` below 1.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if downsample < 1:
        raise ValueError(f"downsample must be an integer >= 1, got {downsample}")
    cranium_path = Path(cranium_path)
    # Checked before the slow synthesis so that a missing package fails at once.
    if not cranium_path.is_file():
        raise FileNotFoundError(
            f"{cranium_path}: the real head CT of the demo is missing; "
            "install it with `sudo apt-get install invesalius-examples`"
        )
    cranium = read_inv3(cranium_path)

    model = _mni_model(downsample)
    subject_seed = DEMO_SEED_OFFSET + seed
    # make_pseudo_subject measures deformations in voxels (1 mm assumed): shrink its default
    # sizes by the voxel size so that a downsampled subject deforms by the same millimetres.
    defaults = inspect.signature(make_pseudo_subject).parameters
    deformation = {name: defaults[name].default / downsample for name in ("max_displacement_mm", "smoothness_mm")}
    subject = make_pseudo_subject(model, subject_seed, **deformation)
    provenance = f"MNI152, seed {subject_seed}, {downsample} mm"
    contents = {
        "cranium_ct": (cranium.array.astype(np.int16), cranium.voxel_affine(), CRANIUM_DESCRIPTION, np.int16),
        "pair_ct": (subject.ct, subject.affine, f"SYNTHETIC demo CT (HU) from {provenance} (ReBrain)", np.float32),
        "pair_t1": (subject.t1, subject.affine, f"SYNTHETIC demo T1 from {provenance} (ReBrain)", np.float32),
    }

    out_dir = Path(out_dir)
    paths = {key: out_dir / DEMO_FILES[key] for key in contents}
    with ExitStack() as stack:
        # Each file goes to a temporary name; leaving the stack renames them all, or on an
        # error removes every temporary, so the set appears complete or not at all.
        for key, (array, affine, description, dtype) in contents.items():
            temporary = stack.enter_context(atomic_path(paths[key]))
            write_nifti(temporary, array, affine, description=description, dtype=dtype)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the demo inputs into a folder and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m lib.data.demo_inputs", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument(
        "--seed", type=int, default=0, help=f"pseudo-subject (synthesis seed {DEMO_SEED_OFFSET} + SEED)"
    )
    parser.add_argument("--downsample", type=int, default=1, help="keep every K-th voxel (1 = 1 mm, the demo default)")
    parser.add_argument(
        "--cranium", default=str(CRANIUM_PATH), help="the InVesalius Cranium project (invesalius-examples)"
    )
    args = parser.parse_args(argv)
    try:
        paths = make_demo_inputs(args.out_dir, args.seed, downsample=args.downsample, cranium_path=args.cranium)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
