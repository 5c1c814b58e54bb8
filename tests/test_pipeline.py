"""ReBrainPipeline on a real BraTS volume with a tiny preset: geometry, SLERP, retrieval, controls."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lib.data.sparse import simulate_sparse_volume
from lib.diffusion.slerp import slerp
from lib.io import read_volume
from lib.io.volume import dense_grid
from lib.models.device import resolve_inference_precision, supports_bf16
from lib.pipeline import ReBrainPipeline, ReconstructionOptions, dense_slices
from lib.reconstruction import Summary
from tests.test_reconstruction import (
    INPUT_KEYS,
    OUTPUT_KEYS,
    PROVENANCE_KEYS,
    SERVER_ANSWER_KEYS,
    SLICE_KEYS,
    SUMMARY_KEYS,
)
from tests.tiny_preset import make_tiny_preset


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_tiny_preset(tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def pipeline(preset):
    return ReBrainPipeline.from_preset(preset)


@pytest.fixture(scope="module")
def dense_volume(brats_case):
    """41 central 1 mm slices of a real FLAIR volume (a held-out case: not in the KB)."""
    volume = read_volume(brats_case / "t2f.nii.gz", modality="MR")
    return volume.take_slices(np.arange(50, 91))


@pytest.fixture(scope="module")
def reconstruction(pipeline, dense_volume):
    sparse = simulate_sparse_volume(dense_volume, factor=2)
    return pipeline.reconstruct(sparse, ReconstructionOptions(steps=2))


def test_output_lies_on_the_dense_grid_in_the_input_frame(reconstruction, dense_volume):
    # x2 sparsity of 41 slices keeps 0, 2, ..., 40: the dense 1 mm grid is the original one.
    assert reconstruction.mri.shape == dense_volume.shape
    np.testing.assert_allclose(reconstruction.grid.affine, dense_volume.voxel_affine(), atol=1e-6)
    assert reconstruction.mri.dtype == np.float32
    assert 0.0 <= reconstruction.mri.min() and reconstruction.mri.max() <= 1.0
    # Background stays background; the brain gets an image.
    assert np.all(reconstruction.mri[~reconstruction.mask] == 0)
    assert reconstruction.mri[reconstruction.mask].std() > 0
    assert np.all(reconstruction.uncertainty == 0)  # one deterministic sample
    # The display CT on acquired slices is the input itself.
    np.testing.assert_array_equal(reconstruction.ct[:, :, ::2], dense_volume.array[:, :, ::2])


def test_provenance_is_consistent(reconstruction, pipeline):
    records = reconstruction.slices
    assert [r.acquired for r in records] == [z % 2 == 0 for z in range(41)]
    assert [r.source_slice for r in records] == [z // 2 if z % 2 == 0 else None for z in range(41)]
    tau = pipeline.kb.tau
    for record in records:
        assert record.success == (record.similarity is not None and record.similarity >= tau)
        assert record.control == ("reference" if record.success else ("acquired" if record.acquired else "slerp"))
        assert record.fallback == (not record.success and not record.acquired)
        assert (record.reference is not None) == record.success
        if record.reference:
            subject, slice_index = record.reference.split(":")
            assert subject in set(pipeline.kb.entries["subject"]) and subject.startswith("sub-")
    summary = reconstruction.summary
    assert summary.synthetic is True
    assert summary.slices == 41 and summary.acquired_slices == 21 and summary.generated_slices == 20
    assert summary.fallback_count == sum(r.fallback for r in records)
    assert summary.retrieval_success_rate == pytest.approx(np.mean([r.success for r in records]))
    positions = [r.normalised_position for r in records]
    assert np.all(np.diff(positions) > 0)
    json.dumps(reconstruction.provenance())  # JSON-ready


def test_gap_slices_get_the_slerp_of_their_neighbours(dense_volume):
    sparse = simulate_sparse_volume(dense_volume, factor=4)
    grid = dense_grid(sparse)
    rng = np.random.default_rng(0)
    acquired = rng.uniform(-1, 1, (sparse.shape[2], 8, 8)).astype(np.float32)
    y, mask = dense_slices(acquired, np.ones_like(acquired, dtype=bool), grid)
    assert len(y) == grid.shape[2] and mask.all()
    np.testing.assert_array_equal(y[::4], acquired)
    # Slice 1 lies a quarter of the way from acquired slice 0 to acquired slice 1.
    np.testing.assert_allclose(y[1], slerp(acquired[:1], acquired[1:2], 0.25)[0], atol=1e-6)
    np.testing.assert_allclose(y[6], slerp(acquired[1:2], acquired[2:3], 0.5)[0], atol=1e-6)


def test_untrained_controlnet_leaves_the_bbdm_output_unchanged(pipeline, dense_volume, reconstruction):
    # The zero-initialised ControlNet adds exactly zero, whatever the control.
    sparse = simulate_sparse_volume(dense_volume, factor=2)
    without = pipeline.reconstruct(sparse, ReconstructionOptions(steps=2, use_controlnet=False))
    np.testing.assert_array_equal(without.mri, reconstruction.mri)
    assert all(r.control != "none" for r in reconstruction.slices)
    assert without.summary.controlnet is False


def test_without_retrieval_every_gap_slice_falls_back(pipeline, dense_volume):
    sparse = simulate_sparse_volume(dense_volume.take_slices(np.arange(0, 9)), factor=2)
    result = pipeline.reconstruct(sparse, ReconstructionOptions(steps=2, use_retrieval=False))
    assert [r.fallback for r in result.slices] == [z % 2 == 1 for z in range(9)]
    assert all(r.similarity is None and not r.success for r in result.slices)
    assert result.summary.retrieval_success_rate is None


def test_several_samples_give_a_mean_and_an_uncertainty(pipeline, dense_volume):
    volume = simulate_sparse_volume(dense_volume.take_slices(np.arange(16, 25)), factor=2)
    options = ReconstructionOptions(steps=3, samples=3, seed=7)
    first = pipeline.reconstruct(volume, options)
    again = pipeline.reconstruct(volume, options)
    np.testing.assert_array_equal(first.mri, again.mri)  # seeded
    assert first.uncertainty[first.mask].mean() > 0
    assert np.all(first.uncertainty[~first.mask] == 0)
    other_seed = pipeline.reconstruct(volume, replace(options, seed=8))
    assert not np.array_equal(other_seed.mri, first.mri)
    assert all(r.uncertainty_mean > 0 for r in first.slices)


def test_bad_inputs_are_refused(pipeline, dense_volume):
    with pytest.raises(ValueError, match="MR volume|CT volume"):
        pipeline.reconstruct(replace(dense_volume, modality="CT"))
    with pytest.raises(ValueError, match="no brain"):
        pipeline.reconstruct(replace(dense_volume, array=np.zeros_like(dense_volume.array)))
    with pytest.raises(ValueError, match="eta > 0"):
        ReconstructionOptions(samples=2, eta=0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 1),
        ("target_spacing", 0.0),
        ("target_spacing", -1.0),
        ("target_spacing", float("nan")),
        ("position_tolerance", -0.1),
        ("eta", float("nan")),
        ("samples", 0),
        ("batch_size", 0),
        ("precision", "fp16"),
    ],
)
def test_out_of_range_options_are_refused_not_read_as_the_default(field, value):
    """0 used to mean "the preset's" for steps and target_spacing (``x or default``)."""
    with pytest.raises(ValueError, match=f"^{field} must be"):
        ReconstructionOptions(**{field: value})


def test_unset_options_take_the_presets_values(preset):
    assert ReconstructionOptions().effective_steps(preset) == preset.steps
    assert ReconstructionOptions().effective_spacing(preset) == preset.slice_spacing_mm
    assert ReconstructionOptions(steps=4, target_spacing=0.5).effective_steps(preset) == 4
    assert ReconstructionOptions(steps=4, target_spacing=0.5).effective_spacing(preset) == 0.5


def weights_in(pipeline: ReBrainPipeline, memory_format) -> bool:
    """Whether every convolution weight of the pipeline's model (ControlNet included) is in ``memory_format``."""
    return all(p.is_contiguous(memory_format=memory_format) for p in pipeline.model.parameters() if p.dim() == 4)


