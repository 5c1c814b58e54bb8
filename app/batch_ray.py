"""``python main.py batch --engine ray``: the batch's series as calls on long-lived Ray workers.

The driver (:func:`app.batch.run_batch_with`) keeps everything that is not reconstruction: the
scan of the input tree, series selection, ``--resume``, the manifest (a row per series, written
as results arrive), the progress bar and the DICOMweb push. Each series is one call on a pool
of Ray actors (:class:`SeriesWorker`), each of which loads the preset once and keeps it in
memory; a worker given a GPU (``gpus_per_worker``) reconstructs on it.

Shared storage is assumed: the input tree, the output root, the repository and its virtual
environment lie at the same paths on every node (an NFS-like mount). Workers read the DICOM
files and write the series' output folder themselves, under a staging name renamed when
complete (as the local engine does); only the per-series outcome, a manifest row, comes back
through Ray's object store.

Failures: a series whose reconstruction raises is a failed row, and its worker goes on. A
worker process that dies (killed, out of memory, its node lost) loses the series it held: a
fresh worker replaces it, the series is retried once, and a second loss records it as failed
with the reason. Ray's own restarts are off, so that this count is the only one.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.batch import SeriesJob, SeriesOutcome, attempt_series
from lib.io.atomic import STAGING_PREFIX
from lib.pipeline import ReBrainPipeline, ReconstructionOptions
from lib.presets import Preset

logger = logging.getLogger(__name__)

# How often a run may replace dead workers before it gives up (per worker slot): a worker that
# dies at start-up every time (a broken node, weights it cannot read) must not loop for ever.
MAX_REPLACEMENTS_PER_WORKER = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    Attributes:
        address: ``None``: start a Ray instance on this machine for this run (stopped at the
            end); ``"auto"``: the cluster this machine's ``ray start`` joined; ``HOST:PORT``:
            that cluster's head.
        workers: long-lived workers (actors), each holding the preset in memory.
        cpus_per_worker: CPU cores Ray reserves for each worker (its torch threads).
        gpus_per_worker: GPUs Ray gives each worker (0: CPU workers); a worker with one
            reconstructs on it.
        start_timeout_s: how long the workers may take to start and load the preset. Ray
            keeps an actor pending for ever when the cluster lacks the CPUs or GPUs it asks
            for; this turns that into an error.
    """

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError(
                f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {self.cpus_per_worker}, "
                f"{self.gpus_per_worker}"
            )


class SeriesWorker:
    """One worker: the preset loaded once, then one series per :meth:`reconstruct` call.

    Runs as a Ray actor (:class:`RayRunner` wraps it with ``ray.remote``); as a plain object it
    is the local engine's work with a worker's set-up, which the tests use too.
    """

    def __init__(
        self, preset: Preset, options: ReconstructionOptions, sparsity: int | None, input_root: str, threads: int
    ) -> None:
        import torch

        # Ray makes only this worker's GPUs visible; without any the worker reconstructs on the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, threads))
        self.pipeline = ReBrainPipeline.from_preset(preset, device=self.device)
        self.options = options
        self.sparsity = sparsity
        self.input_root = Path(input_root)

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: ``pid``, ``host`` and ``device`` (also a readiness check)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device}

    def reconstruct(self, job: SeriesJob) -> SeriesOutcome:
        """Reconstruct one series into its output folder; a failure is a failed outcome, not an error."""
        return attempt_series(job, self.pipeline, self.options, self.sparsity, self.input_root)


