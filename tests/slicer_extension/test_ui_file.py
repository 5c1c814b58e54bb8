"""The module's Qt Designer file: every widget the module code reaches through ``self.ui`` exists
in ReBrain.ui (Slicer builds ``self.ui`` from it; a missing name fails only inside Slicer)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MODULE = Path(__file__).resolve().parents[2] / "slicer_extension" / "ReBrain"


def test_every_widget_the_module_uses_is_in_the_ui_file():
    names = {
        widget.get("name") for widget in ElementTree.parse(MODULE / "Resources" / "UI" / "ReBrain.ui").iter("widget")
    }
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "ReBrain.py").read_text()))
    assert "preparedInputCheckBox" in used and "inputVolumeSelector" in used
    assert used <= names, sorted(used - names)
