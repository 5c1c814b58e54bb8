"""Make the Slicer module importable headless.

``ReBrainLib`` needs nothing from Slicer. ``ReBrain.py`` runs on pip's ``slicer-core`` (MRML
scene, volume, colour and table nodes, ``slicer.util``), which lacks Slicer's
``slicer.ScriptedLoadableModule``; this shim provides the four base classes with the little
the module uses (``parent`` and ``resourcePath``), nothing else. The widget needs Qt and is not
tested here (there is no Qt in slicer-core).
"""

from __future__ import annotations

import sys
import types
import unittest
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_extension" / "ReBrain"
sys.path.insert(0, str(MODULE_DIR))


def _install_scripted_module_shim() -> None:
    import slicer

    if "slicer.ScriptedLoadableModule" in sys.modules or hasattr(slicer, "ScriptedLoadableModule"):
        return
    shim = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent

        def resourcePath(self, name: str) -> str:
            return str(MODULE_DIR / "Resources" / name)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleTest,
    ):
        setattr(shim, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = shim
    slicer.ScriptedLoadableModule = shim


@pytest.fixture()
def scene():
    """A fresh MRML scene as ``slicer.mrmlScene``."""
    slicer = pytest.importorskip(
        "slicer", reason="the slicer-core package (pip) is needed for the headless Logic tests"
    )
    _install_scripted_module_shim()
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)
