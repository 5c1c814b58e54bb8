"""One progress callback type for the whole library.

The library reports progress and never draws it: the pipeline, the evaluation harness,
``prepare`` and the training loop call a :data:`ProgressFn`, and the front ends decide what
to show (a tqdm bar in the CLI, the job status in the server and the Slicer module).
"""

from __future__ import annotations

from collections.abc import Callable

# progress(done, total, message): ``done`` of ``total`` work units are finished; ``message`` is
# "" for a plain update, or a line worth keeping (a validation score, a finished run).
ProgressFn = Callable[[int, int, str], None]


def report(progress: ProgressFn | None, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` when there is one (the library's callbacks are optional)."""
    if progress is not None:
        progress(done, total, message)
