"""The model's frame for one input volume: brain mask, square in-plane crop, resize, positions.

The models were trained on prepared slices (lib/data/prepare.py): normalised to [-1, 1],
cropped to a square box around the brain with a margin, resized to S x S, -1 outside the
brain, and tagged with the normalised axial position (0 at the lowest brain slice, 1 at the
highest). :class:`ModelFrame` applies the same steps to an input volume's slices and maps
model outputs back onto the input's in-plane grid, so a reconstruction overlays its input.

The default mask is the foreground: for CT, tissue above -500 HU (a brain-only or
skull-stripped CT; a full head CT needs brain extraction first), for MRI, voxels above 0
(skull-stripped volumes are zero outside the brain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.data.normalise import CT_WINDOW_HU, MRI_PERCENTILES, ct_to_unit, mri_to_unit

CT_FOREGROUND_HU = -500.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (an empty mask stays empty)."""
    labels, count = ndimage.label(mask)  # face connectivity: no leaks through voxel corners
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def foreground_mask(array: np.ndarray, modality: str) -> np.ndarray:
    """Brain/foreground mask of an (X, Y, Z) volume: threshold, largest component, holes filled.

    Args:
        array: values in HU for ``modality == "ct"``, scanner units otherwise.
        modality: ``"ct"`` or anything else (treated as a skull-stripped MRI).
    """
    # Noise specks and the scanner table are smaller than the head.
    mask = largest_component(array > (CT_FOREGROUND_HU if modality == "ct" else 0.0))
    # Fill holes slice by slice: ventricles are inside the brain, not background.
    return np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)


def resize_slices(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) -> (N, *size), anti-aliased bilinear (the prepare step's resampling)."""
    tensor = torch.from_numpy(np.ascontiguousarray(slices[:, None], dtype=np.float32))
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0].numpy()


@dataclass(frozen=True)
class ModelFrame:
    """Where the model's S x S slices sit in an input volume's in-plane grid.

    Attributes:
        size: S, the model's slice size.
        rows, cols: the crop box in input voxels along X and Y (may extend past the image;
            such parts are padding).
        low_mm, high_mm: slice positions (mm, the volume's ``p`` coordinate) of the lowest and
            highest slices with brain; they define the normalised axial position.
    """

    size: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    low_mm: float
    high_mm: float

    @classmethod
    def fit(
        cls,
        mask: np.ndarray,
        positions_mm: np.ndarray,
        pixel_spacing: tuple[float, float],
        size: int,
        margin_voxels: int = 4,
    ) -> ModelFrame:
        """The frame of a volume from its (X, Y, Z) brain mask and slice positions.

        The box is square in millimetres (in-plane spacing may differ between axes) with the
        prepare step's margin, measured in 1 mm voxels as there.

        Raises:
            ValueError: if the mask is empty.
        """
        if not mask.any():
            raise ValueError("no brain/foreground found in the input volume (empty mask)")
        footprint = mask.any(axis=2)
        rows, cols = np.nonzero(footprint)
        sx, sy = pixel_spacing
        centre_mm = ((rows.min() + rows.max()) / 2 * sx, (cols.min() + cols.max()) / 2 * sy)
        side_mm = max((rows.max() - rows.min() + 1) * sx, (cols.max() - cols.min() + 1) * sy) + 2 * margin_voxels
        row_start = int(round((centre_mm[0] - side_mm / 2) / sx))
        col_start = int(round((centre_mm[1] - side_mm / 2) / sy))
        brain = np.nonzero(mask.any(axis=(0, 1)))[0]
        return cls(
            size=size,
            rows=(row_start, row_start + max(int(round(side_mm / sx)), 1)),
            cols=(col_start, col_start + max(int(round(side_mm / sy)), 1)),
            low_mm=float(positions_mm[brain.min()]),
            high_mm=float(positions_mm[brain.max()]),
        )

    def normalised_positions(self, positions_mm: np.ndarray) -> np.ndarray:
        """Normalised axial positions (0 lowest brain slice, 1 highest) of slices at ``positions_mm``."""
        return (np.asarray(positions_mm, dtype=np.float64) - self.low_mm) / max(self.high_mm - self.low_mm, 1e-6)

    def crop(self, array: np.ndarray, fill: float) -> np.ndarray:
        """(X, Y, N) -> (N, box_x, box_y), padding with ``fill`` outside the image."""
        box = np.full(
            (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0], array.shape[2]), fill, dtype=np.float32
        )
        src_r = slice(max(self.rows[0], 0), min(self.rows[1], array.shape[0]))
        src_c = slice(max(self.cols[0], 0), min(self.cols[1], array.shape[1]))
        box[
            src_r.start - self.rows[0] : src_r.stop - self.rows[0],
            src_c.start - self.cols[0] : src_c.stop - self.cols[0],
        ] = array[src_r, src_c]
        return np.moveaxis(box, 2, 0)

    def to_model(self, unit: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (X, Y, N) slices and their mask -> model slices (N, S, S) and mask.

        As in prepare: the mask is resized and thresholded at one half, and the image is -1
        outside it so resizing blur never smears brain into background.
        """
        model_mask = resize_slices(self.crop(mask.astype(np.float32), 0.0), (self.size, self.size)) > 0.5
        model = np.clip(resize_slices(self.crop(unit, -1.0), (self.size, self.size)), -1.0, 1.0)
        return np.where(model_mask, model, -1.0).astype(np.float32), model_mask

    def from_model(self, slices: np.ndarray, shape_xy: tuple[int, int], fill: float) -> np.ndarray:
        """Model slices (N, S, S) -> (X, Y, N) on the input's in-plane grid (``fill`` outside the box)."""
        box = resize_slices(slices, (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]))
        out = np.full((*shape_xy, slices.shape[0]), fill, dtype=np.float32)
        dst_r = slice(max(self.rows[0], 0), min(self.rows[1], shape_xy[0]))
        dst_c = slice(max(self.cols[0], 0), min(self.cols[1], shape_xy[1]))
        out[dst_r, dst_c] = np.moveaxis(box, 0, 2)[
            dst_r.start - self.rows[0] : dst_r.stop - self.rows[0],
            dst_c.start - self.cols[0] : dst_c.stop - self.cols[0],
        ]
        return out


def normalise_source(
    array: np.ndarray,
    mask: np.ndarray,
    modality: str,
    ct_window: tuple[float, float] = CT_WINDOW_HU,
    mri_percentiles: tuple[float, float] = MRI_PERCENTILES,
) -> np.ndarray:
    """The source volume in [-1, 1] as prepare normalises it, -1 outside the mask."""
    unit = ct_to_unit(array, ct_window) if modality == "ct" else mri_to_unit(array, mask, mri_percentiles)
    return np.where(mask, unit, -1.0).astype(np.float32)
