"""Model presets: one folder of trained weights per translation task.

A preset folder (``model_weights/<name>/``) holds::

    preset.json      name, description, modalities, normalisation, defaults, file names
    bbdm.pt          the BBDM denoiser (python main.py train-bbdm)
    controlnet.pt    the ControlNet branch (python main.py train-controlnet); optional
    encoder.pt       the retrieval encoder (python main.py train-retrieval)
    kb/              the knowledge base (python main.py build-kb)

``preset.json`` is written by :func:`write_preset` (``python main.py make-preset``) from the
prepared dataset's manifest, so the pipeline normalises inputs exactly as training did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lib.data.normalise import CT_WINDOW_HU, MRI_PERCENTILES, ORIGINAL_CT_WINDOW_HU
from lib.io.atomic import atomic_directory, atomic_path

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "model_weights"
PRESET_FILE = "preset.json"


@dataclass(frozen=True)
class Preset:
    """A preset, loaded from its folder.

    Attributes:
        name: e.g. ``ct2mri``.
        root: the folder.
        description: one line for users (/info/, --help).
        source: input modality, ``"ct"`` or an MRI contrast name (e.g. ``"t2f"``).
        target: output contrast (e.g. ``"t1"``).
        ct_window_hu, mri_percentiles, margin_voxels, slice_spacing_mm: the prepare step's
            normalisation and geometry, copied from the training data's manifest.
        position_tolerance: retrieval position filter half-width.
        steps: default sampling steps.
        files: role -> file or folder name inside ``root`` (bbdm, controlnet, encoder, kb).
    """

    name: str
    root: Path
    description: str
    source: str
    target: str
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    mri_percentiles: tuple[float, float] = MRI_PERCENTILES
    margin_voxels: int = 4
    slice_spacing_mm: float = 1.0
    position_tolerance: float = 0.1
    steps: int = 10
    files: dict[str, str] = field(
        default_factory=lambda: {"bbdm": "bbdm.pt", "controlnet": "controlnet.pt", "encoder": "encoder.pt", "kb": "kb"}
    )

    @property
    def source_modality(self) -> str:
        """``"ct"`` or ``"mri"``: how inputs are normalised."""
        return "ct" if self.source == "ct" else "mri"

    @property
    def input_modality(self) -> str:
        """The input's Modality as DICOM names it (``"CT"`` or ``"MR"``): which series to read."""
        return "CT" if self.source_modality == "ct" else "MR"

    def path(self, role: str) -> Path | None:
        """The file for ``role``, or None when the preset has none (e.g. no ControlNet)."""
        name = self.files.get(role)
        if name is None:
            return None
        path = self.root / name
        return path if path.exists() else None

    def required(self, role: str) -> Path:
        """Like :meth:`path` but a missing file is an error naming it."""
        path = self.path(role)
        if path is None:
            raise ValueError(f"{self.root}: preset {self.name!r} has no {role} ({self.files.get(role, role)} missing)")
        return path

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of every weight file (first 16 hex digits): the version a result came from."""
        out = {}
        for role in ("bbdm", "controlnet", "encoder"):
            path = self.path(role)
            if path is not None:
                out[role] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        kb_manifest = self.path("kb")
        if kb_manifest is not None and (kb_manifest / "manifest.json").is_file():
            out["kb"] = hashlib.sha256((kb_manifest / "manifest.json").read_bytes()).hexdigest()[:16]
        return out


def resolve_preset_root(
    name_or_path: str | os.PathLike[str], weights_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A preset name (looked up in ``weights_dir``) or a folder path -> the folder."""
    candidate = Path(name_or_path)
    if (candidate / PRESET_FILE).is_file():
        return candidate
    root = Path(weights_dir or DEFAULT_WEIGHTS_DIR) / str(name_or_path)
    if (root / PRESET_FILE).is_file():
        return root
    available = sorted(
        p.name for p in Path(weights_dir or DEFAULT_WEIGHTS_DIR).glob(f"*/{PRESET_FILE}") for p in [p.parent]
    )
    raise ValueError(
        f"unknown preset {str(name_or_path)!r}: no {PRESET_FILE} there or in "
        f"{weights_dir or DEFAULT_WEIGHTS_DIR} (available: {', '.join(available) or 'none'})"
    )


