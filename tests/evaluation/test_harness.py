"""The evaluation harness on real BraTS subjects with a tiny preset: rows, scoring, report, CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from app.cli import main
from lib.data.prepare import anonymised_key
from lib.evaluation.harness import (
    METRIC_COLUMNS,
    EvaluationConfig,
    EvaluationSubject,
    Variant,
    evaluate_subjects,
    held_out_subjects,
    kb_subset,
    pipeline_for,
    reference_slices,
)
from lib.evaluation.report import write_report
from lib.evaluation.score import reference_to_unit
from lib.io.checkpoint import save_checkpoint
from lib.models.denoiser import build_denoiser
from lib.pipeline import ReBrainPipeline
from tests.conftest import SHARED_DATA, require
from tests.test_consistency import TISSUE_RECORD
from tests.tiny_preset import TINY_BBDM, make_tiny_preset

BRATS = SHARED_DATA / "brats_dev"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return ReBrainPipeline.from_preset(make_tiny_preset(tmp_path_factory.mktemp("preset")))


@pytest.fixture(scope="module")
def subject(pipeline):
    """One held-out real subject, cut to 20 slices to keep the test fast."""
    full = held_out_subjects(pipeline, "brats", str(require(BRATS)), max_subjects=1)[0]
    keep = np.arange(60, 80)
    return replace(
        full, source=full.source.take_slices(keep), target=full.target[:, :, keep], mask=full.mask[:, :, keep]
    )


class NoisyOracle:
    """A "method" with a known error: the ground truth (on the [0, 1] scale the score uses)
    plus Gaussian noise of standard deviation ``sigma`` inside the brain. It takes the real
    pipeline's grid and geometry, so the harness's slice alignment is what is tested."""

    def __init__(
        self, pipeline: ReBrainPipeline, subject: EvaluationSubject, sigma: float, gaps_only: bool = False
    ) -> None:
        self.pipeline, self.subject, self.sigma, self.gaps_only = pipeline, subject, sigma, gaps_only
        self.rng = np.random.default_rng(0)

    def reconstruct(self, volume, options):
        result = self.pipeline.reconstruct(volume, replace(options, method="interp", steps=2))
        index = reference_slices(self.subject.source, result)
        truth, mask = reference_to_unit(self.subject.target[:, :, index], self.subject.mask[:, :, index])
        noise = self.rng.normal(0.0, self.sigma, truth.shape)
        if self.gaps_only:  # acquired slices exact: the error is all in the gaps
            noise[:, :, [record.acquired for record in result.slices]] = 0.0
        noisy = np.where(mask, truth + noise, 0.0)
        return replace(result, mri=noisy.astype(np.float32))


def test_held_out_subjects_are_not_in_the_knowledge_base(pipeline):
    subjects = held_out_subjects(pipeline, "brats", str(require(BRATS)), max_subjects=3)
    in_kb = set(pipeline.kb.entries["subject"])
    assert len(subjects) == 3 and not {s.key for s in subjects} & in_kb
    # The tiny preset's knowledge base holds the training split of 3 prepared subjects.
    names = sorted(p.name for p in BRATS.iterdir() if p.is_dir())
    assert {anonymised_key("brats", name) for name in names} & in_kb
    assert all(s.split in {"train", "val", "test", "unseen"} for s in subjects)
    # Asked for one split, only its subjects come (the split recomputed as prepare assigns it).
    tests = held_out_subjects(pipeline, "brats", str(require(BRATS)), splits=("test",), test_fraction=0.34)
    assert tests and all(s.split == "test" for s in tests)
    assert {s.key for s in tests} < {
        s.key for s in held_out_subjects(pipeline, "brats", str(require(BRATS)), test_fraction=0.34)
    }


def test_every_subject_method_sparsity_seed_gets_a_row(pipeline, subject):
    config = EvaluationConfig(methods=("interp", "bbdm", "rebrain"), sparsities=(2, 3), seeds=(0, 1), steps=2)
    calls = []
    result = evaluate_subjects(pipeline, [subject], config, progress=lambda *call: calls.append(call))
    table = pd.DataFrame(result.rows)
    assert len(table) == 3 * 2 * 2
    # Progress counts runs; each finished run's score is the message.
    assert [call[:2] for call in calls] == [(done, 12) for done in range(1, 13)]
    assert all(f"{subject.key} x" in message and "PSNR" in message for _, _, message in calls)
    assert set(map(tuple, table[["method", "sparsity", "seed"]].values.tolist())) == {
        (m, k, s) for m in config.methods for k in (2, 3) for s in (0, 1)
    }
    assert table["psnr"].notna().all() and table["issim"].between(0, 1).all()
    # The seed moves the sparsity phase: x2 with seed 1 starts one slice later.
    slices = table.set_index(["method", "sparsity", "seed"])["slices"]
    assert slices[("bbdm", 2, 0)] == 19 and slices[("bbdm", 2, 1)] == 19 and slices[("bbdm", 3, 0)] == 19
    assert set(result.slice_psnr) == set(config.methods)
    assert all(len(values) == 19 for values in result.slice_psnr.values())


@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_a_method_with_known_error_gets_the_psnr_it_must(pipeline, subject, sigma):
    oracle = NoisyOracle(pipeline, subject, sigma)
    result = evaluate_subjects(oracle, [subject], EvaluationConfig(methods=("interp",), sparsities=(2,), seeds=(0, 1)))
    expected = -10 * np.log10(sigma**2)  # PSNR of noise of variance sigma^2 on a unit range
    for row in result.rows:
        # Clipping to [0, 1] removes a little of the noise at the range's ends: never below.
        assert expected - 0.05 < row["psnr"] < expected + 0.6, (sigma, row["psnr"])


def test_gap_and_acquired_slices_are_scored_apart(pipeline, subject, tmp_path):
    """Noise of a known level on the gap slices only: the gap PSNR is that noise's, the acquired
    slices are exact, and the whole lies between."""
    sigma = 0.05
    oracle = NoisyOracle(pipeline, subject, sigma, gaps_only=True)
    result = evaluate_subjects(oracle, [subject], EvaluationConfig(methods=("interp",), sparsities=(2,), seeds=(0,)))
    row = result.rows[0]
    expected = -10 * np.log10(sigma**2)
    assert expected - 0.05 < row["psnr_gap"] < expected + 0.6, row["psnr_gap"]
    assert row["psnr_acquired"] > 60 and row["ssim_acquired"] > 0.999 and row["nrmse_acquired"] < 1e-3
    assert row["psnr_gap"] < row["psnr"] < row["psnr_acquired"] and row["ssim_gap"] < row["ssim_acquired"]
    report = (write_report(tmp_path / "report", result, {"preset": "tiny"}) / "report.md").read_text()
    assert "### Gap and acquired slices apart" in report and "gap PSNR (dB)" in report
    assert row["input_coverage"] > 0.9 and "**Warning:**" not in report
    # A subject whose input misses part of the truth's brain is named in a warning.
    for entry in result.rows:
        entry["input_coverage"] = 0.68
    report = (write_report(tmp_path / "low", result, {"preset": "tiny"}) / "report.md").read_text()
    assert f"**Warning:** the input has signal over only 68% ({row['subject']})" in report


def test_report_folder_holds_metrics_report_and_figures(pipeline, subject, tmp_path):
    config = EvaluationConfig(
        methods=("interp", "rebrain"), sparsities=(2,), seeds=(0, 1), steps=2, uncertainty_samples=2
    )
    result = evaluate_subjects(pipeline, [subject], config)
    out = write_report(tmp_path / "report", result, {"preset": "tiny"})
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS) and len(metrics) == 4
    report = (out / "report.md").read_text()
    for method in ("interp", "rebrain"):
        assert f"| 2 | {method} |" in report
    assert "±" in report and "Definitions" in report
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "montage.png",
        "similarity.png",
        "slice_psnr.png",
        "uncertainty.png",
    ]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_scan_without_ground_truth_reports_continuity_and_retrieval(pipeline, subject, tmp_path):
    scan = EvaluationSubject(key="input", split="no ground truth", source=subject.source)
    result = evaluate_subjects(
        pipeline, [scan], EvaluationConfig(methods=("rebrain",), sparsities=(2,), seeds=(0,), steps=2)
    )
    row = result.rows[0]
    assert "psnr" not in row and 0 < row["issim"] <= 1 and row["retrieval_success_rate"] is not None
    out = write_report(tmp_path / "report", result, {"preset": "tiny"})
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["montage.png", "similarity.png"]
    # A FLAIR input has no tissue check, and x2 sparsity no two generated slices in a row.
    assert row["tissue_order"] is None and row["banding_brightness_ratio"] is None
    report = (out / "report.md").read_text()
    assert "Tissue consistency" not in report and "Banding at" not in report
    # A 2 mm scan as acquired (sparsity 1) is reconstructed on the preset's 1 mm grid, as
    # `reconstruct` makes it: one generated slice between each two acquired ones.
    thick = replace(scan, source=subject.source.take_slices(np.arange(0, subject.source.shape[2], 2)))
    config = EvaluationConfig(methods=("bbdm",), sparsities=(1,), seeds=(0,), steps=2)
    row = evaluate_subjects(pipeline, [thick], config).rows[0]
    assert row["slices"] == 2 * thick.source.shape[2] - 1 and row["generated_slices"] == thick.source.shape[2] - 1


class WithTissueCheck:
    """The pipeline, with a known tissue-check record in every summary (the tiny preset reads a
    FLAIR, which has no HU): the rows and the report must carry exactly this record."""

    RECORD = TISSUE_RECORD

    def __init__(self, pipeline: ReBrainPipeline) -> None:
        self.pipeline = pipeline

    def reconstruct(self, volume, options):
        result = self.pipeline.reconstruct(volume, options)
        return replace(result, summary=replace(result.summary, tissue_check=self.RECORD))


def test_rows_and_report_carry_the_checks_without_ground_truth(pipeline, subject, tmp_path):
    scan = EvaluationSubject(key="input", split="no ground truth", source=subject.source)
    config = EvaluationConfig(methods=("rebrain",), sparsities=(4, 2), seeds=(0,), steps=2)
    result = evaluate_subjects(WithTissueCheck(pipeline), [scan], config)
    row = result.rows[0]
    record = WithTissueCheck.RECORD
    assert row["tissue_order"] is True and row["csf_dice"] == record["csf_dice"]
    assert (row["t1_white"], row["t1_grey"], row["t1_csf"]) == (0.8, 0.6, 0.2)
    assert (row["d_white_grey"], row["d_grey_csf"]) == (1.5, 2.5) and row["csf_dice_chance"] == 0.1
    # x4 sparsity leaves three generated slices per gap: the banding ratio is defined.
    banding = result.example["rebrain"].summary.banding
    assert banding["pairs"]["generated_generated"] > 0
    assert row["banding_brightness_ratio"] == banding["brightness_ratio"] is not None
    assert row["banding_voxel_ratio"] == banding["voxel_ratio"] is not None
    out = write_report(tmp_path / "report", result, {"preset": "tiny"})
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics.loc[0, "csf_dice"] == 0.7 and bool(metrics.loc[0, "tissue_order"]) is True
    report = (out / "report.md").read_text()
    tissue = report.split("### Tissue consistency with the input CT")[1].split("###")[0]
    # One run: the order held in all of it (share 1), the Dice and effect sizes as recorded.
    assert "| 4 | rebrain | 1.00 ± 0.00 | 0.800 ± 0.000 |" in tissue and "0.700 ± 0.000" in tissue
    assert "1.50 ± 0.00" in tissue and "Cohen's d" in tissue
    banding_table = report.split("### Banding at acquired/generated slices")[1]
    assert f"| 4 | rebrain | {banding['brightness_ratio']:.2f} ± 0.00 |" in banding_table
    # x2: every gap slice between two acquired ones, no ratio: shown as "-", not "nan".
    assert result.rows[1]["banding_brightness_ratio"] is None and "| 2 | rebrain | - | - |" in banding_table


def test_evaluate_command_end_to_end(pipeline, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--layout",
            "brats",
            "--src",
            str(require(BRATS)),
            "--preset",
            str(pipeline.preset.root),
            "--methods",
            "interp",
            "rebrain",
            "--sparsity",
            "4",
            "--seeds",
            "0",
            "--max-subjects",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "report" / "metrics.csv")) == 2
    code = main(
        [
            "evaluate",
            "--layout",
            "brats",
            "--src",
            str(tmp_path / "missing"),
            "--preset",
            str(pipeline.preset.root),
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_ablation_variants_rerun_only_the_methods_they_change(pipeline, subject, tmp_path):
    full, model, encoder = pipeline.kb, pipeline.model, pipeline.encoder
    # Another BBDM (Table 2): the tiny one with every weight perturbed (MONAI zero-initialises
    # the UNet's output layer, so untrained networks of any seed would all predict the same).
    torch.manual_seed(1)
    denoiser = build_denoiser(TINY_BBDM)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other_bbdm = save_checkpoint(
        tmp_path / "other_bbdm.pt", {"kind": "bbdm", "config": TINY_BBDM.to_dict(), "model": denoiser.state_dict()}
    )
    # Another encoder (Table 3): its knowledge base is built from the preset's prepared data.
    other = make_tiny_preset(tmp_path / "other", seed=1)
    prepared = pipeline.preset.root.parent / "prepared"
    variants = (
        Variant(),
        Variant(name="kb=0.5", kb_fraction=0.5),
        Variant(name="bbdm=other", bbdm=str(other_bbdm)),
        Variant(name="encoder=other", encoder=str(other.required("encoder")), data=str(prepared)),
    )
    config = EvaluationConfig(methods=("interp", "rebrain"), sparsities=(2,), seeds=(0,), steps=2, variants=variants)
    rows = pd.DataFrame(evaluate_subjects(pipeline, [subject], config).rows)
    assert sorted(map(tuple, rows[["variant", "method"]].values.tolist())) == [
        ("bbdm=other", "interp"),
        ("encoder=other", "rebrain"),
        ("kb=0.5", "rebrain"),
        ("preset", "interp"),
        ("preset", "rebrain"),
    ]
    by_variant = rows.set_index(["variant", "method"])
    # Another BBDM changes the translation.
    assert by_variant.loc[("bbdm=other", "interp"), "psnr"] != by_variant.loc[("preset", "interp"), "psnr"]
    assert pipeline.kb is full and pipeline.model is model and pipeline.encoder is encoder  # untouched
    # A variant is a pipeline of its own, built from parts; the preset is the pipeline itself.
    assert pipeline_for(pipeline, variants[0], tmp_path) is pipeline
    other_model = pipeline_for(pipeline, variants[2], tmp_path)
    assert other_model.model is not model and not other_model.has_controlnet and other_model.kb is full
    # The tiny knowledge base has a single training subject: any fraction keeps at least one.
    assert kb_subset(full, 0.5) == sorted(set(full.entries["subject"]))[:1]


def test_input_coverage_is_the_share_of_the_truths_brain_where_the_input_has_signal():
    from lib.evaluation.harness import input_coverage
    from lib.io.volume import Volume

    flair = np.zeros((10, 10, 4), np.float32)
    flair[2:8, 2:8] = 5.0
    mask = np.zeros((10, 10, 4), np.uint8)
    mask[2:8, 2:8] = 1
    volume = Volume(array=flair, affine=np.eye(4), positions=np.arange(4.0))
    assert input_coverage(volume, mask) == 1.0
    flair[2:5, 2:8] = 0.0  # like Brats18_2013_20_1: the input misses half of the brain
    assert input_coverage(volume, mask) == pytest.approx(0.5)
    ct = Volume(array=np.where(mask > 0, 30.0, -1000.0).astype(np.float32), affine=np.eye(4), positions=np.arange(4.0))
    assert input_coverage(ct, mask) == 1.0


def test_open_splits_are_recomputed_as_prepare_made_them(server_weights):
    """An ``open`` dataset prepared with N pseudo-subjects: evaluate's recomputed splits agree
    with the split prepare wrote in its manifest, and later pseudo-subjects are unseen."""
    import json

    from lib.data.layouts import discover_subjects
    from lib.evaluation.harness import recomputed_splits

    manifest = json.loads((server_weights / "ct_build" / "prepared" / "manifest.json").read_text())
    written = [(s["key"], s["split"]) for s in manifest["subjects"]]
    records = discover_subjects("open", str(require(BRATS)), open_count=len(written) + 2)
    keys = [anonymised_key("open", record.name) for record in records]
    splits = recomputed_splits("open", keys, len(written), 0.2, 0.2, 0)
    assert list(zip(keys, splits))[: len(written)] == written
    assert splits[len(written) :] == ["unseen", "unseen"]
    # Told a different prepared count, the split differs: the count matters (the bug it fixes).
    assert recomputed_splits("open", keys, len(keys), 0.2, 0.2, 0)[: len(written)] != [s for _, s in written]