class RayRunner:
    """Runs :class:`app.batch.SeriesJob` s on a pool of Ray workers; a context manager.

    Entering connects to (or starts) Ray and starts the workers, each loading the preset;
    leaving stops the workers and disconnects (a Ray instance started for the run stops too).

    Raises (on entering):
        ConnectionError: Ray could not start or be reached at the address.
        ValueError: a worker could not load the preset.
    """

    def __init__(
        self,
        preset: Preset,
        options: ReconstructionOptions,
        sparsity: int | None,
        input_root: Path,
        ray_options: RayOptions,
    ) -> None:
        self.preset = preset
        self.options = options
        self.sparsity = sparsity
        self.input_root = Path(input_root)
        self.ray_options = ray_options
        self.workers: list[Any] = []
        self.replacements = 0
        self._actor_class: Any = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RayRunner:
        import ray

        ray_options = self.ray_options
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        # Workers import this repository's packages from the shared path (see the module docstring).
        repository = str(Path(__file__).resolve().parents[1])
        init["runtime_env"] = {"env_vars": {"PYTHONPATH": repository}}
        if ray_options.address is None:
            needed = ray_options.workers * ray_options.cpus_per_worker
            # The local instance's addresses are loopback; see the README on what Ray listens on.
            init.update(
                num_cpus=max(needed, 1),
                num_gpus=ray_options.workers * ray_options.gpus_per_worker,
                _node_ip_address="127.0.0.1",
            )
        else:
            check_reachable(ray_options.address)
            init["address"] = ray_options.address
        try:
            ray.init(**init)
        except Exception as error:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster"
            where = ray_options.address or "a local Ray instance"
            token = "uth" in str(error)  # Authentication / auth token: the driver lacks the cluster's token
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token here too)"
            hint = hint if token else ""
            raise ConnectionError(f"cannot start or reach Ray at {where}: {_reason(error)}{hint}") from None
        self._actor_class = ray.remote(SeriesWorker).options(
            num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker, max_restarts=0
        )
        try:
            self.workers = [self._start_worker() for _ in range(ray_options.workers)]
            self.descriptions = ray.get(
                [worker.describe.remote() for worker in self.workers], timeout=ray_options.start_timeout_s
            )
        except ray.exceptions.GetTimeoutError:
            self.__exit__(None, None, None)
            raise ValueError(
                f"{ray_options.workers} Ray workers did not start within {ray_options.start_timeout_s:g} s: does the "
                f"cluster have {ray_options.cpus_per_worker:g} CPUs and {ray_options.gpus_per_worker:g} GPUs free "
                "for each?"
            ) from None
        except Exception as error:
            self.__exit__(None, None, None)
            raise ValueError(f"a Ray worker could not load preset {self.preset.name!r}: {_reason(error)}") from None
        logger.info("Ray workers: %s", self.descriptions)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if ray.is_initialized():
            ray.shutdown()

    def _start_worker(self) -> Any:
        threads = max(1, int(self.ray_options.cpus_per_worker))
        return self._actor_class.remote(self.preset, self.options, self.sparsity, str(self.input_root), threads)

    # ------------------------------------------------------------------ the work

    def run(self, jobs: Sequence[SeriesJob]) -> Iterator[SeriesOutcome]:
        """Each job's outcome, in the order they finish.

        Every job ends as exactly one outcome: done, failed (its reconstruction raised), or
        failed after its worker died twice (see the module docstring).
        """
        import ray
        from ray.exceptions import RayActorError

        pending: deque[SeriesJob] = deque(jobs)
        lost: dict[str, str] = {}  # series UID -> why its first worker died
        idle = list(self.workers)
        in_flight: dict[Any, tuple[SeriesJob, Any]] = {}
        while pending or in_flight:
            while pending and idle:
                job, worker = pending.popleft(), idle.pop()
                in_flight[worker.reconstruct.remote(job)] = (job, worker)
            if not in_flight:  # no worker left to run anything: the replacement budget is spent
                for job in pending:
                    yield _lost_outcome(job, lost.get(job.series.uid, "no Ray worker left"))
                return
            (ready,), _ = ray.wait(list(in_flight), num_returns=1)
            job, worker = in_flight.pop(ready)
            try:
                outcome = ray.get(ready)
            except RayActorError as error:
                reason = _reason(error)
                logger.warning("Ray worker died during series %s: %s", job.series.uid, reason)
                self._discard(worker)
                remove_staging(job.out)
                replacement = self._replace()
                if replacement is not None:
                    idle.append(replacement)
                if job.series.uid in lost:
                    yield _lost_outcome(job, f"{lost[job.series.uid]}; again on retry: {reason}")
                else:
                    lost[job.series.uid] = reason
                    pending.appendleft(job)
                continue
            idle.append(worker)
            if job.series.uid in lost:
                retried = f"retried on another worker after the first died ({lost[job.series.uid]})"
                outcome.message = f"{retried}; {outcome.message}" if outcome.message else retried
            yield outcome

    def _discard(self, worker: Any) -> None:
        import ray

        self.workers.remove(worker)
        ray.kill(worker, no_restart=True)

    def _replace(self) -> Any | None:
        """A fresh worker for a dead one, or None once :data:`MAX_REPLACEMENTS_PER_WORKER` is spent."""
        if self.replacements >= MAX_REPLACEMENTS_PER_WORKER * self.ray_options.workers:
            logger.warning("not replacing a dead Ray worker: %d replaced already", self.replacements)
            return None
        self.replacements += 1
        worker = self._start_worker()
        self.workers.append(worker)
        return worker


# Seconds to wait for a TCP connection to a cluster's head before calling it unreachable (ray.init
# itself retries for minutes).
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str) -> None:
    """Refuse quickly a ``HOST:PORT`` where nothing listens; ``auto`` is left to Ray.

    Raises:
        ConnectionError: nothing accepts a connection there within :data:`CONNECT_TIMEOUT_S`.
        ValueError: an address that is neither ``auto`` nor ``HOST:PORT``.
    """
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address must be 'auto' or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"cannot start or reach Ray at {address}: {error}") from None


def remove_staging(out: Path) -> list[Path]:
    """Delete the staging folders of the output folder ``out`` (what a dead worker left behind)."""
    # atomic_directory's staging name: the prefix, 8 hex digits, a dash, the folder's name (a
    # retired "-old-" copy of a replaced output is not the dead worker's and stays).
    leftovers = [
        path
        for path in out.parent.glob(f"{STAGING_PREFIX}{'?' * 8}-{out.name}")
        if path.is_dir() and not path.is_symlink()
    ]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def _lost_outcome(job: SeriesJob, reason: str) -> SeriesOutcome:
    return SeriesOutcome(series_uid=job.series.uid, status="failed", message=f"Ray worker died: {reason}")


def _reason(error: BaseException) -> str:
    """The first line of a Ray error: its full text carries the remote traceback and the actor's ids."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
