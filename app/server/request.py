"""The ``rebrain`` infer task's request parameters: defaults, descriptions and validation.

MONAI Label merges the client's ``params`` JSON into the request next to its own keys
(``model``, ``image``, ``device``, ...), so unknown keys are ignored; every key we own is
checked and a bad value is refused with a message that names it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.server.config import parse_bool
from lib.pipeline import ReconstructionOptions
from lib.reconstruction_methods import METHODS

# What the task can return as the response image; all are on the same grid as the MRI.
OUTPUTS = ("mri", "uncertainty", "similarity", "status")

# Request parameters and their meaning, shown by /info/ (the defaults come from the server).
PARAM_HELP = {
    "preset": "model preset (see 'presets'); default: the server's --conf preset",
    "steps": "sampling steps (default: --conf steps, else the preset's)",
    "samples": "samples per slice; > 1 also gives a per-voxel uncertainty (std)",
    "seed": "random seed of the sampler",
    "eta": "sampler noise (default 0 for one sample, 1 for several)",
    "target_spacing": "output slice spacing in mm (default: the preset's, 1 mm)",
    "simulate_sparsity": "keep every k-th input slice first (k >= 2); 0 or absent: the input is the sparse scan",
    "brain_extraction": "CT presets: remove skull and scalp of a real head CT first (default true; false for brain-only inputs)",
    "alignment": "real head CT: register it to the CT head template for the slice positions (default true; false: the brain's own extent)",
    "method": "rebrain (the method) or an evaluation baseline: " + ", ".join(METHODS[1:]),
    "output": "volume returned as the image: " + ", ".join(OUTPUTS) + " (all are kept; see result_id)",
    "result_id": "fetch an output of an earlier result without recomputing it (with 'output')",
}

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


def _value(
    request: dict,
    name: str,
    convert: Callable[[Any], Any],
    default: Any,
    check: Callable[[Any], bool] = lambda _: True,
    rule: str = "",
) -> Any:
    raw = request.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = convert(raw)
    except (TypeError, ValueError):
        raise RequestError(
            f"parameter {name!r}: {raw!r} is not a valid {convert.__name__}{'; ' + rule if rule else ''}"
        ) from None
    if not check(value):
        raise RequestError(f"parameter {name!r}: {raw!r} is out of range; {rule}")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


_whole.__name__ = "whole number"


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
            f"parameter 'preset': {preset!r} is not available on this server (available: {', '.join(presets) or 'none'})"
        )
    method = str(request.get("method") or "rebrain")
    if method not in METHODS:
        raise RequestError(f"parameter 'method': {method!r} is not one of {', '.join(METHODS)}")
    steps = _value(request, "steps", _whole, default_steps, lambda v: 2 <= v <= 1000, "2 to 1000")
    samples = _value(request, "samples", _whole, 1, lambda v: 1 <= v <= 64, "1 to 64")
    seed = _value(request, "seed", _whole, 0, lambda v: 0 <= v < 2**31, "0 to 2^31 - 1")
    eta = _value(request, "eta", float, None, lambda v: 0.0 <= v <= 1.0, "0 to 1")
    spacing = _value(request, "target_spacing", float, None, lambda v: 0.1 <= v <= 20.0, "0.1 to 20 mm")
    sparsity = _value(
        request, "simulate_sparsity", _whole, None, lambda v: v == 0 or 2 <= v <= 16, "0 (off) or 2 to 16"
    )
    switches = {}
    for name in ("brain_extraction", "alignment"):
        try:
            switches[name] = parse_bool(request.get(name, True))
        except ValueError as error:
            raise RequestError(f"parameter {name!r}: {error}") from None
    try:
        options = ReconstructionOptions(
            steps=steps, samples=samples, eta=eta, seed=seed, target_spacing=spacing, method=method, **switches
        )
    except ValueError as error:
        raise RequestError(f"parameters: {error}") from None
    return InferParams(
        preset=preset, options=options, simulate_sparsity=sparsity or None, output=output_choice(request)
    )
