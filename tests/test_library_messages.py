"""The library speaks in its own terms (issue 18, point 8): no message under lib/ names a
command-line flag ("pass --overwrite", "--device cuda asked for"); the front ends translate
(app/cli.py names its flags when it reports a library error)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(^|[\s(`'\"=])--[a-z][a-z-]*")
# A string that is only a flag is an argparse argument name (lib/data/demo_inputs.py has its own
# small command line), not a message.
ARGUMENT_NAME = re.compile(r"--[a-z][a-z-]*")


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def flag_strings(path: Path) -> list[str]:
    """Each string constant of ``path`` (f-string parts included, docstrings not) that names a flag."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = docstrings(tree)
    return [
        f"line {node.lineno}: {node.value.strip()[:80]!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and FLAG.search(node.value)
        and not ARGUMENT_NAME.fullmatch(node.value)
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "lib").rglob("*.py")), ids=lambda path: str(path.relative_to(ROOT)))
def test_library_messages_name_no_command_line_flags(path):
    assert not flag_strings(path)


def test_the_check_sees_a_flag_in_a_message(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstrings may say --src."""\n'
        'def f(out):\n    raise FileExistsError(f"{out}: exists (pass --overwrite)")\n'
        'ARGUMENT = "--seed"\n'
    )
    assert flag_strings(sample) == ["line 3: ': exists (pass --overwrite)'"]
