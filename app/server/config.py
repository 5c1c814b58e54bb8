"""Server settings from ``monailabel start_server --conf NAME VALUE`` pairs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from lib.options_schema import option_specs
from lib.presets import DEFAULT_WEIGHTS_DIR, PRESET_FILE
from lib.reconstruction_options import ReconstructionOptions

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(value: str | bool) -> bool:
    """``"true"``/``"false"`` (and 1/0, yes/no, on/off) -> bool; anything else is a ValueError."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


@dataclass(frozen=True)
class ServerConfig:
    """What an admin sets with ``--conf``.

    Attributes:
        preset: the default preset for requests that name none.
        weights: the folder of presets (default: the shipped ``model_weights/``).
        kb: a knowledge-base folder that replaces the default preset's own (None: the preset's).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        preload: load the default preset's models at start-up instead of on the first request.
        steps: default sampling steps (None: the preset's).
        results: where finished results are kept for the extra outputs (uncertainty, ...).
        keep_results: how many finished results are kept; the oldest are deleted first.
        read_only: serve only ``/info/`` and ``/infer`` (default); false also opens MONAI Label's
            datastore, model, batch, logs, ... endpoints, to the admin role when auth is on
            (see :mod:`app.server.guard`).
        max_upload_mb: the largest request body accepted (an uploaded image), in MiB.
        max_image_mb: the largest input volume accepted, as float32 in memory, in MiB; checked
            from the file's header before its data is read (a gzip bomb is refused unread).
        max_work: the largest request in slice-steps (sampling steps x samples x output slices).
        insecure_remote_access: serve without authentication on an address other than loopback
            (only behind a gateway that authenticates; off by default: the server refuses).
    """

    preset: str = "ct2mri"
    weights: Path = DEFAULT_WEIGHTS_DIR
    kb: Path | None = None
    device: str = "auto"
    preload: bool = False
    steps: int | None = None
    results: Path = Path(tempfile.gettempdir()) / "rebrain-results"
    keep_results: int = 32
    read_only: bool = True
    max_upload_mb: int = 256
    max_image_mb: int = 768
    max_work: int = 20000
    insecure_remote_access: bool = False

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> ServerConfig:
        """Parse MONAI Label's ``conf`` dict; MONAI Label's own keys (e.g. ``server_mode``) pass.

        Raises:
            ValueError: a bad value, naming the option.
        """
        values: dict = {}
        if "preset" in conf:
            values["preset"] = str(conf["preset"])
        if "weights" in conf:
            values["weights"] = Path(conf["weights"]).expanduser()
        if "kb" in conf:
            values["kb"] = Path(conf["kb"]).expanduser()
        if "device" in conf:
            if conf["device"] not in ("auto", "cpu", "cuda") and not str(conf["device"]).startswith("cuda:"):
                raise ValueError(f"--conf device {conf['device']!r}: expected auto, cpu, cuda or cuda:N")
            values["device"] = str(conf["device"])
        for name in ("preload", "read_only", "insecure_remote_access"):
            if name in conf:
                try:
                    values[name] = parse_bool(conf[name])
                except ValueError as error:
                    raise ValueError(f"--conf {name} {error}") from None
        if "steps" in conf:  # the requests' default steps: the bounds every front end checks
            try:
                values["steps"] = option_specs(ReconstructionOptions)["steps"].convert(conf["steps"])
            except ValueError as error:
                raise ValueError(f"--conf steps: {error}") from None
        for name in ("keep_results", "max_upload_mb", "max_image_mb", "max_work"):
            if name in conf:
                try:
                    number = int(conf[name])
                except ValueError:
                    raise ValueError(f"--conf {name} {conf[name]!r}: expected a whole number") from None
                if number < 1:
                    raise ValueError(f"--conf {name} {number}: must be at least 1")
                values[name] = number
        if "results" in conf:
            values["results"] = Path(conf["results"]).expanduser()
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Refuse settings that cannot work before the server starts serving."""
        if not self.weights.is_dir():
            raise ValueError(f"--conf weights {self.weights}: no such folder")
        if self.preset not in self.available_presets():
            raise ValueError(
                f"--conf preset {self.preset!r}: not in {self.weights} (available: "
                f"{', '.join(self.available_presets()) or 'none'})"
            )
        if self.kb is not None and not (self.kb / "manifest.json").is_file():
            raise ValueError(f"--conf kb {self.kb}: not a knowledge-base folder (no manifest.json)")

    @property
    def max_upload_bytes(self) -> int:
        """:attr:`max_upload_mb` in bytes."""
        return self.max_upload_mb * 1024**2

    @property
    def max_image_bytes(self) -> int:
        """:attr:`max_image_mb` in bytes."""
        return self.max_image_mb * 1024**2

    def available_presets(self) -> list[str]:
        """The preset names in the weights folder."""
        return sorted(path.parent.name for path in self.weights.glob(f"*/{PRESET_FILE}"))
