"""Server settings (--conf) and request parameters: defaults, conversions and refusals."""

from __future__ import annotations

import pytest

from app.server.config import ServerConfig
from app.server.request import RequestError, parse_infer_params, result_id_of
from lib.presets import DEFAULT_WEIGHTS_DIR

PRESETS = ["ct2mri", "flair2t1"]


def test_defaults_come_from_the_server():
    params = parse_infer_params({"model": "rebrain", "image": "x", "device": ["cpu"]}, "ct2mri", 7, PRESETS)
    assert params.preset == "ct2mri" and params.options.steps == 7 and params.options.samples == 1
    assert params.simulate_sparsity is None and params.output == "mri" and params.options.method == "rebrain"
    assert params.options.brain_extraction is True and params.options.alignment is True
    assert parse_infer_params({"brain_extraction": "false"}, "ct2mri", None, PRESETS).options.brain_extraction is False
    assert parse_infer_params({"alignment": "0"}, "ct2mri", None, PRESETS).options.alignment is False


def test_form_strings_are_converted():
    params = parse_infer_params(
        {
            "preset": "flair2t1",
            "steps": "12",
            "samples": "3",
            "seed": "5",
            "target_spacing": "2.5",
            "simulate_sparsity": "3",
            "output": "status",
        },
        "ct2mri",
        None,
        PRESETS,
    )
    assert (
        params.preset == "flair2t1"
        and params.options.steps == 12
        and params.options.samples == 3
        and params.options.seed == 5
    )
    assert params.options.target_spacing == 2.5 and params.simulate_sparsity == 3 and params.output == "status"
    # Several samples without an explicit eta sample stochastically.
    assert params.options.effective_eta == 1.0


@pytest.mark.parametrize(
    ("request_params", "named"),
    [
        ({"steps": "ten"}, "'steps'"),
        ({"steps": 1}, "'steps'"),
        ({"steps": 2.5}, "'steps'"),
        ({"samples": 0}, "'samples'"),
        ({"seed": -1}, "'seed'"),
        ({"target_spacing": 0}, "'target_spacing'"),
        ({"simulate_sparsity": 1}, "'simulate_sparsity'"),
        ({"preset": "t2tomri"}, "'preset'"),
        ({"method": "magic"}, "'method'"),
        ({"output": "label"}, "'output'"),
        ({"samples": 2, "eta": 0}, "eta"),
        ({"brain_extraction": "perhaps"}, "'brain_extraction'"),
        ({"alignment": "maybe"}, "'alignment'"),
    ],
)
def test_bad_parameters_are_refused_by_name(request_params, named):
    with pytest.raises(RequestError, match=named):
        parse_infer_params(request_params, "ct2mri", None, PRESETS)


def test_result_ids_must_be_ours():
    assert result_id_of({}) is None
    assert result_id_of({"result_id": "a" * 32}) == "a" * 32
    for bad in ("../../etc/passwd", "A" * 32, 42):
        with pytest.raises(RequestError, match="result_id"):
            result_id_of({"result_id": bad})


def test_conf_parses_and_checks_options(tmp_path):
    config = ServerConfig.from_conf(
        {
            "preset": "flair2t1",
            "device": "cpu",
            "preload": "yes",
            "steps": "4",
            "results": str(tmp_path),
            "server_mode": "true",
        }
    )
    assert (
        config.weights == DEFAULT_WEIGHTS_DIR
        and config.preset == "flair2t1"
        and config.preload is True
        and config.steps == 4
    )
    assert config.results == tmp_path and config.available_presets() == PRESETS
    for conf, message in (
        ({"preload": "maybe"}, "preload"),
        ({"steps": "0"}, "steps"),
        ({"device": "tpu"}, "device"),
        ({"weights": str(tmp_path / "none")}, "no such folder"),
        ({"preset": "nope"}, "preset 'nope'"),
        ({"kb": str(tmp_path)}, "not a knowledge-base folder"),
    ):
        with pytest.raises(ValueError, match=message):
            ServerConfig.from_conf(conf)