def test_the_summary_records_the_precision_and_the_weights_run_channels_last(pipeline, dense_volume, reconstruction):
    """auto samples in bf16 where the CPU computes it natively; on a CPU the weights run
    channels_last in either precision, and switching precision back and forth changes nothing."""
    assert reconstruction.summary.precision == resolve_inference_precision("auto", pipeline.device).value
    volume = simulate_sparse_volume(dense_volume.take_slices(np.arange(0, 9)), factor=2)
    fp32 = pipeline.reconstruct(volume, ReconstructionOptions(steps=2, precision="fp32"))
    assert fp32.summary.precision == "fp32" and weights_in(pipeline, torch.channels_last)
    if not supports_bf16(pipeline.device):
        with pytest.warns(UserWarning, match="no native bfloat16"):
            result = pipeline.reconstruct(volume, ReconstructionOptions(steps=2, precision="bf16"))
        assert result.summary.precision == "fp32"
        return
    bf16 = pipeline.reconstruct(volume, ReconstructionOptions(steps=2, precision="bf16"))
    assert bf16.summary.precision == "bf16" and weights_in(pipeline, torch.channels_last)
    again = pipeline.reconstruct(volume, ReconstructionOptions(steps=2, precision="fp32"))
    np.testing.assert_array_equal(again.mri, fp32.mri)


def test_progress_reports_sampling_steps_without_a_message(pipeline, dense_volume):
    volume = simulate_sparse_volume(dense_volume.take_slices(np.arange(0, 9)), factor=2)
    calls = []
    pipeline.reconstruct(volume, ReconstructionOptions(steps=2, batch_size=4), lambda *call: calls.append(call))
    # 9 slices in batches of 4: 3 chunks of 2 steps.
    assert [done for done, _, _ in calls] == list(range(1, 7))
    assert {(total, message) for _, total, message in calls} == {(6, "")}


