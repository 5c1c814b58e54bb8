"""A training run folder: resume checkpoint, inference weights, config.json and CSV logs.

Every trainer (BBDM, ControlNet, retrieval encoder) keeps the same layout and the same resume
rules: a folder that holds a run is continued only with ``resume``; the CSV logs are cut back to
the checkpoint's iteration, because a resumed run repeats the iterations after it.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from lib.io.checkpoint import load_checkpoint, save_checkpoint


class RunExistsError(FileExistsError):
    """The run folder holds a training run already, and resuming it was not asked for."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"{folder}: holds a training run already (resume=True continues it)")
        self.folder = folder


class TrainingRun:
    """One run folder.

    Args:
        out: the folder.
        kind: the resume checkpoint's kind (e.g. ``"bbdm-train"``).
        resume: continue the run in ``out``.
        logs: CSV log name -> its columns (first column: iteration).

    Raises:
        RunExistsError: ``out`` holds a run and ``resume`` is false.
        ValueError: ``resume`` without a readable checkpoint of this kind.
    """

    def __init__(self, out: str | os.PathLike[str], kind: str, resume: bool, logs: dict[str, list[str]]) -> None:
        self.out = Path(out)
        self.kind = kind
        self.checkpoint_path = self.out / "checkpoint.pt"
        if self.checkpoint_path.exists() and not resume:
            raise RunExistsError(self.out)
        self.state: dict[str, Any] | None = load_checkpoint(self.checkpoint_path, kind=kind) if resume else None
        self.start = int(self.state["iteration"]) if self.state is not None else 0
        self.columns = logs
        self.rows = {name: _rows_up_to(self.out / f"{name}.csv", self.start) for name in logs}

    def begin(self, config: dict[str, Any]) -> None:
        """Create the folder and write ``config.json``."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config, indent=1))

    def log(self, name: str, row: list) -> None:
        """Append a row to a log (written at the next :meth:`save`)."""
        self.rows[name].append(row)

    def save(self, iteration: int, state: dict[str, Any], weights_name: str, weights: dict[str, Any]) -> None:
        """Write the resume checkpoint, the inference weights file and the logs."""
        save_checkpoint(self.checkpoint_path, {**state, "kind": self.kind, "iteration": iteration})
        save_checkpoint(self.out / weights_name, {**weights, "iteration": iteration})
        for name, columns in self.columns.items():
            with open(self.out / f"{name}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows(self.rows[name])


def _rows_up_to(path: Path, iteration: int) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row for row in rows if int(row[0]) <= iteration]
