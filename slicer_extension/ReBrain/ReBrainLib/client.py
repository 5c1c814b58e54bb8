"""HTTP client of the ReBrain MONAI Label server (``/info/``, ``/infer/rebrain``).

Multipart in both directions with requests-toolbelt (``MultipartEncoder`` streams the upload,
``MultipartDecoder`` splits the answer), not the removed ``cgi`` module. Every server or
network problem becomes a :class:`ServerError` whose message a user can read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests_toolbelt import MultipartEncoder
from requests_toolbelt.multipart.decoder import MultipartDecoder

MODEL = "rebrain"
# Outputs fetched after the MRI: the uncertainty volume (the similarity and status overlays are
# rebuilt from the provenance, see overlays.py, so they need no download).
DEFAULT_EXTRA_OUTPUTS = ("uncertainty",)


class ServerError(RuntimeError):
    """The server could not be reached or refused the request; ``str()`` is the reason."""


@dataclass
class ReconstructionResult:
    """What one reconstruction gave.

    Attributes:
        params: the server's JSON (result id, notice, summary, per-slice provenance, ...).
        volumes: output name (``mri``, ``uncertainty``, ...) -> downloaded NIfTI file.
    """

    params: dict
    volumes: dict[str, Path] = field(default_factory=dict)

    @property
    def result_id(self) -> str:
        return self.params["result_id"]


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    hint = {
        401: " (the server needs sign-in: enter a valid access token)",
        403: " (your account lacks the role this needs)",
    }.get(response.status_code, "")
    return f"server answered HTTP {response.status_code}: {detail}{hint}"


class ReBrainClient:
    """Talks to one ReBrain server.

    Args:
        url: e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for one answer (a reconstruction takes up to minutes on a CPU).
        token: an access token of the hospital's sign-in (OpenID Connect) for a server with
            authentication on; sent as ``Authorization: Bearer ...``.
    """

    def __init__(self, url: str, timeout: float = 1800.0, token: str | None = None) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ServerError(f"server URL {url!r} must start with http:// or https://")
        self.url = url
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token.strip()}"

    def _post(self, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.post(f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise ServerError(f"cannot reach the ReBrain server at {self.url}: {error}") from None
        if response.status_code != 200:
            raise ServerError(_detail(response))
        return response

    def info(self) -> dict:
        """The server's ``/info/``; refuses a server that has no ``rebrain`` model."""
        try:
            response = self.session.get(f"{self.url}/info/", timeout=30)
        except requests.RequestException as error:
            raise ServerError(f"cannot reach the ReBrain server at {self.url}: {error}") from None
        if response.status_code != 200:
            raise ServerError(_detail(response))
        info = response.json()
        if MODEL not in info.get("models", {}):
            raise ServerError(
                f"{self.url} is a MONAI Label server without the {MODEL!r} model (models: "
                f"{', '.join(info.get('models', {})) or 'none'})"
            )
        return info

    def presets(self) -> dict[str, dict]:
        """Preset name -> description, input modality, versions."""
        return self.info()["models"][MODEL]["presets"]

    def _infer(self, image: str, params: dict, fields: dict | None = None) -> tuple[dict, bytes]:
        encoder = MultipartEncoder(fields={"params": json.dumps(params), **(fields or {})})
        response = self._post(
            f"/infer/{MODEL}", params={"image": image}, data=encoder, headers={"Content-Type": encoder.content_type}
        )
        answer, image_bytes = None, None
        for part in MultipartDecoder.from_response(response).parts:
            disposition = part.headers.get(b"Content-Disposition", b"").decode()
            if 'name="params"' in disposition:
                answer = json.loads(part.content)
            else:
                image_bytes = part.content
        if answer is None or image_bytes is None:
            raise ServerError(f"unexpected answer from {self.url}: no params or no image part")
        return answer, image_bytes

    def reconstruct(
        self,
        image: Path,
        params: dict,
        out_dir: Path,
        extra_outputs: tuple[str, ...] = DEFAULT_EXTRA_OUTPUTS,
        stage: Callable[[str], None] | None = None,
    ) -> ReconstructionResult:
        """Upload a NIfTI volume, reconstruct it, download the MRI and ``extra_outputs``.

        Args:
            image: the input volume as a NIfTI file.
            params: request parameters (preset, steps, samples, seed, simulate_sparsity, ...).
            out_dir: where the downloaded volumes go (created).
            extra_outputs: other outputs to fetch by result id.
            stage: called with a short description as each step starts.

        Raises:
            ServerError: with the server's reason (e.g. "not a CT") or the network error.
        """
        report = stage or (lambda _: None)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report("reconstructing on the server")
        with open(image, "rb") as handle:
            answer, mri = self._infer(
                "upload", {**params, "output": "mri"}, {"file": (Path(image).name, handle, "application/gzip")}
            )
        result = ReconstructionResult(params=answer)
        result.volumes["mri"] = out_dir / "mri.nii.gz"
        result.volumes["mri"].write_bytes(mri)
        for output in extra_outputs:
            report(f"downloading {output}")
            result.volumes[output] = self.fetch(result.result_id, output, out_dir / f"{output}.nii.gz")
        return result

    def fetch(self, result_id: str, output: str, path: Path) -> Path:
        """Download one output of a kept result (no recomputation)."""
        _, volume = self._infer(result_id, {"result_id": result_id, "output": output})
        Path(path).write_bytes(volume)
        return Path(path)
