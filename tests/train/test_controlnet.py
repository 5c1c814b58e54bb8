"""ControlNet training on real slices with tiny models: triplets, SLERP pairs, resume, the CLI,
and refusal of inputs that do not belong together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from app.cli import main
from lib.data.dataset import PreparedDataset, PreparedSlices
from lib.data.prepare import PrepareConfig, prepare_dataset
from lib.diffusion.scheduler import BridgeSchedulerConfig
from lib.diffusion.slerp import slerp
from lib.io.checkpoint import save_checkpoint
from lib.models.controlnet import load_controlled_denoiser
from lib.models.denoiser import BBDMConfig, BBDMSpec, bbdm_checkpoint, build_denoiser
from lib.models.retrieval_encoder import CHECKPOINT_KIND as ENCODER_KIND
from lib.models.retrieval_encoder import RetrievalConfig, build_retrieval_encoder, load_retrieval_encoder
from lib.retrieval.build import build_knowledge_base
from lib.retrieval.knowledge_base import KnowledgeBase
from lib.train.controlnet import ControlNetTrainConfig, TripletBatches, retrieve_references, train_controlnet
from lib.train.run_folder import RunExistsError
from tests.conftest import SHARED_DATA, require

SIZE = 32
ENCODER = RetrievalConfig(
    image_size=SIZE, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(0, 1)
)
SETTINGS = dict(
    batch_size=2,
    slerp_fraction=0.5,
    min_brain_fraction=0.3,
    val_every=1,
    val_slices=2,
    val_steps=2,
    checkpoint_every=1,
    seed=3,
)


def tiny_bbdm(image_size: int = SIZE) -> BBDMConfig:
    return BBDMConfig(
        image_size=image_size,
        channels=(16, 32),
        attention_levels=(False, True),
        num_head_channels=16,
        norm_num_groups=8,
    )


def save_encoder(path, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_retrieval_encoder(ENCODER)
    save_checkpoint(path, {"kind": ENCODER_KIND, "config": ENCODER.to_dict(), "model": model.state_dict()})


def save_bbdm(path, config: BBDMConfig) -> None:
    torch.manual_seed(0)
    model = build_denoiser(config)
    with torch.no_grad():  # all weights random (MONAI zero-initialises the output convolution)
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    save_checkpoint(path, bbdm_checkpoint(model.state_dict(), BBDMSpec(config, BridgeSchedulerConfig(timesteps=100))))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prepared dataset (3 train subjects, 1 val), a tiny BBDM, encoder and knowledge base."""
    root = tmp_path_factory.mktemp("controlnet")
    prepare_dataset(
        "brats",
        require(SHARED_DATA / "brats_dev"),
        root / "prepared",
        config=PrepareConfig(size=SIZE, val_fraction=0.25, test_fraction=0.0),
        max_subjects=4,
    )
    save_bbdm(root / "model.pt", tiny_bbdm())
    save_encoder(root / "encoder.pt", seed=0)
    build_knowledge_base(root / "prepared", root / "encoder.pt", root / "kb")
    return {
        "data": root / "prepared",
        "bbdm": root / "model.pt",
        "kb": root / "kb",
        "encoder": root / "encoder.pt",
        "root": root,
    }


def test_references_never_come_from_the_query_subject(inputs):
    slices = PreparedSlices(inputs["data"], "train", 0.05)
    encoder, _ = load_retrieval_encoder(inputs["encoder"])
    kb = KnowledgeBase.load(inputs["kb"])
    table = retrieve_references(slices, kb, encoder, position_tolerance=0.1)
    assert len(table) > 0.9 * len(slices) and table["subject"].nunique() == 3
    assert (table["subject"] != table["reference_subject"]).all()
    assert ((table["position"] - table["reference_position"]).abs() <= 0.1 + 1e-12).all()
    assert (kb.entries["subject"].to_numpy()[table["reference_id"]] == table["reference_subject"]).all()
    # Without the exclusion the query's own slice (in the knowledge base) would be its best match.
    first = slices[0]
    assert table.iloc[0]["reference_subject"] != first["subject"]


def test_batches_mix_retrieval_triplets_and_slerp_pairs(inputs):
    slices = PreparedSlices(inputs["data"], "train", 0.05)
    encoder, _ = load_retrieval_encoder(inputs["encoder"])
    kb = KnowledgeBase.load(inputs["kb"])
    table = retrieve_references(slices, kb, encoder, rows=[10, 40, 80])
    for target in ("reference", "own"):
        condition, control, x0 = TripletBatches(slices, kb, table, target).batch(
            [0, 1, 2], slerp_count=1, device=torch.device("cpu")
        )
        assert condition.shape == control.shape == x0.shape == (3, 1, SIZE, SIZE)
        # The first item is a SLERP pair: the control interpolates y's own neighbours, x0 is y's MRI.
        record = table.iloc[0]
        volume = PreparedDataset(inputs["data"]).array(record["subject"], "source")
        neighbours = torch.from_numpy(np.asarray(volume[[record["slice"] - 1, record["slice"] + 1]], dtype=np.float32))
        assert torch.allclose(control[0], slerp(neighbours[:1], neighbours[1:], 0.5)[0])
        assert torch.equal(x0[0], slices[int(record["row"])]["target"])
        # The others: the reference's CT as control, and its MRI (or y's own) as x0.
        for item in (1, 2):
            record = table.iloc[item]
            assert torch.equal(condition[item], slices[int(record["row"])]["source"])
            assert torch.equal(control[item, 0], torch.from_numpy(kb.ct_slice(int(record["reference_id"]))))
            expected = (
                torch.from_numpy(kb.mri_slice(int(record["reference_id"])))[None]
                if target == "reference"
                else slices[int(record["row"])]["target"]
            )
            assert torch.equal(x0[item], expected)


