"""The evaluation's baselines as pipeline methods (interp, bbdm, substitute, r-as-input, noslerp)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from lib.data.sparse import simulate_sparse_volume
from lib.io import read_volume
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from lib.reconstruction_methods import (
    GAP_FILLING,
    METHODS,
    Method,
    apply_intensity_map,
    fit_intensity_map,
    gap_filling,
)
from tests.tiny_preset import make_tiny_preset


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return ReBrainPipeline.from_preset(make_tiny_preset(tmp_path_factory.mktemp("preset")))


@pytest.fixture(scope="module")
def sparse(brats_case):
    """15 central slices of a real FLAIR made x2 sparse: acquired at even z, gaps at odd z."""
    volume = read_volume(brats_case / "t2f.nii.gz", modality="MR").take_slices(np.arange(63, 78))
    return simulate_sparse_volume(volume, factor=2)


@pytest.fixture(scope="module")
def results(pipeline, sparse):
    # Each method's own gap filling, as sampled: destriping, applied to every method's output
    # alike, is tested in tests/data/test_destripe.py and tests/test_pipeline.py.
    return {
        method: pipeline.reconstruct(sparse, ReconstructionOptions(steps=2, method=method, destripe=False))
        for method in ("bbdm", "interp", "substitute", "r-as-input", "rebrain-noslerp", "rebrain")
    }


def inside(result, z: int) -> np.ndarray:
    """Voxels of slice z well inside the output mask (the model-frame masks of neighbouring
    slices differ at the edge) whose values are not clipped at 0 or 1."""
    values = result.mri[:, :, z]
    return binary_erosion(result.mask[:, :, z], iterations=8) & (values > 1e-4) & (values < 1 - 1e-4)


def test_interp_gaps_are_the_linear_interpolation_of_translated_neighbours(results):
    interp = results["interp"]
    for z in range(1, 15, 2):
        keep = inside(interp, z) & inside(interp, z - 1) & inside(interp, z + 1)
        assert keep.sum() > 100
        expected = 0.5 * (interp.mri[:, :, z - 1] + interp.mri[:, :, z + 1])
        np.testing.assert_allclose(interp.mri[:, :, z][keep], expected[keep], atol=2e-3)
    # Its acquired slices are the BBDM's translation of them (deterministic sampling, per slice).
    np.testing.assert_allclose(interp.mri[:, :, ::2], results["bbdm"].mri[:, :, ::2], atol=1e-4)
    assert {r.control for r in interp.slices if not r.acquired} == {"interpolated"}
    assert interp.summary.retrieval_success_rate is None and interp.summary.method == "interp"


def test_bbdm_uses_no_retrieval_and_no_controlnet(results):
    bbdm = results["bbdm"]
    assert all(r.similarity is None and r.reference is None and r.control == "none" for r in bbdm.slices)
    assert bbdm.summary.controlnet is False and bbdm.summary.fallback_count == 0


def test_substitute_pastes_the_references_mri_into_gaps(results, pipeline):
    substitute, bbdm = results["substitute"], results["bbdm"]
    gaps = [r for r in substitute.slices if not r.acquired]
    pasted = [r for r in gaps if r.control == "substituted"]
    # Every gap slice has a candidate in the tiny knowledge base (no subject exclusion here).
    assert len(pasted) == len(gaps) and all(r.reference for r in pasted)
    np.testing.assert_allclose(substitute.mri[:, :, ::2], bbdm.mri[:, :, ::2], atol=1e-4)
    # A pasted slice is a knowledge-base MRI slice, not the BBDM's output for that gap.
    assert not np.allclose(substitute.mri[:, :, 1::2], bbdm.mri[:, :, 1::2], atol=1e-2)
    assert np.all(substitute.uncertainty == 0)


def test_r_as_input_changes_only_slices_whose_retrieval_succeeded(results):
    r_input, bbdm = results["r-as-input"], results["bbdm"]
    replaced = [r.index for r in r_input.slices if r.control == "reference-as-input"]
    assert replaced == [r.index for r in r_input.slices if r.success and not r.acquired]
    unchanged = [z for z in range(15) if z not in replaced]
    np.testing.assert_allclose(r_input.mri[:, :, unchanged], bbdm.mri[:, :, unchanged], atol=1e-4)
    if replaced:
        assert not np.allclose(r_input.mri[:, :, replaced], bbdm.mri[:, :, replaced], atol=1e-2)


def test_noslerp_guides_every_gap_by_its_reference(results):
    noslerp, rebrain = results["rebrain-noslerp"], results["rebrain"]
    gaps = [r for r in noslerp.slices if not r.acquired]
    assert all(r.control == "reference" and r.reference and not r.fallback for r in gaps)
    # The full method uses the SLERP fallback exactly where retrieval failed.
    assert [r.fallback for r in rebrain.slices if not r.acquired] == [not r.success for r in gaps]


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        ReconstructionOptions(method="magic")


def test_every_method_is_one_object_with_its_properties():
    assert METHODS == tuple(Method)
    assert METHODS == (
        "rebrain",
        "rebrain-noslerp",
        "bbdm",
        "r-as-input",
        "substitute",
        "interp",
        "identity",
        "intensity-map",
    )
    assert set(GAP_FILLING) == set(Method) and all(gap_filling(m).method == m for m in METHODS)
    # (queries the knowledge base, guided by the ControlNet, uses a candidate below tau)
    assert {m.value: (s.retrieves, s.guided, s.ignores_tau) for m, s in GAP_FILLING.items()} == {
        "rebrain": (True, True, False),
        "rebrain-noslerp": (True, True, True),
        "bbdm": (False, False, False),
        "r-as-input": (True, False, False),
        "substitute": (True, False, True),
        "interp": (False, False, False),
        "identity": (False, False, False),
        "intensity-map": (False, False, False),
    }
    assert [gap_filling(m).guided_by(True) for m in METHODS] == [True, True] + [False] * 6
    assert [gap_filling(m).translates for m in METHODS] == [True] * 6 + [False, False]
    assert not any(gap_filling(m).guided_by(False) for m in METHODS)
    with pytest.raises(ValueError, match="unknown method 'magic'; choose from rebrain, rebrain-noslerp"):
        gap_filling("magic")


@pytest.mark.parametrize(
    ("method", "kinds"),
    [
        # control of: (acquired, with reference), (acquired, none), (gap, with reference), (gap, none)
        ("rebrain", ("reference", "acquired", "reference", "slerp")),
        ("rebrain-noslerp", ("reference", "acquired", "reference", "slerp")),
        ("bbdm", ("none", "none", "none", "none")),
        ("r-as-input", ("none", "none", "reference-as-input", "none")),
        ("substitute", ("none", "none", "substituted", "none")),
        ("interp", ("none", "none", "interpolated", "interpolated")),
        ("identity", ("none", "none", "none", "none")),
        ("intensity-map", ("none", "none", "none", "none")),
    ],
)
def test_each_slice_records_what_guided_it(method, kinds):
    strategy = gap_filling(method)
    cases = [(True, True), (True, False), (False, True), (False, False)]
    assert tuple(strategy.control_kind(acquired, reference, strategy.guided) for acquired, reference in cases) == kinds
    # Without the ControlNet the guided methods record no control.
    assert {strategy.control_kind(acquired, reference, False) for acquired, reference in cases} <= {
        "none",
        "reference-as-input",
        "substituted",
        "interpolated",
    }
    # A slice uses its reference on success, and below tau only for the methods that ignore it.
    assert strategy.uses_reference(True, True) and not strategy.uses_reference(False, False)
    assert strategy.uses_reference(False, True) == strategy.ignores_tau


def test_the_intensity_map_recovers_a_known_voxelwise_mapping_from_brain_voxels_only():
    rng = np.random.default_rng(0)
    source = rng.uniform(-0.9, 1.0, size=(40, 16, 16)).astype(np.float32)
    target = (0.5 * source**2 - 0.2 + rng.normal(0, 0.01, size=source.shape)).astype(np.float32)
    # Background (input at -1) paired with a target far from the mapping: it must not count.
    source[:, :2], target[:, :2] = -1.0, 1.0
    pairs = [(source[:20], target[:20]), (source[20:], target[20:])]
    table = fit_intensity_map(iter(pairs), bins=64)
    probe = np.linspace(-0.85, 0.95, 50)
    np.testing.assert_allclose(apply_intensity_map(table, probe), 0.5 * probe**2 - 0.2, atol=0.02)
    # Bins no voxel fell in (below -0.9 here) continue from their nearest filled neighbour.
    assert np.isfinite(table).all() and abs(table[0] - (0.5 * 0.9**2 - 0.2)) < 0.05
    with pytest.raises(ValueError, match="no brain voxel"):
        fit_intensity_map(iter([(np.full((1, 4, 4), -1.0), np.zeros((1, 4, 4)))]))


def test_identity_and_intensity_map_baselines_through_the_pipeline(pipeline, sparse, results):
    identity = pipeline.reconstruct(sparse, ReconstructionOptions(method="identity"))
    mapped = pipeline.reconstruct(sparse, ReconstructionOptions(method="intensity-map"))
    bbdm = results["bbdm"]
    for result in (identity, mapped):
        assert result.mri.shape == bbdm.mri.shape and (result.mask == bbdm.mask).all()
        assert all(r.control == "none" and r.similarity is None for r in result.slices)
        assert result.summary.retrieval_success_rate is None and (result.uncertainty == 0).all()
    # Identity gives the input back, through the model frame's in-plane resampling (the tiny
    # preset's slices are small, so it blurs).
    z = 4  # an acquired slice
    keep = inside(identity, z)
    flair = sparse.array[:, :, z // 2][keep]
    assert np.corrcoef(identity.mri[:, :, z][keep], flair)[0, 1] > 0.9
    # The map learnt FLAIR -> T1 from the knowledge base's pairs: not the identity.
    assert np.abs(mapped.mri[:, :, z][keep] - identity.mri[:, :, z][keep]).mean() > 0.05
    # The intensity map is a function of the input alone: equal inputs give equal outputs.
    levels = np.round(identity.mri[:, :, z][keep], 3)
    outputs = mapped.mri[:, :, z][keep]
    same = levels == np.median(levels)
    assert same.sum() > 5 and np.ptp(outputs[same]) < 0.02


class CountingSlices:
    """Knowledge-base slice pairs whose target is twice the input (brain everywhere), counting reads."""

    def __init__(self) -> None:
        self.reads = 0

    def slice_pairs(self, chunk: int):
        self.reads += 1
        source = np.linspace(-0.9, 0.4, 64, dtype=np.float32).reshape(1, 8, 8)
        yield source, 2 * source


def test_the_intensity_map_is_fitted_once_per_knowledge_base():
    """An evaluation reconstructs many volumes with one knowledge base: one fit, not one per volume."""
    strategy = gap_filling("intensity-map")
    plan = SimpleNamespace(y=np.array([[[-0.5, 0.25]]], dtype=np.float32))
    first, second = CountingSlices(), CountingSlices()
    for _ in range(3):
        mean, _ = strategy.fill(plan, None, first)
    strategy.fill(plan, None, second)
    assert first.reads == 1 and second.reads == 1
    np.testing.assert_allclose(mean, 2 * plan.y, atol=0.02)
