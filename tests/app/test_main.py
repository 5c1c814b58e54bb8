"""main.py serves two masters: ``python main.py <command>`` (the command line, which must not
load the server's stack) and ``monailabel start_server --app .`` (which loads main.py and looks
the MONAILabelApp subclass up in it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("monailabel", "fastapi", "starlette", "uvicorn")


def imported_modules(*arguments: str) -> set[str]:
    """The modules ``python main.py ARGUMENTS`` imports (read from ``-X importtime``)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "main.py", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python main.py" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}


@pytest.mark.parametrize("arguments", [["--help"], ["reconstruct", "--help"], ["batch", "--help"]])
def test_command_line_help_does_not_import_the_server(arguments):
    modules = imported_modules(*arguments)
    assert "app.cli" in modules and "lib.options_schema" in modules
    loaded = sorted(name for name in modules if name.split(".")[0] in SERVER_ONLY)
    assert not loaded, f"python main.py {' '.join(arguments)} imported {loaded[:5]}"
    # Nor the models: the help is made from the light options modules.
    assert "torch" not in modules


def test_monailabel_finds_the_app_class_in_main_py():
    """The lookup MONAI Label's ``app_instance`` does on ``--app .`` (without starting a server)."""
    script = (
        "from monailabel.utils.others.class_utils import get_class_of_subclass_from_file\n"
        "app = get_class_of_subclass_from_file('main', 'main.py', 'MONAILabelApp')\n"
        "print(app.__module__, app.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["app.server.app", "ReBrainApp"]
