"""lib/options_schema.py: a dataclass field's metadata becomes checked arguments and help."""

from __future__ import annotations

import argparse
import enum
import math
from dataclasses import dataclass, field

import pytest

from lib.options_schema import (
    Bounds,
    add_arguments,
    check_bounds,
    option_help,
    option_specs,
    options_from_arguments,
)
from lib.reconstruction_options import InputOptions, ReconstructionOptions


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Sample:
    count: int = field(default=3, metadata={"help": "how many", "min": 1, "max": 9})
    ratio: float | None = field(default=None, metadata={"help": "share, in %", "min": 0.0, "none": "all"})
    sizes: tuple[int, ...] = field(default=(4, 8), metadata={"help": "sizes", "min": 1})
    colour: Colour = field(default=Colour.RED, metadata={"help": "colour"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    label: str = "x"

    def __post_init__(self) -> None:
        check_bounds(self)


def parse(*words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Sample, [spec for spec in option_specs(Sample) if spec != "label"])
    return parser.parse_args(list(words))


def test_fields_become_arguments_with_the_fields_defaults():
    arguments = parse()
    assert options_from_arguments(Sample, arguments) == {k: v for k, v in Sample().__dict__.items() if k != "label"}
    assert Sample(**options_from_arguments(Sample, arguments)) == Sample()
    given = parse("--count", "9", "--ratio", "0.5", "--sizes", "2", "3", "--colour", "blue", "--no-fast", "--verbose")
    assert Sample(**options_from_arguments(Sample, given)) == Sample(
        count=9, ratio=0.5, sizes=(2, 3), colour=Colour.BLUE, fast=False, verbose=True
    )


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--count", "0"], "must be 1 to 9, got 0"),
        (["--count", "10"], "must be 1 to 9, got 10"),
        (["--count", "2.5"], "not a whole number: '2.5'"),
        (["--ratio", "-0.1"], "must be >= 0, got -0.1"),
        (["--ratio", "nan"], "must be >= 0, got nan"),
        (["--ratio", "inf"], "must be >= 0, got inf"),
        (["--sizes", "4", "0"], "must be >= 1, got 0"),
        (["--colour", "green"], "'green' is not one of red, blue"),
    ],
)
def test_out_of_bounds_arguments_are_refused_naming_the_bound(words, message):
    with pytest.raises(argparse.ArgumentError, match=message):
        parse(*words)


def test_the_dataclass_checks_the_same_bounds():
    with pytest.raises(ValueError, match="^count must be 1 to 9, got 0$"):
        Sample(count=0)
    with pytest.raises(ValueError, match="^sizes must be >= 1, got 0$"):
        Sample(sizes=(1, 0))
    with pytest.raises(ValueError, match="^ratio must be >= 0, got nan$"):
        Sample(ratio=math.nan)
    assert Sample(ratio=None).ratio is None


def test_help_shows_bounds_and_defaults():
    assert option_help(Sample, ["count", "ratio", "sizes", "colour", "fast"]) == {
        "count": "how many (1 to 9; default 3)",
        "ratio": "share, in % (>= 0; default: all)",
        "sizes": "sizes (>= 1; default 4 8)",
        "colour": "colour (default red)",
        "fast": "go fast; default true",
    }
    specs = option_specs(Sample)
    assert specs["fast"].flag == "--no-fast" and specs["verbose"].flag == "--verbose"
    assert specs["colour"].choices == ("red", "blue")


@pytest.mark.parametrize(
    ("bounds", "text", "refused", "accepted"),
    [
        (Bounds(2, 1000), "2 to 1000", [1, 1001, math.nan], [2, 1000]),
        (Bounds(0.0), ">= 0", [-1e-9, math.inf], [0.0, 1e9]),
        (Bounds(0, exclusive_minimum=True), "> 0", [0, -1], [1e-9]),
        (Bounds(None, 1), "<= 1", [2], [-5, 1]),
    ],
)
def test_bounds(bounds, text, refused, accepted):
    assert str(bounds) == text
    assert all(bounds.problem(value) for value in refused)
    assert not any(bounds.problem(value) for value in accepted)


def test_every_reconstruction_option_has_help():
    for options in (ReconstructionOptions, InputOptions):
        for name, spec in option_specs(options).items():
            assert spec.help or name == "method", f"{options.__name__}.{name} has no help"
