"""CSV training logs that a resumed run rewrites from its checkpoint's iteration."""

from __future__ import annotations

import csv
from pathlib import Path


def rows_up_to(path: Path, iteration: int) -> list[list[str]]:
    """Rows of a log (first column: iteration) up to ``iteration``; rows after it are dropped,
    because a resumed run repeats the iterations after its last checkpoint."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row for row in rows if int(row[0]) <= iteration]


def write_rows(path: Path, columns: list[str], rows: list[list]) -> None:
    """Write a log with its header."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
