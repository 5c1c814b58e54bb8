"""Options described once: a dataclass field's default, help and bounds drive every front end.

An options dataclass (:class:`lib.reconstruction_options.ReconstructionOptions`, the training
configs) describes each field in its metadata::

    steps: int | None = field(default=None, metadata={"help": "sampling steps", "min": 2, "max": 1000,
                                                      "none": "the preset's"})

``help``
    one line for users: the command line's ``--help`` and the server's ``/info/``. A boolean
    field whose default is true is described as what it does when on (a verb first: the
    command line's ``--no-...`` flag reads "do not <help>").
``min``, ``max``
    inclusive bounds of a number, either may be absent; enforced by the dataclass itself
    (:func:`check_bounds` in ``__post_init__``), by the command line (:func:`add_arguments`)
    and by the server's request parameters, with the same message.
``none``
    what ``None`` means for a field whose default is None ("the preset's").
``cli``
    the command-line flag when it is not ``--`` and the name with dashes (``--no-`` and the name
    for a boolean whose default is true; ``--no-retrieval`` for ``use_retrieval``).
``metavar``, ``choices``
    the command line's placeholder; the accepted words of a ``str`` field (an ``Enum`` field's
    are its values).

No heavy imports (no torch), so that front ends can build their help without loading the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self


class OptionWord(enum.StrEnum):
    """An option whose value is one of a few words; :meth:`parse` names them when refusing one.

    A subclass sets ``option = enum.nonmember("its name")`` for the error message.
    """

    @classmethod
    def parse(cls, value: OptionWord | str) -> Self:
        """The member named ``value``.

        Raises:
            ValueError: naming the option and its accepted words.
        """
        try:
            return cls(value)
        except ValueError:
            name = getattr(cls, "option", cls.__name__)
            raise ValueError(f"{name} must be one of {[member.value for member in cls]}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The accepted range of a number.

    Attributes:
        minimum: the smallest accepted value (None: no lower bound).
        maximum: the largest accepted value (None: no upper bound).
        exclusive_minimum: ``minimum`` itself is refused (a positive number: ``Bounds(0, exclusive_minimum=True)``).
    """

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def __str__(self) -> str:
        low = None if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}"
        high = None if self.maximum is None else f"<= {_number(self.maximum)}"
        if low is not None and high is not None and not self.exclusive_minimum:
            return f"{_number(self.minimum)} to {_number(self.maximum)}"
        return " and ".join(part for part in (low, high) if part) or "any number"

    def problem(self, value: float) -> str | None:
        """Why ``value`` is refused ("must be 2 to 1000, got 0"), or None when it is accepted."""
        below = self.minimum is not None and (
            value < self.minimum or (self.exclusive_minimum and value == self.minimum)
        )
        above = self.maximum is not None and value > self.maximum
        if not math.isfinite(value) or below or above:
            return f"must be {self}, got {value!r}"
        return None


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option of an options dataclass, read from a field and its metadata (see the module docstring).

    Attributes:
        name: the field name (and the server's parameter name).
        kind: ``int``, ``float``, ``str``, ``bool`` or an ``Enum`` subclass; of the items for ``many``.
        default: the field's default.
        help: one line for users ("" when the field has none).
        bounds: the accepted range of a number (None: any value of ``kind``).
        none: what None means ("" when None is not accepted).
        flag: the command-line flag.
        metavar: the command line's placeholder (None: argparse's).
        choices: the accepted values of a ``str`` or ``Enum`` option (None: any).
        many: a tuple field, given as one or more values.
    """

    name: str
    kind: type
    default: Any
    help: str
    bounds: Bounds | None
    none: str
    flag: str
    metavar: str | None
    choices: tuple[str, ...] | None
    many: bool

    @property
    def is_switch(self) -> bool:
        """A boolean: a flag on the command line, true/false on the server."""
        return self.kind is bool and not self.many

    def convert(self, raw: Any) -> Any:
        """A value of :attr:`kind` (one item for ``many``) from a command-line word or a JSON value,
        checked against the bounds.

        A whole number must be one (``2.5`` and ``true`` are refused for ``steps``); booleans are
        the front end's (flags on the command line, words on the server).

        Raises:
            ValueError: with what is accepted ("must be 2 to 1000, got 0", "not a whole number: 'ten'").
        """
        if self.kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(f"not a whole number: {raw!r}")
            try:
                value: Any = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"not a whole number: {raw!r}") from None
        elif self.kind is float:
            try:
                if isinstance(raw, bool):
                    raise TypeError(raw)
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"not a number: {raw!r}") from None
            if self.bounds is None and not math.isfinite(value):
                raise ValueError(f"must be a finite number, got {raw!r}")
        else:
            value = str(raw)
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return value
        problem = self.bounds.problem(value) if self.bounds is not None else None
        if problem:
            raise ValueError(problem)
        return value

    def problem(self, value: Any) -> str | None:
        """Why a (converted) ``value`` is refused, or None; None is accepted where the default is None."""
        if value is None:
            return None if self.default is None else "must be given"
        if self.bounds is None:
            return None
        for item in value if self.many else (value,):
            if isinstance(item, int | float) and not isinstance(item, bool):
                problem = self.bounds.problem(item)
                if problem:
                    return problem
        return None

    def describe(self) -> str:
        """The help line with the accepted range and the default, as the command line and the server show it."""
        if self.is_switch:
            return f"{self.help}; default {'true' if self.default else 'false'}"
        facts = [str(self.bounds)] if self.bounds is not None else []
        if self.none and self.default is None:
            facts.append(f"default: {self.none}")
        elif self.default is not None and self.default != ():
            shown = " ".join(map(str, self.default)) if self.many else getattr(self.default, "value", self.default)
            facts.append(f"default {shown}")
        return f"{self.help} ({'; '.join(facts)})" if facts else self.help


def _kind_of(hint: Any) -> tuple[type, bool]:
    """(kind, many) of a field's type hint: ``int | None`` -> (int, False), ``tuple[int, ...]`` -> (int, True)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported option type {hint!r}")
        hint = members[0]
    if typing.get_origin(hint) in (tuple, list):
        items = [item for item in typing.get_args(hint) if item is not Ellipsis]
        if len(set(items)) != 1:
            raise TypeError(f"unsupported option type {hint!r}")
        return items[0], True
    if not isinstance(hint, type):
        raise TypeError(f"unsupported option type {hint!r}")
    return hint, False


