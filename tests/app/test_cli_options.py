"""One options schema (issue 18, point 7): the command line, the server's request parameters and
``ReconstructionOptions`` accept the same values, refuse the same values, and describe them
with the same help, all made from the fields' metadata."""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import BATCH_OPTIONS, RECONSTRUCT_OPTIONS, build_parser, main
from app.server.config import ServerConfig
from app.server.request import PARAM_HELP, REQUEST_OPTIONS, RequestError, default_params, parse_infer_params
from lib.models.precision import Precision
from lib.options_schema import OptionSpec, option_specs, options_from_arguments
from lib.reconstruction_methods import METHODS
from lib.reconstruction_options import InputOptions, ReconstructionOptions

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["ct2mri"]
OPTIONS = option_specs(ReconstructionOptions)
SPARSITY = option_specs(InputOptions)["simulate_sparsity"]
# The numbers both front ends take: every numeric request option that the command line offers too.
SHARED_NUMBERS = [
    OPTIONS[name]
    for name in REQUEST_OPTIONS
    if name in RECONSTRUCT_OPTIONS and OPTIONS[name].kind in (int, float) and not OPTIONS[name].is_switch
] + [SPARSITY]


def edge_values(spec: OptionSpec) -> list[float]:
    """Values at and just beyond each bound of ``spec``, and the non-finite ones for a float."""
    step = 1 if spec.kind is int else 0.01
    values: list[float] = []
    if spec.bounds.minimum is not None:
        values += [spec.bounds.minimum - step, spec.bounds.minimum]
    if spec.bounds.maximum is not None:
        values += [spec.bounds.maximum, spec.bounds.maximum + step]
    if spec.kind is float:
        values += [math.nan, math.inf]
    return values


def cli_accepts(spec: OptionSpec, value: float) -> bool:
    parser = build_parser()
    try:
        arguments = parser.parse_args(["reconstruct", "ct.nii.gz", "out", spec.flag, str(value)])
    except SystemExit:
        return False
    return getattr(arguments, spec.name) == value


def server_accepts(spec: OptionSpec, value: float) -> bool:
    try:
        params = parse_infer_params({spec.name: value}, "ct2mri", None, PRESETS)
    except RequestError:
        return False
    given = params.simulate_sparsity if spec is SPARSITY else getattr(params.options, spec.name)
    return given == value


def options_accept(spec: OptionSpec, value: float) -> bool:
    try:
        (InputOptions if spec is SPARSITY else ReconstructionOptions)(**{spec.name: value})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("spec", "value"),
    [(spec, value) for spec in SHARED_NUMBERS for value in edge_values(spec)],
    ids=lambda item: item.name if isinstance(item, OptionSpec) else repr(item),
)
def test_cli_server_and_options_enforce_the_schemas_bounds_identically(spec, value, capsys):
    accepted = spec.bounds.problem(value) is None
    assert cli_accepts(spec, value) is accepted
    assert server_accepts(spec, value) is accepted
    assert options_accept(spec, value) is accepted
    capsys.readouterr()


@pytest.mark.parametrize("method", ["rebrain", "interp", "r-as-input", "unknown", "REBRAIN"])
def test_cli_and_server_accept_the_same_methods(method, capsys):
    """The method's words come from one enum: both front ends take exactly its values."""
    expected = method in METHODS
    assert cli_accepts(OPTIONS["method"], method) is expected
    capsys.readouterr()
    assert server_accepts(OPTIONS["method"], method) is expected


@pytest.mark.parametrize("command", ["reconstruct", "batch"])
def test_the_precision_is_one_of_its_words_on_the_command_line(command, capsys):
    """The network's arithmetic is the machine's business: the command lines take it, a request does not."""

    def options(*more: str) -> ReconstructionOptions:
        arguments = build_parser().parse_args([command, "in", "out", *more])
        return ReconstructionOptions(**options_from_arguments(ReconstructionOptions, arguments))

    assert options().precision is Precision.AUTO
    assert options("--precision", "fp32").precision is Precision.FP32
    for word in ("fp16", "BF16"):
        with pytest.raises(SystemExit):
            options("--precision", word)
        assert f"argument --precision: {word!r} is not one of auto, fp32, bf16" in capsys.readouterr().err
    assert "precision" not in REQUEST_OPTIONS


def test_every_request_option_has_the_same_bounds_on_the_command_line():
    """The server offers no option the command line lacks (the CLI's are a superset)."""
    assert set(REQUEST_OPTIONS) <= set(RECONSTRUCT_OPTIONS) and set(BATCH_OPTIONS) <= set(RECONSTRUCT_OPTIONS)


