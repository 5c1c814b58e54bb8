"""ReBrainPipeline: a sparse CT volume in, a dense synthetic MRI volume out (METHOD.md 3, 4, 6).

For every slice of the dense target grid:

1. y = the acquired CT slice, or the SLERP of its acquired neighbours at the gap fraction
   alpha (section 4); with 2.5-D models the neighbour channels come from the same dense stack.
2. Retrieval: y is embedded and searched in the knowledge base with the position filter;
   success when the cosine similarity reaches tau.
3. Control: the retrieved reference CT slice r on success; otherwise the SLERP of the
   neighbouring acquired slices (for a gap slice that is y itself; an acquired slice is its
   own neighbour).
4. The controlled BBDM samples the MRI slice from y and the control, batched across slices;
   with ``samples > 1`` (stochastic, eta > 0) the output is the mean and the per-voxel
   standard deviation is the uncertainty. The network runs in the options' ``precision``
   (bfloat16 where the device computes it natively, by default); the sampler's arithmetic
   stays float32.

That is the method (``rebrain``); the evaluation's baselines change steps 2 to 4, each as an
object of :mod:`lib.reconstruction_methods` that the pipeline asks what to retrieve, what
guides a slice and how the slices are filled. The result (:class:`Reconstruction`, its
:class:`SliceRecord` and :class:`Summary`) is defined in :mod:`lib.reconstruction`.

The summary also carries two checks that need no ground truth (:mod:`lib.consistency`): for a
CT input, whether the synthetic T1 orders the CT's CSF, grey and white matter as a real T1 does,
and for every input, how much the output jumps where acquired and generated slices meet.

The output lies on the dense grid in the input's physical frame (same in-plane grid, slices
along the input's slice normal) and carries a per-slice provenance record. No identifier of a
reference patient is recorded: knowledge-base entries carry anonymised subject keys only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lib.consistency import AcquiredCt, acquired_ct, atlas_tissue_check, measure_banding, tissue_check
from lib.data.atlas import atlas_priors
from lib.data.ct_alignment import align_to_template, too_short_to_register
from lib.data.ct_brain import BrainExtraction, extract_brain
from lib.data.destripe import DESTRIPE_SCALE_MM, smooth_along_z, stripe_sigma_slices
from lib.data.model_frame import ModelFrame, foreground_mask, normalise_source
from lib.data.synthesis import mni_ct_atlas
from lib.diffusion.sampler import translate_slices
from lib.diffusion.slerp import slerp
from lib.io.volume import DenseGrid, Volume, dense_grid
from lib.models.controlnet import ControlledDenoiser, load_controlled_denoiser
from lib.models.denoiser import load_bbdm
from lib.models.device import Precision, inference_memory_format, resolve_device, resolve_inference_precision
from lib.models.retrieval_encoder import RetrievalEncoder, embed_slices, encoder_hash, load_retrieval_encoder
from lib.presets import Preset
from lib.progress import ProgressFn, report
from lib.reconstruction import Reconstruction, SliceRecord, Summary
from lib.reconstruction_methods import GapFilling, SlicePlan, gap_filling
from lib.reconstruction_options import ReconstructionOptions
from lib.retrieval.knowledge_base import KnowledgeBase

if TYPE_CHECKING:
    from lib.models.denoiser import BBDMSpec

# Reconstruction and SliceRecord live in lib.reconstruction (no torch); imported from here too.
__all__ = ["ReBrainPipeline", "Reconstruction", "ReconstructionOptions", "SliceRecord", "dense_slices"]

# Outside the extracted brain a real CT is set to air, as the brain-only training CTs are.
OUTSIDE_BRAIN_HU = -1000.0
# A CT input must have a voxel below this (air is about -1000 HU; fat, the lowest tissue, -100).
AIR_CHECK_HU = -200.0
# The atlas half of the tissue check needs a brain of about this size (ml) on the output grid:
# its affine fit to a cut of a few slices is not pinned down (a whole brain is ~1200 ml).
MIN_ATLAS_BRAIN_ML = 200.0


def dense_slices(acquired: np.ndarray, acquired_mask: np.ndarray, grid: DenseGrid) -> tuple[np.ndarray, np.ndarray]:
    """The BBDM input y and the brain mask of every dense-grid slice, (Z, S, S) each.

    Section 4: a gap slice's y is the SLERP of its acquired neighbours at the gap fraction (an
    acquired slice is both its neighbours with alpha 0, so it comes through unchanged); its
    mask is the nearer neighbour's.
    """
    y = slerp(acquired[grid.lower], acquired[grid.upper], grid.alpha)
    mask = np.where((grid.alpha < 0.5)[:, None, None], acquired_mask[grid.lower], acquired_mask[grid.upper])
    return np.where(mask, y, -1.0).astype(np.float32), mask


@dataclass(eq=False, repr=False)
class ReBrainPipeline:
    """The trained models of one preset, ready to reconstruct volumes.

    Build it with :meth:`from_preset` (load a preset folder's weights) or :meth:`from_parts`
    (models already loaded, e.g. an evaluation variant's); both check that the parts fit.

    Attributes:
        model: the BBDM denoiser, or a :class:`ControlledDenoiser` with its ControlNet branch.
        config: the BBDM's config (image size, neighbours, bridge settings), as loaded with it.
        encoder: the retrieval encoder.
        kb: a knowledge base of that encoder's embeddings.
        preset: the preset the parts belong to (settings, names, weight versions).
        device: where the models run.
        versions: the preset's weight versions (:meth:`lib.presets.Preset.fingerprint`).

    Raises:
        ValueError: knowledge-base slices of another size than the BBDM's.
    """

    model: torch.nn.Module
    config: BBDMSpec
    encoder: RetrievalEncoder
    kb: KnowledgeBase
    preset: Preset
    device: torch.device
    versions: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        slice_shape = self.kb.manifest.slice_shape
        if slice_shape[0] != self.config.image_size:
            raise ValueError(
                f"{self.preset.root}: knowledge base slices are {slice_shape}, the BBDM works at "
                f"{self.config.image_size}"
            )
        self.versions = self.preset.fingerprint()
        # Once, not on every sampling call: the layout depends on the device only.
        self.model.to(memory_format=inference_memory_format(self.device))  # in place, the ControlNet's too

    @classmethod
    def from_preset(cls, preset: Preset, device: str = "cpu") -> ReBrainPipeline:
        """Load a preset folder's weights and knowledge base (as nnU-Net's
        ``initialize_from_trained_model_folder``).

        Args:
            preset: the preset (see :mod:`lib.presets`).
            device: ``auto``, ``cpu`` or ``cuda``.

        Raises:
            ValueError: a missing weight file, a knowledge base built with another encoder, or
                one whose slices do not fit the BBDM.
        """
        resolved = resolve_device(device)
        controlnet_path = preset.path("controlnet")
        if controlnet_path is not None:
            model, config = load_controlled_denoiser(preset.required("bbdm"), controlnet_path, resolved)
        else:
            model, config = load_bbdm(preset.required("bbdm"), resolved)
        encoder, _ = load_retrieval_encoder(preset.required("encoder"), resolved)
        knowledge_base = KnowledgeBase.load(preset.required("kb"), expected_encoder_hash=encoder_hash(encoder))
        return cls(model, config, encoder, knowledge_base, preset, resolved)

    @classmethod
    def from_parts(
        cls,
        model: torch.nn.Module,
        config: BBDMSpec,
        encoder: RetrievalEncoder,
        knowledge_base: KnowledgeBase,
        preset: Preset,
        device: str | torch.device = "cpu",
    ) -> ReBrainPipeline:
        """A pipeline of models already loaded (as nnU-Net's ``manual_initialization``).

        Args:
            model, config, encoder, knowledge_base, preset: see the class attributes.
            device: ``auto``, ``cpu``, ``cuda`` or a device; the models are moved there.

        Raises:
            ValueError: knowledge-base slices of another size than the BBDM's.
        """
        resolved = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(model.to(resolved), config, encoder.to(resolved), knowledge_base, preset, resolved)

    @property
    def has_controlnet(self) -> bool:
        """Whether the preset has a trained ControlNet branch."""
        return isinstance(self.model, ControlledDenoiser)

    def check_modality(self, volume: Volume) -> None:
        """Refuse an input of the wrong modality (e.g. an MR volume for a CT preset).

        Raises:
            ValueError: naming the input and both modalities, or a "CT" without any air.
        """
        if volume.modality in ("CT", "MR") and volume.modality != self.preset.input_modality:
            raise ValueError(
                f"{volume.source}: a {volume.modality} volume, but preset {self.preset.name!r} translates "
                f"{self.preset.source} input"
            )
        # A NIfTI file does not say what it holds: a CT in HU has air (about -1000 HU) around the
        # head, an MR image has no values below zero.
        if self.preset.input_modality == "CT" and float(volume.array.min()) > AIR_CHECK_HU:
            raise ValueError(
                f"{volume.source}: values {float(volume.array.min()):.4g} to {float(volume.array.max()):.4g} "
                "do not look like a CT in Hounsfield units "
                f"(no air below {AIR_CHECK_HU:.0f} HU); preset {self.preset.name!r} needs a head CT"
            )

    def reconstruct(
        self,
        volume: Volume,
        options: ReconstructionOptions = ReconstructionOptions(),
        progress: ProgressFn | None = None,
    ) -> Reconstruction:
        """Reconstruct the dense synthetic MRI of a (sparse) input volume.

        Args:
            volume: the acquired slices (CT in HU for CT presets) in any in-plane size.
            options: see :class:`ReconstructionOptions`.
            progress: called as ``progress(done, total, "")`` in sampling work units.

        Raises:
            ValueError: wrong modality, no foreground, bad options; for a real head CT, not a
                head, too little brain, or a failed registration to the template
                (:class:`lib.io.errors.VolumeReadError`, naming the input).
        """
        self.check_modality(volume)
        started = time.perf_counter()
        grid = dense_grid(volume, options.effective_spacing(self.preset))
        modality = self.preset.source_modality
        extraction = extract_brain(volume) if modality == "ct" and options.brain_extraction else None
        if extraction is not None:
            source = np.where(extraction.mask, volume.array, OUTSIDE_BRAIN_HU).astype(np.float32)
            mask = extraction.mask
        else:
            source = volume.array
            mask = foreground_mask(source, modality)
        frame = ModelFrame.fit(
            mask, volume.positions, volume.pixel_spacing, self.config.image_size, self.preset.margin_voxels
        )
        unit = normalise_source(source, mask, modality, self.preset.ct_window_hu, self.preset.mri_percentiles)
        acquired, acquired_mask = frame.to_model(unit, mask)

        y, dense_model_mask = dense_slices(acquired, acquired_mask, grid)
        positions, alignment_record = self._positions(volume, extraction, frame, grid, options)
        prepared_s = time.perf_counter() - started

        method = gap_filling(options.method)
        controlled = method.guided_by(self.has_controlnet and options.use_controlnet)
        precision = resolve_inference_precision(options.precision, self.device)
        started = time.perf_counter()
        retrieval = self._retrieve(y, positions, options) if method.retrieves else None
        control, references, records = self._controls(y, grid, positions, retrieval, method, controlled)
        retrieval_s = time.perf_counter() - started

        started = time.perf_counter()
        plan = SlicePlan(
            y=y, acquired=acquired, control=control, references=references, grid=grid, controlled=controlled
        )

        def sample(condition: np.ndarray, control: np.ndarray, use_control: bool) -> tuple[np.ndarray, np.ndarray]:
            return self._sample(condition, control, options, progress, use_control, precision)

        mean, std = method.fill(plan, sample, self.kb)
        sampling_s = time.perf_counter() - started

        started = time.perf_counter()
        mean = np.where(dense_model_mask, mean, -1.0)
        destriping = self._destripe_settings(frame, volume, grid, options)
        if destriping["applied"]:
            mean = smooth_along_z(mean, dense_model_mask, destriping["sigma_xy_pixels"], destriping["sigma_z_slices"])
        shape_xy = volume.shape[:2]
        mask_dense = np.where((grid.alpha < 0.5)[None, None, :], mask[:, :, grid.lower], mask[:, :, grid.upper])
        # [-1, 1] -> [0, 1]: the output is an MRI without physical units; std scales by half.
        mri = np.where(mask_dense, np.clip(frame.from_model((mean + 1.0) / 2.0, shape_xy, 0.0), 0.0, 1.0), 0.0).astype(
            np.float32
        )
        uncertainty = np.where(mask_dense, frame.from_model(std / 2.0, shape_xy, 0.0), 0.0).astype(np.float32)
        for record in records:
            brain = mask_dense[:, :, record.index]
            record.uncertainty_mean = float(uncertainty[:, :, record.index][brain].mean()) if brain.any() else 0.0
        ct = grid.interpolate(volume.array, axis=2)
        # Checks without ground truth (lib/consistency.py): the CT's HU classes against the T1
        # (CT input only: other inputs have no HU), and the stripes at acquired slices. The CT's
        # acquired slices are smoothed once for both halves of the tissue check.
        tissue = {}
        if modality == "ct":
            prepared = acquired_ct(ct, mask_dense, grid.acquired, grid.voxel_spacing[:2])
            tissue = {
                **tissue_check(ct, mri, mask_dense, grid.acquired, grid.voxel_spacing[:2], prepared=prepared).to_dict(),
                "atlas": self._atlas_check(ct, mri, mask_dense, grid, prepared),
            }
        banding = {**measure_banding(mri, mask_dense, grid.acquired).to_dict(), "destriping": destriping}
        output_s = time.perf_counter() - started

        summary = self._summary(
            records,
            options,
            method,
            controlled,
            precision,
            {"prepare": prepared_s, "retrieval": retrieval_s, "sampling": sampling_s, "output": output_s},
            self._extraction_summary(extraction, options),
            alignment_record,
            tissue,
            banding,
        )
        return Reconstruction(
            mri=mri, uncertainty=uncertainty, ct=ct, mask=mask_dense, grid=grid, slices=records, summary=summary
        )

    @staticmethod
    def _atlas_check(
        ct: np.ndarray, mri: np.ndarray, mask: np.ndarray, grid: DenseGrid, prepared: AcquiredCt
    ) -> dict[str, Any]:
        """The atlas half of the tissue check (:func:`lib.consistency.atlas_tissue_check`), or
        ``{"error": why}`` when the atlas cannot be registered (a brain too small to fit): the
        reconstruction itself is not affected."""
        brain_ml = float(mask.sum()) * float(np.prod(grid.voxel_spacing)) / 1000.0
        if brain_ml < MIN_ATLAS_BRAIN_ML:
            return {"error": f"{brain_ml:.0f} ml of brain is too little to register the atlas to"}
        painted, atlas = mni_ct_atlas()
        try:
            priors = atlas_priors(ct, mask, grid.affine, painted, atlas.mask, atlas.affine, atlas.probabilities)
        except RuntimeError as error:  # ITK: e.g. too few samples in the overlap
            return {"error": f"atlas registration failed: {str(error).strip().splitlines()[-1]}"}
        return atlas_tissue_check(
            ct, mri, mask, grid.acquired, grid.voxel_spacing[:2], priors, prepared=prepared
        ).to_dict()

    @staticmethod
    def _destripe_settings(
        frame: ModelFrame, volume: Volume, grid: DenseGrid, options: ReconstructionOptions
    ) -> dict[str, Any]:
        """How :func:`lib.data.destripe.smooth_along_z` is applied to this reconstruction (its record)."""
        sigma_z = stripe_sigma_slices(grid.acquired) if options.destripe else 0.0
        pixel_mm = (frame.rows[1] - frame.rows[0]) * float(volume.pixel_spacing[0]) / frame.size
        return {
            "applied": sigma_z > 0,
            "scale_mm": DESTRIPE_SCALE_MM,
            "sigma_xy_pixels": round(DESTRIPE_SCALE_MM / pixel_mm, 3),
            "sigma_z_slices": sigma_z,
        }

    def _positions(
        self,
        volume: Volume,
        extraction: BrainExtraction | None,
        frame: ModelFrame,
        grid: DenseGrid,
        options: ReconstructionOptions,
    ) -> tuple[np.ndarray, dict]:
        """Normalised axial position of every dense-grid slice, and a record of how it was found.

        A real head CT (its brain was extracted) is registered to the CT head template, so a
        partial or pitched scan gets the positions its slices have in a whole, atlas-aligned
        head (the knowledge base's convention). Prepared inputs (brain-only, atlas-aligned like
        the training data) and stacks too short to register use the brain's own extent.
        A registration that fails raises: no silent wrong positions.
        """
        if extraction is None:
            why_not = "no brain extraction: the input is taken as already prepared"
        elif not options.alignment:
            why_not = "turned off"
        else:
            why_not = too_short_to_register(volume)
        if why_not is None:
            alignment = align_to_template(volume)
            return alignment.normalised_positions(volume, grid.positions), {
                "applied": True,
                "positions": "CT head template",
                **alignment.summary(),
            }
        reason = f"{why_not}; positions from the brain extent of this input (right only when it covers the whole brain)"
        return frame.normalised_positions(grid.positions), {
            "applied": False,
            "positions": "brain extent",
            "reason": reason,
        }

    def _retrieve(self, y: np.ndarray, positions: np.ndarray, options: ReconstructionOptions) -> list | None:
        if not options.use_retrieval:
            return None
        embeddings = embed_slices(self.encoder, torch.from_numpy(y[:, None]).to(self.device))
        tolerance = (
            options.position_tolerance if options.position_tolerance is not None else self.preset.position_tolerance
        )
        return self.kb.query(embeddings, positions, k=1, position_tolerance=tolerance)

    def _controls(
        self,
        y: np.ndarray,
        grid: DenseGrid,
        positions: np.ndarray,
        retrieval: list | None,
        method: GapFilling,
        controlled: bool,
    ) -> tuple[np.ndarray, list[int | None], list[SliceRecord]]:
        """The control image of every slice, the entry id of the reference it uses (or None) and
        its provenance record (the method decides which references it uses and the record's
        ``control``)."""
        # The fallback control is the SLERP of the neighbours: y itself for a gap slice, and
        # the slice itself for an acquired one.
        control = y.copy()
        references: list[int | None] = []
        records = []
        for z in range(len(y)):
            result = retrieval[z] if retrieval is not None else None
            success = bool(result is not None and result.success)
            candidate = result is not None and result.entry_id is not None
            acquired = bool(grid.acquired[z])
            use_reference = method.uses_reference(success, candidate)
            references.append(result.entry_id if use_reference else None)
            if use_reference and method.guided:
                control[z] = self.kb.ct_slice(result.entry_id)
            records.append(
                SliceRecord(
                    index=z,
                    position_mm=float(grid.positions[z]),
                    normalised_position=float(positions[z]),
                    acquired=acquired,
                    source_slice=int(grid.source_index[z]) if acquired else None,
                    similarity=float(result.similarity)
                    if result is not None and np.isfinite(result.similarity)
                    else None,
                    success=success,
                    control=method.control_kind(acquired, use_reference, controlled),
                    fallback=not use_reference and not acquired and method.retrieves,
                    reference=f"{result.subject}:{result.slice_index}" if use_reference else None,
                    snap_mm=round(float(grid.snap_mm[z]), 4),
                )
            )
        return control, references, records

    def _condition(self, y: np.ndarray) -> np.ndarray:
        """(Z, 1 + 2n, S, S): each slice with its n neighbours on each side (edges repeated)."""
        n = self.config.neighbours
        index = np.clip(np.arange(len(y))[:, None] + np.arange(-n, n + 1)[None, :], 0, len(y) - 1)
        return y[index]

    def _sample(
        self,
        y: np.ndarray,
        control: np.ndarray,
        options: ReconstructionOptions,
        progress: ProgressFn | None,
        use_control: bool,
        precision: Precision,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over samples of the translated slices, (Z, S, S) each.

        ``y`` is a run of adjacent slices (its neighbours feed a 2.5-D model); ``use_control``
        false samples the BBDM alone whatever the preset has; ``precision`` is resolved
        (float32 or bfloat16).
        """
        condition = torch.from_numpy(self._condition(y))
        control_tensor = torch.from_numpy(control[:, None])
        steps = options.effective_steps(self.preset)
        chunks = [slice(start, start + options.batch_size) for start in range(0, len(y), options.batch_size)]
        total = options.samples * len(chunks) * steps
        done = 0
        mean = np.zeros(y.shape, dtype=np.float64)
        m2 = np.zeros(y.shape, dtype=np.float64)
        model = self.model if use_control else getattr(self.model, "denoiser", self.model)
        for sample in range(options.samples):
            generator = torch.Generator(device=self.device).manual_seed(options.seed + sample)
            out = np.empty(y.shape, dtype=np.float32)
            for chunk in chunks:

                def step(done_steps: int, _steps: int, _message: str = "", base: int = done) -> None:
                    report(progress, base + done_steps, total)

                translated = translate_slices(
                    model,
                    self.config,
                    condition[chunk].to(self.device),
                    steps=steps,
                    eta=options.effective_eta,
                    generator=generator,
                    progress=step,
                    control=control_tensor[chunk].to(self.device) if use_control else None,
                    precision=precision,
                )
                out[chunk] = translated[:, 0].float().cpu().numpy()
                done += steps
            # Welford's running mean and variance: one pass, no stack of all samples in memory.
            delta = out - mean
            mean += delta / (sample + 1)
            m2 += delta * (out - mean)
        std = np.sqrt(m2 / options.samples) if options.samples > 1 else np.zeros_like(mean)
        return mean.astype(np.float32), std.astype(np.float32)

    def _extraction_summary(self, extraction: BrainExtraction | None, options: ReconstructionOptions) -> dict:
        if self.preset.source_modality != "ct":
            return {"applied": False, "reason": "not a CT preset"}
        if not options.brain_extraction:
            return {"applied": False, "reason": "turned off (input already brain-only)"}
        if extraction is None:
            return {"applied": False, "reason": "no skull in the CT: treated as already brain-only"}
        return {"applied": True, **extraction.summary()}

    def _summary(
        self,
        records: list[SliceRecord],
        options: ReconstructionOptions,
        method: GapFilling,
        controlled: bool,
        precision: Precision,
        seconds: dict[str, float],
        brain_extraction: dict,
        alignment: dict,
        tissue: dict,
        banding: dict,
    ) -> Summary:
        similarities = [r.similarity for r in records if r.similarity is not None]
        generated = [r for r in records if not r.acquired]
        retrieved = options.use_retrieval and method.retrieves
        return Summary(
            synthetic=True,
            preset=self.preset.name,
            source=self.preset.source,
            target=self.preset.target,
            versions=self.versions,
            method=method.method.value,
            controlnet=controlled,
            slices=len(records),
            acquired_slices=len(records) - len(generated),
            generated_slices=len(generated),
            retrieval_success_rate=float(np.mean([r.success for r in records])) if retrieved else None,
            generated_retrieval_success_rate=float(np.mean([r.success for r in generated]))
            if retrieved and generated
            else None,
            fallback_count=sum(r.fallback for r in records),
            mean_similarity=float(np.mean(similarities)) if similarities else None,
            tau=self.kb.tau,
            uncertainty_mean=float(np.mean([r.uncertainty_mean for r in records])),
            steps=options.effective_steps(self.preset),
            samples=options.samples,
            eta=options.effective_eta,
            seed=options.seed,
            precision=precision.value,
            seconds={name: round(value, 3) for name, value in seconds.items()},
            brain_extraction=brain_extraction,
            alignment=alignment,
            tissue_check=tissue,
            banding=banding,
        )