@functools.cache
def option_specs(options_class: type) -> dict[str, OptionSpec]:
    """The :class:`OptionSpec` of every field of a dataclass, by name, in field order.

    Raises:
        TypeError: a field whose type is not a number, word, boolean, ``Enum`` or tuple of one of
            these (such a field cannot be an option; describe only the ones that are).
    """
    hints = typing.get_type_hints(options_class)
    specs = {}
    for field in dataclasses.fields(options_class):
        metadata = field.metadata
        try:
            kind, many = _kind_of(hints[field.name])
        except TypeError:
            if metadata:
                raise
            continue  # a field that is not an option (no metadata, not a simple type)
        low, high = metadata.get("min"), metadata.get("max")
        choices = metadata.get("choices")
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = tuple(member.value for member in kind)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        switched_off = kind is bool and not many and default is True
        specs[field.name] = OptionSpec(
            name=field.name,
            kind=kind,
            default=default,
            help=metadata.get("help", ""),
            bounds=Bounds(low, high) if low is not None or high is not None else None,
            none=metadata.get("none", ""),
            flag=metadata.get("cli") or ("--no-" if switched_off else "--") + field.name.replace("_", "-"),
            metavar=metadata.get("metavar"),
            choices=tuple(choices) if choices is not None else None,
            many=many,
        )
    return specs


def check_bounds(options: Any) -> None:
    """Refuse a dataclass instance with a field out of its metadata's bounds (call in ``__post_init__``).

    Raises:
        ValueError: naming the field: "steps must be 2 to 1000, got 0".
    """
    for name, spec in option_specs(type(options)).items():
        problem = spec.problem(getattr(options, name))
        if problem:
            raise ValueError(f"{name} {problem}")


def argument_type(kind: type, bounds: Bounds | None = None) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (``int`` or ``float``) within ``bounds``.

    argparse names the option in the refusal ("argument --steps: must be 2 to 1000, got 0"), so a
    0 is never quietly taken for "the default" further on.
    """
    spec = OptionSpec("", kind, None, "", bounds, "", "", None, None, False)
    return _parse_with(spec)


def option_type(options_class: type, name: str) -> Callable[[str], Any]:
    """The argparse type of one field (its bounds checked), for an argument that takes that field's
    values under another default or help (``evaluate --eta``, ``make-preset --steps``)."""
    return _parse_with(option_specs(options_class)[name])


def _parse_with(spec: OptionSpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return spec.convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = spec.kind.__name__  # argparse's "invalid <name> value" when it is not our error
    return parse


def add_arguments(parser: argparse.ArgumentParser, options_class: type, names: Iterable[str]) -> None:
    """Add the command-line arguments of some fields of an options dataclass (in the order of ``names``).

    A number is checked against its bounds, a tuple takes one or more values, a boolean whose
    default is true gets a ``--no-...`` flag that turns it off (one whose default is false a flag
    that turns it on); each argument's ``dest`` is the field name, so :func:`options_from_arguments`
    finds it.

    Raises:
        KeyError: a name that is not an option of ``options_class``.
    """
    specs = option_specs(options_class)
    for name in names:
        spec = specs[name]
        if spec.is_switch:
            if spec.default:
                parser.add_argument(spec.flag, dest=name, action="store_false", help=_literal(f"do not {spec.help}"))
            else:
                parser.add_argument(spec.flag, dest=name, action="store_true", help=_literal(spec.help))
            continue
        parser.add_argument(
            spec.flag,
            dest=name,
            type=_parse_with(spec),
            default=list(spec.default) if spec.many else spec.default,
            nargs="+" if spec.many else None,
            choices=spec.choices,
            metavar=spec.metavar,
            help=_literal(spec.describe()),
        )


def _literal(text: str) -> str:
    """``text`` as argparse prints it (argparse reads ``%`` in help as a format)."""
    return text.replace("%", "%%")


def options_from_arguments(options_class: type, arguments: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``options_class`` that ``arguments`` holds (added by :func:`add_arguments`), by name."""
    values = {}
    for name, spec in option_specs(options_class).items():
        if hasattr(arguments, name):
            value = getattr(arguments, name)
            values[name] = tuple(value) if spec.many and value is not None else value
    return values


def option_help(options_class: type, names: Sequence[str]) -> dict[str, str]:
    """``{name: help line}`` of some fields, as :meth:`OptionSpec.describe` writes it (the server's ``/info/``)."""
    specs = option_specs(options_class)
    return {name: specs[name].describe() for name in names}
