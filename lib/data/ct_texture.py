"""Real CT texture for the synthetic CT: noise, its correlation, slice profile and tissue HU.

The numbers come from real head CTs (``ct_texture.json`` beside this module, written by
``python -m bench.ct_texture fit``; the method is in :mod:`lib.data.ct_texture_fit`), all on
the synthesis grid: axial slices resampled in-plane to 1 mm. Each real scan gives one
:class:`ScanTexture`:

* noise (:class:`NoiseModel`): white noise shaped in-plane by a Gaussian kernel of standard
  deviation ``kernel_mm`` (noise power spectrum ``A exp(-4 pi^2 kernel^2 f^2)``), and through
  the slices by the slice profile, a Gaussian of full width at half maximum ``thickness_mm``;
  ``sd_hu`` is the standard deviation in one slice;
* tissue: median HU of CSF, grey and white matter and their spreads, and ``tissue_sd_hu``, the
  part of the white-matter spread that noise does not explain (0 when noise explains it all);
* the rim (:class:`RimModel`): brain HU rise towards the skull (beam hardening that the
  scanner's correction leaves, and cupping), ``hu * exp(-d / length_mm)`` at distance ``d``
  from the brain's edge.

The synthesis (:func:`lib.data.synthesis.draw_appearance`) draws each pseudo-subject's
appearance between two of these scans.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import fft, ndimage

__all__ = [
    "FWHM_PER_SIGMA",
    "GRID_MM",
    "TEXTURE_FILE",
    "NoiseModel",
    "RimModel",
    "ScanTexture",
    "load_scan_textures",
    "save_scan_textures",
]

TEXTURE_FILE = Path(__file__).with_name("ct_texture.json")
# The synthesis grid: every texture number is measured on axial slices resampled to this.
GRID_MM = 1.0
# Full width at half maximum of a Gaussian, in standard deviations: 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gaussian_band_integral(kernel_mm: float, pixel_mm: float) -> float:
    """``integral over |f| < 1/(2 pixel) of exp(-4 pi^2 kernel^2 f^2) df`` (one axis)."""
    if kernel_mm <= 0:
        return 1.0 / pixel_mm
    return math.erf(math.pi * kernel_mm / pixel_mm) / (2.0 * math.sqrt(math.pi) * kernel_mm)


@dataclass(frozen=True)
class NoiseModel:
    """CT noise: Gaussian-shaped in-plane, correlated through the slices by the slice profile.

    Attributes:
        sd_hu: standard deviation of the noise in one axial slice (HU).
        kernel_mm: standard deviation of the in-plane Gaussian that shapes white noise (mm);
            0 is white noise. The noise autocorrelation is Gaussian with SD ``sqrt(2) kernel``.
        thickness_mm: full width at half maximum of the Gaussian slice profile (mm); the
            noise of slices ``d`` mm apart correlates by ``exp(-(d * FWHM_PER_SIGMA / thickness)^2 / 4)``.
            0 leaves the slices independent.
    """

    sd_hu: float
    kernel_mm: float
    thickness_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.sd_hu < 0 or self.kernel_mm < 0 or self.thickness_mm < 0:
            raise ValueError(f"noise parameters must be non-negative, got {self}")

    def in_plane_nps(self, frequency: np.ndarray, pixel_mm: float = GRID_MM) -> np.ndarray:
        """The radial in-plane noise power spectrum (HU^2 mm^2) at ``frequency`` (cycles/mm).

        Normalised so that its integral over the Nyquist square of ``pixel_mm`` pixels is
        ``sd_hu ** 2``.
        """
        band = _gaussian_band_integral(self.kernel_mm, pixel_mm)
        amplitude = self.sd_hu**2 / band**2
        return amplitude * np.exp(-4.0 * math.pi**2 * self.kernel_mm**2 * np.asarray(frequency, dtype=np.float64) ** 2)

    def slice_correlation(self, distance_mm: float) -> float:
        """Correlation of the noise of two slices ``distance_mm`` apart (Gaussian slice profile)."""
        if self.thickness_mm <= 0:
            return 1.0 if distance_mm == 0 else 0.0
        sigma = self.thickness_mm / FWHM_PER_SIGMA
        return math.exp(-(distance_mm**2) / (4.0 * sigma**2))

    def sample(
        self,
        shape: tuple[int, int, int],
        rng: np.random.Generator,
        voxel_size: np.ndarray | tuple[float, float, float] = (GRID_MM, GRID_MM, GRID_MM),
    ) -> np.ndarray:
        """A noise field with this model's spectrum, float32 ``(X, Y, Z)`` (axial slices last).

        White Gaussian noise is filtered in the Fourier domain by
        ``exp(-2 pi^2 (kernel^2 (fx^2 + fy^2) + sigma_z^2 fz^2))``, ``sigma_z`` the slice
        profile's SD, and scaled so that its expected variance is ``sd_hu ** 2`` (Parseval:
        the variance of filtered unit white noise is the mean squared filter gain). The
        field is periodic across the volume edges, which a brain-only CT never shows.

        Random draws: one standard normal field of ``shape``.
        """
        white = rng.standard_normal(tuple(int(n) for n in shape), dtype=np.float32)
        if self.sd_hu == 0:
            return np.zeros_like(white)
        if self.kernel_mm == 0 and self.thickness_mm == 0:
            return white * np.float32(self.sd_hu)
        sigmas = (self.kernel_mm, self.kernel_mm, self.thickness_mm / FWHM_PER_SIGMA)
        gains = []
        for axis, (n, size, sigma) in enumerate(zip(white.shape, voxel_size, sigmas)):
            frequency = fft.rfftfreq(n, size) if axis == 2 else fft.fftfreq(n, size)
            gains.append(np.exp(-2.0 * math.pi**2 * sigma**2 * frequency**2).astype(np.float32))
        # Mean squared gain over the FULL spectrum: the last axis' half spectrum stands for both halves.
        full_z = np.exp(-4.0 * math.pi**2 * sigmas[2] ** 2 * fft.fftfreq(white.shape[2], voxel_size[2]) ** 2)
        power = float(np.mean(gains[0] ** 2)) * float(np.mean(gains[1] ** 2)) * float(np.mean(full_z))
        spectrum = fft.rfftn(white, workers=1)
        spectrum *= gains[0][:, None, None]
        spectrum *= gains[1][None, :, None]
        spectrum *= gains[2][None, None, :]
        noise = fft.irfftn(spectrum, s=white.shape, workers=1).astype(np.float32, copy=False)
        noise *= np.float32(self.sd_hu / math.sqrt(power))
        return noise


@dataclass(frozen=True)
class RimModel:
    """The rise of brain HU towards the skull: ``hu * exp(-d / length_mm)``, ``d`` mm from the brain's edge.

    Attributes:
        hu: the rise extrapolated to the edge (HU); 0 for none.
        length_mm: how far in it reaches (decay length, mm).
    """

    hu: float = 0.0
    length_mm: float = 10.0

    def __post_init__(self) -> None:
        if self.length_mm <= 0:
            raise ValueError(f"length_mm must be positive, got {self.length_mm}")

    def offset(self, mask: np.ndarray, voxel_size: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """float32 ``(X, Y, Z)`` HU to add inside ``mask`` (0 outside)."""
        mask = np.asarray(mask, dtype=bool)
        if self.hu == 0 or not mask.any():
            return np.zeros(mask.shape, dtype=np.float32)
        distance = ndimage.distance_transform_edt(mask, sampling=np.asarray(voxel_size, dtype=np.float64))
        return np.where(mask, self.hu * np.exp(-distance / self.length_mm), 0.0).astype(np.float32)


@dataclass(frozen=True)
class ScanTexture:
    """The texture of one real CT scan, measured on its brain (see the module docstring).

    Attributes:
        name: short name of the scan.
        source: what it is and where it came from (file, series, thickness).
        class_hu: median HU of (CSF, grey, white matter).
        class_sd_hu: spread (robust SD) of (CSF, grey, white matter) HU, noise included.
        noise: the noise model.
        tissue_sd_hu: white-matter spread not explained by noise,
            ``sqrt(max(0, sd_white^2 - sd_noise^2))``.
        rim: the HU rise towards the skull.
        slice_spacing_mm: distance between the scan's slices.
        adjacent_slice_correlation: measured correlation of the noise of neighbouring slices.
        nominal_thickness_mm: the slice thickness the scan declares (None when unknown); the
            noise model's ``thickness_mm`` is estimated from the correlation.
    """

    name: str
    source: str
    class_hu: tuple[float, float, float]
    class_sd_hu: tuple[float, float, float]
    noise: NoiseModel
    tissue_sd_hu: float
    rim: RimModel
    slice_spacing_mm: float
    adjacent_slice_correlation: float
    nominal_thickness_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (numbers rounded to what the measurement supports)."""
        record = asdict(self)
        for key in ("noise", "rim"):
            record[key] = {name: round(float(value), 3) for name, value in record[key].items()}
        for key in ("class_hu", "class_sd_hu"):
            record[key] = [round(float(v), 2) for v in record[key]]
        for key in ("tissue_sd_hu", "slice_spacing_mm", "adjacent_slice_correlation"):
            record[key] = round(float(record[key]), 3)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ScanTexture:
        """The inverse of :meth:`to_dict`."""
        nominal = record.get("nominal_thickness_mm")
        return cls(
            name=str(record["name"]),
            source=str(record["source"]),
            class_hu=tuple(float(v) for v in record["class_hu"]),  # type: ignore[arg-type]
            class_sd_hu=tuple(float(v) for v in record["class_sd_hu"]),  # type: ignore[arg-type]
            noise=NoiseModel(**{key: float(value) for key, value in record["noise"].items()}),
            tissue_sd_hu=float(record["tissue_sd_hu"]),
            rim=RimModel(**{key: float(value) for key, value in record["rim"].items()}),
            slice_spacing_mm=float(record["slice_spacing_mm"]),
            adjacent_slice_correlation=float(record["adjacent_slice_correlation"]),
            nominal_thickness_mm=None if nominal is None else float(nominal),
        )


def save_scan_textures(
    textures: list[ScanTexture] | tuple[ScanTexture, ...], path: str | os.PathLike[str], method: str
) -> Path:
    """Write the textures with a description of the method as JSON."""
    path = Path(path)
    document = {"method": method, "grid_mm": GRID_MM, "scans": [texture.to_dict() for texture in textures]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load_scan_textures(path: str | os.PathLike[str] = TEXTURE_FILE) -> tuple[ScanTexture, ...]:
    """The fitted textures of the real scans (``ct_texture.json`` by default).

    Raises:
        ValueError: the file holds no scan.
    """
    document = json.loads(Path(path).read_text())
    textures = tuple(ScanTexture.from_dict(record) for record in document["scans"])
    if not textures:
        raise ValueError(f"{path}: no scan texture")
    return textures
