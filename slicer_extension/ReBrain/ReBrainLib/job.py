"""Run a reconstruction off the GUI thread; the widget polls its state with a timer.

A request cannot be interrupted once the server is computing, so cancelling stops waiting:
the job reports ``CANCELLED`` at once and its result, when it arrives, is dropped.
"""

from __future__ import annotations

import enum
import threading
import time
from pathlib import Path

from .client import ReBrainClient, ReconstructionResult


class Cancelled(Exception):
    """The user cancelled the job."""


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ReconstructionJob:
    """One reconstruction request in a background thread.

    Args:
        client: the server client.
        image: the input volume as a NIfTI file.
        params: request parameters.
        out_dir: where the result volumes are written.
    """

    def __init__(self, client: ReBrainClient, image: Path, params: dict, out_dir: Path) -> None:
        self.client = client
        self.image = Path(image)
        self.params = dict(params)
        self.out_dir = Path(out_dir)
        self.state = JobState.RUNNING
        self.stage = "starting"
        self.result: ReconstructionResult | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ReBrainReconstruction", daemon=True)

    def start(self) -> ReconstructionJob:
        self._thread.start()
        return self

    def _set_stage(self, stage: str) -> None:
        self.stage = stage

    def _run(self) -> None:
        try:
            result = self.client.reconstruct(self.image, self.params, self.out_dir, stage=self._set_stage)
        except Exception as error:  # shown to the user as a message, never as a traceback
            with self._lock:
                if self.state is JobState.RUNNING:
                    self.error, self.state = str(error), JobState.FAILED
            return
        with self._lock:
            if self.state is JobState.RUNNING:
                self.result, self.state, self.stage = result, JobState.DONE, "done"

    def cancel(self) -> None:
        """Stop waiting; a result that arrives later is dropped."""
        with self._lock:
            if self.state is JobState.RUNNING:
                self.state, self.stage = JobState.CANCELLED, "cancelled"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the thread ends (tests and scripts; the GUI polls instead)."""
        self._thread.join(timeout)
        return self.state