@pytest.mark.parametrize("steps", ["0", "1"])
def test_steps_zero_or_one_is_refused_clearly_everywhere(steps, tmp_path, capsys):
    """``--steps 0`` once meant "the preset's" (``options.steps or preset.steps``); now it is an error."""
    expected = f"must be 2 to 1000, got {steps}"
    for command in (
        ["reconstruct", "ct.nii.gz", str(tmp_path / "out")],
        ["batch", str(tmp_path), str(tmp_path / "out")],
        ["evaluate", "--layout", "open", "--out", str(tmp_path / "report")],
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--steps", steps])
        assert exit_.value.code == 2
        assert f"error: argument --steps: {expected}" in capsys.readouterr().err
    with pytest.raises(RequestError, match=f"^parameter 'steps': {expected}$"):
        parse_infer_params({"steps": steps}, "ct2mri", None, PRESETS)
    with pytest.raises(RequestError, match=f"^parameter 'steps': {expected}$"):
        parse_infer_params({"steps": int(steps)}, "ct2mri", None, PRESETS)
    with pytest.raises(ValueError, match=f"^--conf steps: {expected}$"):
        ServerConfig.from_conf({"steps": steps})
    with pytest.raises(ValueError, match=f"^steps {expected}$"):
        ReconstructionOptions(steps=int(steps))


def test_cli_arguments_make_the_options_the_fields_describe():
    defaults = build_parser().parse_args(["reconstruct", "ct.nii.gz", "out"])
    assert ReconstructionOptions(**options_from_arguments(ReconstructionOptions, defaults)) == ReconstructionOptions()
    given = build_parser().parse_args(
        ["reconstruct", "ct.nii.gz", "out", "--steps", "4", "--samples", "3", "--eta", "0.5", "--seed", "7"]
        + ["--batch-size", "2", "--precision", "bf16", "--target-spacing", "2", "--no-retrieval", "--no-controlnet"]
        + ["--no-brain-extraction", "--no-alignment", "--method", "bbdm", "--simulate-sparsity", "3"]
    )
    assert ReconstructionOptions(**options_from_arguments(ReconstructionOptions, given)) == ReconstructionOptions(
        steps=4,
        samples=3,
        eta=0.5,
        seed=7,
        batch_size=2,
        precision="bf16",
        target_spacing=2.0,
        use_retrieval=False,
        use_controlnet=False,
        brain_extraction=False,
        alignment=False,
        method="bbdm",
    )
    assert given.simulate_sparsity == 3
    batch = build_parser().parse_args(["batch", "in", "out", "--no-brain-extraction", "--steps", "3"])
    batch_options = ReconstructionOptions(**options_from_arguments(ReconstructionOptions, batch))
    assert batch_options == ReconstructionOptions(steps=3, brain_extraction=False)


def test_server_defaults_parse_to_the_options_defaults():
    """MONAI Label merges the task's config into every request: each default must parse to itself."""
    params = parse_infer_params(default_params("ct2mri", None), "ct2mri", None, PRESETS)
    assert params.options == ReconstructionOptions() and params.simulate_sparsity is None
    assert parse_infer_params(default_params("ct2mri", 7), "ct2mri", 7, PRESETS).options.steps == 7


def test_server_help_comes_from_the_schema():
    for name in REQUEST_OPTIONS:
        assert PARAM_HELP[name].startswith(OPTIONS[name].describe())
    assert PARAM_HELP["simulate_sparsity"].startswith(SPARSITY.describe())
    assert set(PARAM_HELP) == {
        "preset",
        "steps",
        "samples",
        "seed",
        "eta",
        "target_spacing",
        "simulate_sparsity",
        "brain_extraction",
        "alignment",
        "method",
        "output",
        "result_id",
    }


def reconstruct_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["reconstruct"]


def test_reconstruct_help_lists_every_option_with_its_help():
    result = subprocess.run(
        [sys.executable, "main.py", "reconstruct", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # argparse wraps lines (and breaks words at hyphens): compare without whitespace.
    shown = "".join(result.stdout.split())
    actions = [action for action in reconstruct_parser()._actions if action.option_strings]
    assert len(actions) >= len(RECONSTRUCT_OPTIONS) + 6
    for action in actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[-1] in result.stdout
        assert "".join(action.help.replace("%%", "%").split()) in shown, action.option_strings
    for name in RECONSTRUCT_OPTIONS:
        assert "".join(OPTIONS[name].help.split()) in shown, name


def test_library_errors_are_reported_with_the_commands_flags(tmp_path, capsys):
    """The library names its parameters (``src``, ``overwrite=True``); the command line its flags."""
    assert main(["prepare", "--layout", "brats", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: the brats layout needs its dataset folder (--src)\n"
    (tmp_path / "out").mkdir()
    assert main(["prepare", "--layout", "open", "--subjects", "1", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'out'}: already exists (pass --overwrite to replace it)\n"
    # A reversed CT window is refused before any subject is synthesised, nothing written.
    args = ["prepare", "--layout", "open", "--subjects", "1", "--ct-window", "90", "-30", "--out", str(tmp_path / "w")]
    assert main(args) == 2
    assert capsys.readouterr().err == "error: the CT window must be LOW HIGH with HIGH > LOW, got 90 -30\n"
    assert not (tmp_path / "w").exists()


CONTROLNET_INPUTS = ["--bbdm", "model.pt", "--kb", "kb", "--encoder", "encoder.pt"]


@pytest.mark.parametrize(
    ("command", "module", "name", "required"),
    [
        ("train-bbdm", "lib.train.bbdm", "TrainConfig", []),
        ("train-retrieval", "lib.train.retrieval", "RetrievalTrainConfig", []),
        ("train-controlnet", "lib.train.controlnet", "ControlNetTrainConfig", CONTROLNET_INPUTS),
    ],
)
def test_training_arguments_are_the_training_configs_fields(command, module, name, required):
    """build_parser no longer retypes the training configs' defaults: each field is an argument."""
    options_class = getattr(importlib.import_module(module), name)
    arguments = build_parser().parse_args([command, "--data", "d", "--out", "o", *required])
    assert set(option_specs(options_class)) <= set(vars(arguments))
    assert options_class(**options_from_arguments(options_class, arguments)) == options_class()
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--data", "d", "--out", "o", *required, "--iters", "0"])
    if "loss" in option_specs(options_class):  # the bridge trainers take the bridge loss by name
        chosen = build_parser().parse_args([command, "--data", "d", "--out", "o", *required, "--loss", "l1"])
        assert options_class(**options_from_arguments(options_class, chosen)).loss == "l1"
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--data", "d", "--out", "o", *required, "--loss", "huber"])
