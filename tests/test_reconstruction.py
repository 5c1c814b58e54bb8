"""The result contract (lib/reconstruction.py): a light module, and a summary that reads back what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from lib.reconstruction import Summary

HEAVY = ("torch", "faiss", "SimpleITK")

# The public format of a result (provenance.json, the server's answer; the Slicer module and
# scripts read them), written out by hand from the output before the typed summary;
# tests/test_pipeline.py checks a real result against them.
PROVENANCE_KEYS = ["synthetic", "notice", "input", "output", "summary", "slices"]
SUMMARY_KEYS = [
    "synthetic",
    "preset",
    "source",
    "target",
    "versions",
    "method",
    "controlnet",
    "slices",
    "acquired_slices",
    "generated_slices",
    "retrieval_success_rate",
    "generated_retrieval_success_rate",
    "fallback_count",
    "mean_similarity",
    "tau",
    "uncertainty_mean",
    "steps",
    "samples",
    "eta",
    "seed",
    "precision",
    "seconds",
    "brain_extraction",
    "alignment",
    "tissue_check",
    "banding",
]
SLICE_KEYS = [
    "index",
    "position_mm",
    "normalised_position",
    "acquired",
    "source_slice",
    "similarity",
    "success",
    "control",
    "fallback",
    "reference",
    "uncertainty_mean",
    "snap_mm",
]
INPUT_KEYS = [
    "modality",
    "shape",
    "pixel_spacing_mm",
    "acquired_positions_mm",
    "gantry_tilt_deg",
    "simulated_sparsity",
]
OUTPUT_KEYS = ["shape", "affine", "slice_spacing_mm", "value_range"]
SERVER_ANSWER_KEYS = ["result_id", "outputs", "status_codes", "slice_status", *PROVENANCE_KEYS]


@pytest.mark.parametrize(
    "module",
    [
        "lib.reconstruction",
        "lib.reconstruction_methods",
        "lib.reconstruction_options",
        "lib.report.outputs",
        "app.server.results",
    ],
)
def test_result_writers_load_no_models(module):
    """Outputs and the server's result store are written, and the options (their precision word
    too) checked, without torch, faiss or SimpleITK."""
    check = f"import sys, {module}; print(sorted({set(HEAVY)!r} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{module} imports {loaded.strip()}"


def summary() -> Summary:
    return Summary(
        preset="ct2mri",
        source="ct",
        target="t1n",
        versions={"bbdm": "0123456789abcdef", "kb": "fedcba9876543210"},
        method="rebrain",
        controlnet=True,
        slices=9,
        acquired_slices=5,
        generated_slices=4,
        retrieval_success_rate=0.5,
        generated_retrieval_success_rate=0.25,
        fallback_count=3,
        mean_similarity=0.99,
        tau=0.998,
        uncertainty_mean=0.0,
        steps=4,
        samples=1,
        eta=0.0,
        seed=0,
        precision="bf16",
        seconds={"prepare": 0.1, "retrieval": 0.2, "sampling": 3.0, "output": 0.4},
        brain_extraction={"applied": False, "reason": "not a CT preset"},
        alignment={"applied": False, "positions": "brain extent", "reason": "turned off"},
        tissue_check={"slices": 5, "order_holds": True, "csf_dice": 0.61, "csf_dice_chance": 0.1},
        banding={"brightness_ratio": 1.4, "voxel_ratio": 2.0},
    )


def test_the_summary_serialises_in_field_order_and_reads_back():
    written = summary().to_dict()
    assert list(written) == SUMMARY_KEYS == [item.name for item in fields(Summary)]
    assert written["synthetic"] is True
    assert Summary.from_dict(json.loads(json.dumps(written))) == summary()


def test_a_summary_written_before_the_brain_extraction_and_alignment_records_reads_back():
    older = {key: value for key, value in summary().to_dict().items() if key not in ("brain_extraction", "alignment")}
    read = Summary.from_dict({**older, "added_later": 1})  # and a key this version does not know
    assert read.alignment == {} and read.brain_extraction == {} and read.slices == 9


def test_a_summary_written_before_the_precision_was_recorded_reads_back_as_float32():
    """Sampling ran in float32 only until the precision option came (issue 19)."""
    older = {key: value for key, value in summary().to_dict().items() if key != "precision"}
    assert Summary.from_dict(older).precision == "fp32"


def test_a_summary_missing_a_key_is_refused_naming_it():
    incomplete = summary().to_dict()
    del incomplete["tau"]
    with pytest.raises(ValueError, match=r"missing \['tau'\]"):
        Summary.from_dict(incomplete)


def test_a_summary_written_before_the_tissue_check_and_banding_reads_back_with_empty_records():
    older = {key: value for key, value in summary().to_dict().items() if key not in ("tissue_check", "banding")}
    read = Summary.from_dict(older)
    assert read.tissue_check == {} and read.banding == {} and read.alignment == summary().alignment