def load_preset(name_or_path: str | os.PathLike[str], weights_dir: str | os.PathLike[str] | None = None) -> Preset:
    """Load a preset by name or folder.

    Raises:
        ValueError: unknown preset or an unreadable/invalid ``preset.json``.
    """
    root = resolve_preset_root(name_or_path, weights_dir)
    try:
        values = json.loads((root / PRESET_FILE).read_text())
        return Preset(
            root=root,
            **{
                **values,
                "ct_window_hu": tuple(values.get("ct_window_hu", ORIGINAL_CT_WINDOW_HU)),
                "mri_percentiles": tuple(values.get("mri_percentiles", MRI_PERCENTILES)),
            },
        )
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{root / PRESET_FILE}: not a valid preset file ({error})") from error


def write_preset(
    root: str | os.PathLike[str], name: str, description: str, prepared_manifest: dict, **options: object
) -> Preset:
    """Write ``preset.json`` in ``root`` from the training data's manifest (atomically)."""
    config = prepared_manifest["config"]
    preset = Preset(
        name=name,
        root=Path(root),
        description=description,
        source=prepared_manifest["source"],
        target=prepared_manifest["target"],
        ct_window_hu=tuple(config["ct_window_hu"]),
        mri_percentiles=tuple(config["mri_percentiles"]),
        margin_voxels=int(config["margin_voxels"]),
        slice_spacing_mm=float(config["z_spacing_mm"]),
        **options,
    )
    values = asdict(preset)
    del values["root"]
    with atomic_path(Path(root) / PRESET_FILE) as temporary:
        temporary.write_text(json.dumps(values, indent=1))
    return preset


def assemble_preset(
    out: str | os.PathLike[str],
    name: str,
    description: str,
    prepared: str | os.PathLike[str],
    bbdm: str | os.PathLike[str],
    encoder: str | os.PathLike[str],
    kb: str | os.PathLike[str],
    controlnet: str | os.PathLike[str] | None = None,
    **options: object,
) -> Preset:
    """Copy trained files into a new preset folder (written atomically) with its ``preset.json``.

    Args:
        out: the preset folder (e.g. ``model_weights/ct2mri``); replaced when complete.
        name, description: see :class:`Preset`.
        prepared: the prepared dataset the models were trained on (its manifest gives the
            normalisation and geometry).
        bbdm, encoder, controlnet: the weight files (``model.pt``, ``encoder.pt``, ``controlnet.pt``).
        kb: the knowledge-base folder.
        options: other :class:`Preset` fields (``steps``, ``position_tolerance``).

    Raises:
        ValueError: a missing input.
    """
    sources = {"bbdm": Path(bbdm), "encoder": Path(encoder), "kb": Path(kb)}
    if controlnet is not None:
        sources["controlnet"] = Path(controlnet)
    manifest_path = Path(prepared) / "manifest.json"
    for role, path in {**sources, "prepared manifest": manifest_path}.items():
        if not path.exists():
            raise ValueError(f"{path}: {role} not found")
    manifest = json.loads(manifest_path.read_text())
    files = {"bbdm": "bbdm.pt", "controlnet": "controlnet.pt", "encoder": "encoder.pt", "kb": "kb"}
    with atomic_directory(out) as staging:
        for role, path in sources.items():
            if path.is_dir():
                shutil.copytree(path, staging / files[role])
            else:
                shutil.copy2(path, staging / files[role])
        write_preset(staging, name, description, manifest, files=files, **options)
    return load_preset(out)
