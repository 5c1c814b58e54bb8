"""The ``rebrain`` infer task's request parameters: defaults, descriptions and validation.

MONAI Label merges the client's ``params`` JSON into the request next to its own keys
(``model``, ``image``, ``device``, ...), so unknown keys are ignored; every key we own is
checked and a bad value is refused with a message that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.server.config import parse_bool
from lib.options_schema import OptionSpec, option_help, option_specs
from lib.reconstruction_options import InputOptions, ReconstructionOptions

# What the task can return as the response image; all are on the same grid as the MRI.
OUTPUTS = ("mri", "uncertainty", "similarity", "status")

# The reconstruction options a request may set. Their meaning, defaults and bounds are the fields'
# metadata (lib/reconstruction_options.py), as for the command line: both accept the same values.
REQUEST_OPTIONS = ("steps", "samples", "seed", "eta", "target_spacing", "brain_extraction", "alignment", "method")

# Request parameters and their meaning, shown by /info/ (the server's defaults are in its 'config').
PARAM_HELP = {
    "preset": "model preset (see 'presets'); default: the server's --conf preset",
    **option_help(ReconstructionOptions, REQUEST_OPTIONS),
    "simulate_sparsity": option_help(InputOptions, ["simulate_sparsity"])["simulate_sparsity"] + "; 0 is off too",
    "output": "volume returned as the image: " + ", ".join(OUTPUTS) + " (all are kept; see result_id)",
    "result_id": "fetch an output of an earlier result without recomputing it (with 'output')",
}
PARAM_HELP["steps"] += "; a server started with --conf steps uses that instead of the preset's"

RESULT_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# A datastore id: a study's file name without its extension, or a DICOM UID. Never a path: no
# separator, no leading dot (so no "..", ".", hidden names), no control characters.
SAFE_ID_PATTERN = re.compile(r"^[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,254}$")


def is_safe_id(value: str) -> bool:
    """True when ``value`` can be a datastore id: a name, never a path (see :data:`SAFE_ID_PATTERN`)."""
    return isinstance(value, str) and bool(SAFE_ID_PATTERN.match(value)) and ".." not in value


@dataclass(frozen=True)
class UploadedImage:
    """An image the client uploaded with the request, saved by the server to ``path``.

    The infer route puts this object (not a string) in the request, so a client cannot pass a
    server path off as an upload: JSON ``params`` can only hold strings there.
    """

    path: str


class RequestError(ValueError):
    """A request parameter the task cannot use; the message names the parameter."""


@dataclass(frozen=True)
class InferParams:
    """One validated ``rebrain`` request.

    Attributes:
        preset: the preset name.
        options: the pipeline options.
        simulate_sparsity: keep every k-th slice of the input first (None: use it as it is).
        output: which volume to return (one of :data:`OUTPUTS`).
    """

    preset: str
    options: ReconstructionOptions
    simulate_sparsity: int | None
    output: str


def _option(request: dict, spec: OptionSpec) -> Any:
    """One option's value from the request (absent or "": the field's default), checked as the field says.

    Raises:
        RequestError: naming the parameter and what it accepts.
    """
    raw = request.get(spec.name)
    if raw is None or raw == "":
        return spec.default
    try:
        return parse_bool(raw) if spec.is_switch else spec.convert(raw)
    except ValueError as error:
        raise RequestError(f"parameter {spec.name!r}: {error}") from None


def default_params(preset: str, steps: int | None) -> dict[str, Any]:
    """The request parameters' defaults, as the task's ``config`` shows them in ``/info/``.

    MONAI Label also merges them into every request, so each must parse to its default: ""
    stands for "the preset's" (None), 0 for no simulated sparsity.

    Args:
        preset: the server's default preset.
        steps: the server's ``--conf steps`` (None: the preset's).
    """
    specs = option_specs(ReconstructionOptions)
    return {
        "preset": preset,
        **{name: "" if specs[name].default is None else specs[name].default for name in REQUEST_OPTIONS},
        "steps": "" if steps is None else steps,
        "simulate_sparsity": 0,
        "output": "mri",
    }


def output_choice(request: dict) -> str:
    """The ``output`` parameter (default ``mri``)."""
    output = str(request.get("output") or "mri")
    if output not in OUTPUTS:
        raise RequestError(f"parameter 'output': {output!r} is not one of {', '.join(OUTPUTS)}")
    return output


def result_id_of(request: dict) -> str | None:
    """The ``result_id`` parameter, checked to be one of ours (32 hex digits), or None."""
    result_id = request.get("result_id")
    if result_id in (None, ""):
        return None
    if not isinstance(result_id, str) or not RESULT_ID_PATTERN.match(result_id):
        raise RequestError(
            f"parameter 'result_id': {result_id!r} is not a result id (32 hex digits, as returned in 'result_id')"
        )
    return result_id


def parse_infer_params(
    request: dict, default_preset: str, default_steps: int | None, presets: list[str]
) -> InferParams:
    """Validate a request's parameters.

    Args:
        request: the merged MONAI Label request.
        default_preset: used when the request names none.
        default_steps: used when the request gives none (None: the preset's).
        presets: the preset names the server has.

    Raises:
        RequestError: naming the parameter, the value and what is accepted.
    """
    preset = str(request.get("preset") or default_preset)
    if preset not in presets:
        raise RequestError(
            f"parameter 'preset': {preset!r} is not available on this server (available: "
            f"{', '.join(presets) or 'none'})"
        )
    specs = option_specs(ReconstructionOptions)
    values = {name: _option(request, specs[name]) for name in REQUEST_OPTIONS}
    if values["steps"] is None:
        values["steps"] = default_steps
    # 0 is the request's word for "off" (a form cannot leave a number out).
    sparsity_spec = option_specs(InputOptions)["simulate_sparsity"]
    sparsity = None if request.get("simulate_sparsity") in (0, "0") else _option(request, sparsity_spec)
    try:
        options = ReconstructionOptions(**values)
    except ValueError as error:
        raise RequestError(f"parameters: {error}") from None
    return InferParams(preset=preset, options=options, simulate_sparsity=sparsity, output=output_choice(request))