def test_a_pipeline_from_parts_is_the_pipeline_from_the_preset(pipeline, preset, dense_volume):
    volume = simulate_sparse_volume(dense_volume.take_slices(np.arange(0, 9)), factor=2)
    parts = (pipeline.model, pipeline.config, pipeline.encoder, pipeline.kb, preset)
    again = ReBrainPipeline.from_parts(*parts, device="cpu")
    options = ReconstructionOptions(steps=2)
    np.testing.assert_array_equal(again.reconstruct(volume, options).mri, pipeline.reconstruct(volume, options).mri)
    assert again.versions == pipeline.versions
    with pytest.raises(ValueError, match=r"knowledge base slices are \[32, 32\], the BBDM works at 64"):
        ReBrainPipeline.from_parts(pipeline.model, SimpleNamespace(image_size=64), *parts[2:])


def test_an_mri_input_gets_the_banding_measure_and_no_tissue_check(reconstruction):
    summary = reconstruction.summary
    assert summary.tissue_check == {}  # a FLAIR has no Hounsfield units to classify
    # x2 sparsity: each generated slice lies between two acquired ones; no two generated in a row.
    assert summary.banding["pairs"] == {"acquired_generated": 40, "generated_generated": 0}
    assert summary.banding["brightness_ratio"] is None and summary.banding["voxel_ratio"] is None
    assert summary.banding["voxel_jump"]["acquired_generated"] > 0


def test_destriping_is_recorded_and_only_moves_brightness_along_z(pipeline, dense_volume, reconstruction):
    """On by default (x2: the z sigma is half the 2-slice step); off, the slices are as sampled.
    The network is deterministic, so the two differ by the post-processing alone: inside the
    brain only, and slowly in-plane (a 5 mm Gaussian's worth, not the slices' detail)."""
    record = reconstruction.summary.banding["destriping"]
    assert record["applied"] is True and record["sigma_z_slices"] == 1.0 and record["scale_mm"] == 5.0
    sparse = simulate_sparse_volume(dense_volume, factor=2)
    raw = pipeline.reconstruct(sparse, ReconstructionOptions(steps=2, destripe=False))
    assert raw.summary.banding["destriping"]["applied"] is False
    change = reconstruction.mri - raw.mri
    assert np.all(change[~raw.mask] == 0) and np.abs(change).max() > 0
    # Smooth in-plane: neighbouring voxels of the change differ far less than the change itself.
    assert np.abs(np.diff(change, axis=0))[raw.mask[1:] & raw.mask[:-1]].mean() < 0.25 * np.abs(change[raw.mask]).mean()


def test_provenance_json_and_the_server_answer_keep_their_keys(reconstruction, dense_volume, tmp_path):
    from app.server.results import ResultStore
    from lib.report.outputs import input_geometry, write_outputs

    input_info = input_geometry(simulate_sparse_volume(dense_volume, factor=2), 2)
    written = json.loads((write_outputs(tmp_path / "out", reconstruction, input_info) / "provenance.json").read_text())
    assert list(written) == PROVENANCE_KEYS
    assert list(written["summary"]) == SUMMARY_KEYS
    assert list(written["input"]) == INPUT_KEYS and list(written["output"]) == OUTPUT_KEYS
    assert all(list(record) == SLICE_KEYS for record in written["slices"])
    assert list(written["summary"]["seconds"]) == ["prepare", "retrieval", "sampling", "output"]
    assert Summary.from_dict(written["summary"]) == reconstruction.summary

    store = ResultStore(tmp_path / "results")
    answer = store.response(store.save(reconstruction, input_info), "uncertainty")
    assert list(answer) == SERVER_ANSWER_KEYS
    assert answer["output"] == "uncertainty"  # the output sent with the answer
    assert list(answer["summary"]) == SUMMARY_KEYS and all(list(r) == SLICE_KEYS for r in answer["slices"])
    assert answer["summary"] == written["summary"] and answer["slices"] == written["slices"]


def test_acquired_slices_off_the_grid_by_a_fraction_of_a_millimetre_keep_their_own_input(dense_volume):
    """Issue 20: drifting positions (0.1-0.25 mm off the 1 mm grid) made acquired slices gaps whose
    input was interpolated; they now keep the acquired slice itself."""
    sparse = simulate_sparse_volume(dense_volume, factor=4)
    drift = np.resize([0.0, 0.12, -0.2, 0.25], sparse.shape[2])
    drifted = replace(sparse, positions=sparse.positions + drift)
    grid = dense_grid(drifted)
    assert grid.acquired.sum() == sparse.shape[2]
    rng = np.random.default_rng(0)
    acquired = rng.uniform(-1, 1, (sparse.shape[2], 8, 8)).astype(np.float32)
    y, _ = dense_slices(acquired, np.ones_like(acquired, dtype=bool), grid)
    np.testing.assert_array_equal(y[grid.acquired], acquired)
    np.testing.assert_allclose(grid.snap_mm[grid.acquired], -drift, atol=1e-9)
