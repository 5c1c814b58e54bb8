"""A brain atlas's tissue maps on a subject's grid, by affine registration of skull-stripped brains.

Used where intensities alone cannot tell the tissue classes apart: on brain CT (grey and white
matter 8-12 HU apart under 3-6 HU of noise) and on BraTS T1 images whose grey/white contrast is
weak (:func:`lib.data.synthesis.tissue_model_from_t1`). The atlas is nilearn's MNI152 (its T1,
brain mask and tissue maps, :func:`lib.data.synthesis.tissue_model_from_mni`), passed in as
arrays so that this module depends on nothing above the I/O layer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["atlas_priors"]

# Brain intensities are clipped to these percentiles before registration: a few extreme voxels
# (vessels, calcification, scanner outliers up to 32767 in one BraTS T1) would waste the
# mutual information's histogram bins.
CLIP_PERCENTILES = (0.5, 99.5)
# Registration works on images smoothed and shrunk to about this voxel size (mm): tissue maps
# need an affine fit to a millimetre or two, and 1 mm volumes would cost 8 times as much.
REGISTRATION_MM = 2.0
# Fraction of the (shrunk) voxels sampled by the metric at each level.
SAMPLING_FRACTION = 0.05


def _image(array: np.ndarray, voxel_affine: np.ndarray):
    """An array as a float32 SimpleITK image in its physical geometry."""
    from lib.data.ct_alignment import volume_to_sitk
    from lib.io.volume import volume_from_voxel_affine

    return volume_to_sitk(volume_from_voxel_affine(np.asarray(array, dtype=np.float32), voxel_affine))


def _coarse(image):
    """``image`` smoothed and shrunk by whole factors to voxels of about :data:`REGISTRATION_MM`."""
    import SimpleITK as sitk

    factors = [max(1, int(round(REGISTRATION_MM / spacing))) for spacing in image.GetSpacing()]
    if max(factors) == 1:
        return image
    sigmas = [0.5 * factor * spacing for factor, spacing in zip(factors, image.GetSpacing())]
    return sitk.Shrink(sitk.SmoothingRecursiveGaussian(image, sigmas), factors)


def _brain_image(array: np.ndarray, mask: np.ndarray, voxel_affine: np.ndarray):
    """The brain (clipped, 0 outside the mask), coarse, as a SimpleITK image."""
    array = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(array[mask], CLIP_PERCENTILES)
    brain = np.where(mask, np.clip(array, low, high), np.float32(0.0))
    return _coarse(_image(brain, voxel_affine))


def atlas_priors(
    image: np.ndarray,
    mask: np.ndarray,
    voxel_affine: np.ndarray,
    atlas_image: np.ndarray,
    atlas_mask: np.ndarray,
    atlas_affine: np.ndarray,
    atlas_probabilities: np.ndarray,
    seed: int = 20240601,
) -> np.ndarray:
    """The atlas's tissue probability maps registered affinely onto a skull-stripped brain.

    Both brains are smoothed and shrunk to about :data:`REGISTRATION_MM` voxels. Stage 1
    aligns the two brain masks (mean squares, from a moments initialisation), stage 2 refines
    on the images (Mattes mutual information inside the subject's brain mask, so the atlas
    image may be another modality or scale, e.g. a painted CT or a T1). Both stages are
    two-level regular-step gradient descent, sampling :data:`SAMPLING_FRACTION` of the voxels
    (seeded by ``seed``).

    Args:
        image: ``(X, Y, Z)`` subject image; ``voxel_affine`` its orthogonal voxel-to-RAS matrix.
        mask: its brain mask.
        atlas_image: the atlas image on ``atlas_affine``; ``atlas_mask`` its brain mask.
        atlas_probabilities: ``(C, ...)`` atlas tissue maps on ``atlas_affine``.
        seed: seeds the metric sampling (not 0: SimpleITK reads 0 as "seed from the clock").

    Returns:
        float32 ``(C, X, Y, Z)`` atlas probabilities on the subject grid (0 outside the atlas).
    """
    import SimpleITK as sitk

    if seed == sitk.sitkWallClock:
        raise ValueError("seed 0 would seed the registration from the clock; use another value")
    # One thread for every filter: threads sum the metric and the image moments in a varying
    # order (maps differing by ~1e-5 between runs), and pseudo-subjects must be reproducible
    # from their seed bit for bit.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        mask = np.asarray(mask, dtype=bool)
        atlas_mask = np.asarray(atlas_mask, dtype=bool)
        fixed = _brain_image(image, mask, voxel_affine)
        moving = _brain_image(atlas_image, atlas_mask, atlas_affine)
        fixed_mask = _coarse(_image(mask, voxel_affine))
        moving_mask = _coarse(_image(atlas_mask, atlas_affine))

        def method(mutual_information: bool, shrink: list[int], smooth: list[float], step: float):
            registration = sitk.ImageRegistrationMethod()
            if mutual_information:
                registration.SetMetricAsMattesMutualInformation(32)
                registration.SetMetricFixedMask(sitk.Cast(fixed_mask > 0.5, sitk.sitkUInt8))
            else:
                registration.SetMetricAsMeanSquares()
            registration.SetMetricSamplingStrategy(registration.RANDOM)
            registration.SetMetricSamplingPercentage(SAMPLING_FRACTION, seed=seed)
            registration.SetInterpolator(sitk.sitkLinear)
            registration.SetOptimizerAsRegularStepGradientDescent(step, 1e-4, 200)
            registration.SetOptimizerScalesFromPhysicalShift()
            registration.SetShrinkFactorsPerLevel(shrink)
            registration.SetSmoothingSigmasPerLevel(smooth)
            registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
            return registration

        initial = sitk.CenteredTransformInitializer(
            fixed_mask, moving_mask, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        shape_stage = method(False, [2, 1], [4.0, 2.0], 1.0)
        shape_stage.SetInitialTransform(initial, inPlace=False)
        transform = shape_stage.Execute(fixed_mask, moving_mask)
        image_stage = method(True, [2, 1], [2.0, 0.0], 0.5)
        image_stage.SetInitialTransform(transform, inPlace=False)
        transform = image_stage.Execute(fixed, moving)

        # The maps are resampled onto the full-resolution subject grid.
        reference = _image(np.zeros(np.asarray(mask).shape, dtype=np.float32), voxel_affine)
        warped = []
        for probability in atlas_probabilities:
            resampled = sitk.Resample(_image(probability, atlas_affine), reference, transform, sitk.sitkLinear, 0.0)
            warped.append(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return np.stack(warped).astype(np.float32)
