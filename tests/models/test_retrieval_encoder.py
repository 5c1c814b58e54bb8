"""The retrieval encoder: unit embeddings, perceptual features, weights files, hashing, no network."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.io.checkpoint import load_checkpoint, save_checkpoint
from lib.models.retrieval_encoder import (
    CHECKPOINT_KIND,
    RetrievalConfig,
    build_retrieval_encoder,
    embed_slices,
    encoder_hash,
)

TINY = RetrievalConfig(
    image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(0, 1)
)


def tiny_encoder(seed: int = 0, config: RetrievalConfig = TINY):
    torch.manual_seed(seed)
    return build_retrieval_encoder(config)


def random_slices(count: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def save_encoder(path, model) -> None:
    save_checkpoint(path, {"kind": CHECKPOINT_KIND, "config": model.config.to_dict(), "model": model.state_dict()})


def test_embedding_is_unit_norm_and_features_follow_the_perceptual_blocks():
    model = tiny_encoder().eval()
    embedding, features = model(random_slices(5))
    assert embedding.shape == (5, 16)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(5))
    assert len(features) == len(TINY.perceptual_blocks)
    assert all(f.shape == (5, TINY.feature_dim) and TINY.feature_dim == 16 * 32 for f in features)
    torch.testing.assert_close(features[0].norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("blocks", [(0,), (1,), (0, 1)])
def test_features_are_the_normalised_patch_tokens_of_the_named_blocks(blocks):
    config = RetrievalConfig(**{**TINY.to_dict(), "perceptual_blocks": blocks})
    model = tiny_encoder(config=config).eval()
    outputs = {}
    for index, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
    _, features = model(random_slices(3))
    for block, f in zip(blocks, features):
        tokens = outputs[block][:, 1:]  # drop the class token
        expected = F.normalize(F.layer_norm(tokens, (32,)).flatten(1), dim=1)
        torch.testing.assert_close(f, expected)


def test_features_keep_the_perceptual_distance_away_from_underflow():
    model = tiny_encoder().eval()
    _, features = model(random_slices(4))
    for f in features:
        squared = torch.cdist(f, f) ** 2
        assert squared.max() <= 4 + 1e-5
        assert torch.exp(-squared).min() >= np.exp(-4) - 1e-6


def test_building_is_deterministic_under_a_seed_and_differs_across_seeds():
    x = random_slices(3)
    a, b, c = tiny_encoder(0).eval(), tiny_encoder(0).eval(), tiny_encoder(1).eval()
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
    assert not torch.allclose(a(x)[0], c(x)[0])
    assert encoder_hash(a) == encoder_hash(b) != encoder_hash(c)


def test_building_and_running_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the retrieval encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = build_retrieval_encoder(
        RetrievalConfig(
            image_size=32, patch_size=8, width=32, depth=2, heads=2, embedding_dim=16, perceptual_blocks=(1,)
        )
    )
    assert model(random_slices(2))[0].shape == (2, 16)


def test_weights_file_round_trip_gives_identical_embeddings_and_hash(tmp_path):
    trained = tiny_encoder(3)
    save_encoder(tmp_path / "encoder.pt", trained)
    torch.manual_seed(99)  # a different random init, fully replaced by the file
    loaded = build_retrieval_encoder(TINY, tmp_path / "encoder.pt")
    x = random_slices(7)
    np.testing.assert_array_equal(embed_slices(trained, x), embed_slices(loaded, x))
    assert encoder_hash(loaded) == encoder_hash(trained)
    assert encoder_hash(load_checkpoint(tmp_path / "encoder.pt")["model"], TINY) == encoder_hash(trained)
    # A bare state dict works too.
    save_checkpoint(tmp_path / "bare.pt", trained.state_dict())
    assert encoder_hash(build_retrieval_encoder(TINY, tmp_path / "bare.pt")) == encoder_hash(trained)


def test_hash_changes_with_any_weight_or_the_config():
    model = tiny_encoder()
    before = encoder_hash(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["projection.2.bias"][0] += 1e-6
    assert encoder_hash(state, TINY) != before
    other_blocks = RetrievalConfig(**{**TINY.to_dict(), "perceptual_blocks": (1,)})
    assert encoder_hash(model.state_dict(), other_blocks) != before
    with pytest.raises(ValueError, match="needs the encoder's config"):
        encoder_hash(model.state_dict())


def test_mismatched_weights_files_raise_clear_errors(tmp_path):
    wider = RetrievalConfig(**{**TINY.to_dict(), "width": 64})
    save_checkpoint(tmp_path / "wider.pt", tiny_encoder(config=wider).state_dict())
    with pytest.raises(ValueError, match="shape mismatches.*file .*64"):
        build_retrieval_encoder(TINY, tmp_path / "wider.pt")
    deeper = RetrievalConfig(**{**TINY.to_dict(), "depth": 3})
    save_checkpoint(tmp_path / "deeper.pt", tiny_encoder(config=deeper).state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys \['backbone.blocks.2"):
        build_retrieval_encoder(TINY, tmp_path / "deeper.pt")
    save_encoder(tmp_path / "wider_checkpoint.pt", tiny_encoder(config=wider))
    with pytest.raises(ValueError, match="expected"):
        build_retrieval_encoder(TINY, tmp_path / "wider_checkpoint.pt")
    save_checkpoint(tmp_path / "bbdm.pt", {"kind": "bbdm", "model": {}})
    with pytest.raises(ValueError, match="'bbdm' checkpoint"):
        build_retrieval_encoder(TINY, tmp_path / "bbdm.pt")
    with pytest.raises(ValueError, match="no such checkpoint"):
        build_retrieval_encoder(TINY, tmp_path / "absent.pt")


def test_embed_slices_batches_match_one_pass_and_restore_the_mode():
    model = tiny_encoder()
    x = random_slices(10)
    embeddings = embed_slices(model, x, batch_size=3)
    assert embeddings.dtype == np.float32 and embeddings.shape == (10, 16)
    assert model.training
    model.eval()
    np.testing.assert_allclose(embeddings, model(x)[0].detach().numpy(), atol=1e-6)
    assert embed_slices(model, x[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="batch_size"):
        embed_slices(model, x, batch_size=0)


def test_wrong_input_shape_and_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        tiny_encoder()(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="must divide image_size"):
        RetrievalConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="must divide width"):
        RetrievalConfig(width=32, heads=3)
    with pytest.raises(ValueError, match="block indices in 0..1"):
        RetrievalConfig(depth=2, perceptual_blocks=(2,))
    with pytest.raises(ValueError, match="unknown retrieval config keys"):
        RetrievalConfig.from_dict({**TINY.to_dict(), "neighbours": 1})
    assert RetrievalConfig.from_dict(TINY.to_dict()) == TINY