def test_resumed_run_equals_an_uninterrupted_one(inputs, tmp_path):
    """Flips on (half the items mirrored, control with them): their draws are checkpointed too."""
    flipped = {**SETTINGS, "flip_probability": 0.5}
    data, models = inputs["data"], (inputs["bbdm"], inputs["kb"], inputs["encoder"])
    scores = train_controlnet(data, tmp_path / "whole", *models, ControlNetTrainConfig(iters=3, **flipped))
    train_controlnet(data, tmp_path / "split", *models, ControlNetTrainConfig(iters=2, **flipped))
    with pytest.raises(RunExistsError, match="resume=True continues it"):
        train_controlnet(data, tmp_path / "split", *models, ControlNetTrainConfig(iters=3, **flipped))
    train_controlnet(data, tmp_path / "split", *models, ControlNetTrainConfig(iters=3, **flipped), resume=True)

    whole, split = (pd.read_csv(tmp_path / name / "loss.csv") for name in ("whole", "split"))
    assert list(whole.iteration) == [1, 2, 3]
    np.testing.assert_array_equal(whole.loss, split.loss)
    validation = pd.read_csv(tmp_path / "whole" / "validation.csv")
    assert list(validation.iteration) == [1, 2, 3] and validation.bbdm_psnr.nunique() == 1
    assert set(scores) == {"psnr", "ssim", "psnr_brain", "bbdm_psnr", "bbdm_ssim", "bbdm_psnr_brain"}
    assert np.isfinite(validation[["psnr", "bbdm_psnr"]].to_numpy()).all()

    triplets = pd.read_csv(tmp_path / "whole" / "triplets.csv")
    assert (triplets["subject"] != triplets["reference_subject"]).all()
    a, b = (torch.load(tmp_path / name / "controlnet.pt", weights_only=True)["model"] for name in ("whole", "split"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    model, _ = load_controlled_denoiser(inputs["bbdm"], tmp_path / "whole" / "controlnet.pt")
    assert any(
        tensor.any()
        for name, tensor in model.controlnet.state_dict().items()
        if name.startswith("controlnet_mid_block")
    )


def test_inputs_that_do_not_belong_together_are_refused(inputs, tmp_path):
    root = inputs["root"]
    config = ControlNetTrainConfig(iters=1, **SETTINGS)
    save_encoder(root / "other_encoder.pt", seed=1)
    with pytest.raises(ValueError, match="built with encoder"):
        train_controlnet(
            inputs["data"], tmp_path / "a", inputs["bbdm"], inputs["kb"], root / "other_encoder.pt", config
        )
    save_bbdm(root / "bbdm64.pt", tiny_bbdm(64))
    with pytest.raises(ValueError, match=r"holds 32x32 slices, but the BBDM .* is for 64x64"):
        train_controlnet(inputs["data"], tmp_path / "b", root / "bbdm64.pt", inputs["kb"], inputs["encoder"], config)
    with pytest.raises(ValueError, match="no such checkpoint"):
        train_controlnet(inputs["data"], tmp_path / "c", root / "missing.pt", inputs["kb"], inputs["encoder"], config)
    with pytest.raises(ValueError, match="target must be one of"):
        ControlNetTrainConfig(target="mri")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_command_line_trains_resumes_and_reports_errors(inputs, tmp_path, capsys):
    common = [
        "--data",
        str(inputs["data"]),
        "--bbdm",
        str(inputs["bbdm"]),
        "--kb",
        str(inputs["kb"]),
        "--encoder",
        str(inputs["encoder"]),
    ]
    options = [
        "--batch-size",
        "2",
        "--val-slices",
        "1",
        "--val-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--min-brain-fraction",
        "0.3",
        "--target",
        "own",
        "--quiet",
    ]
    run = tmp_path / "run"
    assert main(["train-controlnet", *common, "--out", str(run), "--iters", "1", *options]) == 0
    assert main(["train-controlnet", *common, "--out", str(run), "--iters", "2", "--resume", *options]) == 0
    assert "controlnet.pt" in capsys.readouterr().out
    assert list(pd.read_csv(run / "loss.csv").iteration) == [1, 2]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["train_config"]
    assert saved["target"] == "own" and saved["min_brain_fraction"] == 0.3
    assert (
        main(
            [
                "train-controlnet",
                *common,
                "--out",
                str(tmp_path / "x"),
                "--iters",
                "1",
                "--kb",
                str(tmp_path / "nowhere"),
                "--quiet",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: knowledge base")
