"""ReBrain: "Reconstruct MRI" from a sparse head CT through a ReBrain MONAI Label server.

Module / Widget / Logic / Test as Slicer's scripted modules are written. The Logic holds
everything the widget does to the scene (testable headless with the ``slicer-core`` package);
HTTP, threading, geometry and overlay arithmetic live in ``ReBrainLib`` (no ``slicer`` import).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


def _install_missing_dependencies() -> None:
    """Slicer bundles requests but not requests-toolbelt: install it once, on first load."""
    try:
        import requests_toolbelt  # noqa: F401
    except ModuleNotFoundError:
        slicer.util.pip_install("requests-toolbelt==1.0.0")


_install_missing_dependencies()

from ReBrainLib import (  # noqa: E402 (after the dependency install)
    STATUS_COLOURS,
    JobState,
    ReBrainClient,
    ReconstructionJob,
    ReconstructionResult,
    ServerError,
    legend_text,
    provenance_rows,
    similarity_colour_table,
    slice_overlays,
    status_text,
)
from ReBrainLib.geometry import read_volume, write_volume  # noqa: E402
from ReBrainLib.overlays import TABLE_COLUMNS  # noqa: E402

SYNTHETIC_ATTRIBUTE = "ReBrain.Synthetic"
SETTINGS_URL_KEY = "ReBrain/ServerURL"
DEFAULT_URL = "http://127.0.0.1:8000"
# Similarity voxels of slices without retrieval get this value and are hidden by a threshold.
NO_SIMILARITY = -1.0


class ReBrain(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "ReBrain"
        parent.categories = ["Reconstruction"]
        parent.dependencies = []
        parent.contributors = ["ReBrain team"]
        parent.helpText = (
            "Reconstructs a dense synthetic brain MRI from a sparse (thick- or skipped-slice) head CT on a ReBrain "
            "MONAI Label server. The result is SYNTHETIC: generated, not acquired, and not for diagnosis."
        )
        parent.acknowledgementText = "Built on MONAI Label, MONAI, timm and FAISS."


class ReBrainLogic(ScriptedLoadableModuleLogic):
    """Scene work: export the input, turn a server result into nodes, and build the overlays."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    @staticmethod
    def request_params(
        preset: str, simulate_sparsity: int | None, steps: int, samples: int, seed: int, prepared: bool = False
    ) -> dict:
        """The request for the server (``simulate_sparsity`` None: the input is the sparse scan;
        ``prepared``: the input is already brain-only and aligned, so the server skips its
        brain extraction and registration to the CT head template)."""
        params = {"preset": preset, "steps": int(steps), "samples": int(samples), "seed": int(seed)}
        if simulate_sparsity:
            params["simulate_sparsity"] = int(simulate_sparsity)
        if prepared:
            params.update(brain_extraction=False, alignment=False)
        return params

    @staticmethod
    def export_volume(volume_node, path: Path) -> Path:
        """Write a scalar volume node as NIfTI with its geometry (parent transforms not applied)."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("select an input CT volume first")
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        return write_volume(path, slicer.util.arrayFromVolume(volume_node), slicer.util.arrayFromVTKMatrix(matrix))

    def load_result(self, result: ReconstructionResult, name: str = "ReBrain") -> dict:
        """Add the result to the scene.

        Returns:
            ``mri``, ``uncertainty`` (when downloaded), ``similarity`` (scalar volume with its
            colour table), ``status`` (labelmap), ``table`` (per-slice provenance) nodes.
        """
        params = result.params
        array, ijk_to_ras = read_volume(result.volumes["mri"])
        nodes = {"mri": self._add_volume(array, ijk_to_ras, f"SYNTHETIC {name} MRI", params)}
        if "uncertainty" in result.volumes:
            uncertainty, _ = read_volume(result.volumes["uncertainty"])
            nodes["uncertainty"] = self._add_volume(uncertainty, ijk_to_ras, f"SYNTHETIC {name} uncertainty", params)
        similarity, status = slice_overlays(params, array.shape)
        nodes["similarity"] = self._add_volume(
            np.nan_to_num(similarity, nan=NO_SIMILARITY), ijk_to_ras, f"SYNTHETIC {name} similarity", params
        )
        self._colour_similarity(nodes["similarity"], params["summary"]["tau"])
        nodes["status"] = self._add_volume(
            status, ijk_to_ras, f"SYNTHETIC {name} slice status", params, "vtkMRMLLabelMapVolumeNode"
        )
        self._colour_status(nodes["status"])
        nodes["table"] = self._provenance_table(params, f"SYNTHETIC {name} provenance")
        return nodes

    @staticmethod
    def _add_volume(
        array: np.ndarray, ijk_to_ras: np.ndarray, name: str, params: dict, node_class: str = "vtkMRMLScalarVolumeNode"
    ):
        node = slicer.util.addVolumeFromArray(array, ijk_to_ras, name, node_class)
        node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true")
        node.SetAttribute("ReBrain.ResultID", params["result_id"])
        node.SetAttribute("ReBrain.Notice", params["notice"])
        node.SetAttribute("ReBrain.Versions", json.dumps(params["summary"]["versions"]))
        node.SetDescription(params["notice"])
        return node

    @staticmethod
    def _colour_similarity(node, tau: float) -> None:
        table = similarity_colour_table(tau)
        colours = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", f"ReBrain similarity (tau {tau:.4f})")
        colours.SetTypeToUser()
        colours.SetNumberOfColors(len(table))
        colours.SetAttribute("ReBrain.Tau", str(tau))
        for index, (r, g, b, a) in enumerate(table):
            colours.SetColor(index, f"{index / (len(table) - 1):.3f}", r, g, b, a)
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(colours.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        # Slices without retrieval (NO_SIMILARITY) are hidden, not painted as "low similarity".
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(0.0)
        display.SetUpperThreshold(1.0)

    @staticmethod
    def _colour_status(node) -> None:
        colours = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "ReBrain slice status")
        colours.SetTypeToUser()
        colours.SetNumberOfColors(len(STATUS_COLOURS) + 1)
        colours.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value, (label, (r, g, b, a)) in STATUS_COLOURS.items():
            colours.SetColor(value, label, r, g, b, a)
        node.GetDisplayNode().SetAndObserveColorNodeID(colours.GetID())

    @staticmethod
    def _provenance_table(params: dict, name: str):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true")
        table = node.GetTable()
        rows = provenance_rows(params)
        for column in TABLE_COLUMNS:
            values = vtk.vtkStringArray()
            values.SetName(column)
            for row in rows:
                values.InsertNextValue("" if row[column] is None else str(row[column]))
            table.AddColumn(values)
        node.Modified()
        return node


class ReBrainWidget(ScriptedLoadableModuleWidget):
    """The panel: server, input, sampling, "Reconstruct MRI", results."""

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        self.logic = ReBrainLogic()
        self.client: ReBrainClient | None = None
        self.job: ReconstructionJob | None = None
        self.nodes: dict = {}
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/ReBrain.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.ui.serverUrlLineEdit.text = qt.QSettings().value(SETTINGS_URL_KEY, DEFAULT_URL)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.simulateRadioButton.connect("toggled(bool)", self.updateButtons)
        self.ui.uncertaintySelector.connect("currentNodeChanged(vtkMRMLNode*)", self.showOverlays)
        self.ui.similarityOverlayCheckBox.connect("toggled(bool)", self.showOverlays)
        self.ui.statusOverlayCheckBox.connect("toggled(bool)", self.showOverlays)
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onPoll)
        self.updateButtons()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.job.cancel()

    def updateButtons(self, *_args) -> None:
        running = self.job is not None and self.job.state is JobState.RUNNING
        ready = self.client is not None and self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.reconstructButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.sparsitySpinBox.enabled = self.ui.simulateRadioButton.checked

    def onConnect(self) -> None:
        import qt

        url = self.ui.serverUrlLineEdit.text.strip()
        try:
            client = ReBrainClient(url, token=self.ui.accessTokenLineEdit.text.strip() or None)
            presets = client.presets()
        except ServerError as error:
            self.client = None
            self.ui.serverStatusLabel.text = "Not connected"
            slicer.util.errorDisplay(str(error), windowTitle="ReBrain")
            self.updateButtons()
            return
        qt.QSettings().setValue(SETTINGS_URL_KEY, url)
        self.client = client
        self.ui.presetComboBox.clear()
        for name, preset in presets.items():
            self.ui.presetComboBox.addItem(name)
            self.ui.presetComboBox.setItemData(
                self.ui.presetComboBox.count - 1, preset["description"], qt.Qt.ToolTipRole
            )
        self.ui.serverStatusLabel.text = f"Connected: {len(presets)} preset(s)"
        self.updateButtons()

    def onReconstruct(self) -> None:
        sparsity = self.ui.sparsitySpinBox.value if self.ui.simulateRadioButton.checked else None
        params = self.logic.request_params(
            self.ui.presetComboBox.currentText,
            sparsity,
            self.ui.stepsSpinBox.value,
            self.ui.samplesSpinBox.value,
            self.ui.seedSpinBox.value,
            prepared=self.ui.preparedInputCheckBox.checked,
        )
        work = Path(tempfile.mkdtemp(prefix="rebrain-"))
        try:
            image = self.logic.export_volume(self.ui.inputVolumeSelector.currentNode(), work / "input.nii.gz")
        except ValueError as error:
            slicer.util.errorDisplay(str(error), windowTitle="ReBrain")
            return
        self.job = ReconstructionJob(self.client, image, params, work).start()
        self.ui.progressBar.setRange(0, 0)  # busy: the server reports no progress while it samples
        self.timer.start()
        self.updateButtons()

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def onPoll(self) -> None:
        job = self.job
        self.ui.statusLabel.text = f"{job.stage} ({job.elapsed:.0f} s)"
        if job.state is JobState.RUNNING:
            return
        self.timer.stop()
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 1 if job.state is JobState.DONE else 0
        if job.state is JobState.FAILED:
            self.ui.statusLabel.text = "Failed"
            slicer.util.errorDisplay(f"Reconstruction failed: {job.error}", windowTitle="ReBrain")
        elif job.state is JobState.DONE:
            source = self.ui.inputVolumeSelector.currentNode()
            self.nodes = self.logic.load_result(job.result, source.GetName() if source is not None else "ReBrain")
            self.ui.provenanceTableView.setMRMLTableNode(self.nodes["table"])
            self.ui.uncertaintySelector.setCurrentNode(None)
            self.ui.legendLabel.text = legend_text(job.result.params)
            self.ui.statusLabel.text = status_text(job.result.params["summary"], job.elapsed)
            self.showOverlays()
        self.updateButtons()

    def showOverlays(self, *_args) -> None:
        if not self.nodes:
            return
        background = self.ui.uncertaintySelector.currentNode() or self.nodes["mri"]
        foreground = self.nodes["similarity"] if self.ui.similarityOverlayCheckBox.checked else None
        label = self.nodes["status"] if self.ui.statusOverlayCheckBox.checked else None
        slicer.util.setSliceViewerLayers(
            background=background, foreground=foreground, foregroundOpacity=0.4, label=label, fit=True
        )


class ReBrainTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the Logic turns a result into nodes with the right geometry."""

    def runTest(self) -> None:
        slicer.mrmlScene.Clear(0)
        self.test_load_result()

    def test_load_result(self) -> None:
        work = Path(tempfile.mkdtemp(prefix="rebrain-test-"))
        ijk_to_ras = np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]])
        mri = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
        write_volume(work / "mri.nii.gz", mri, ijk_to_ras)
        slices = [
            {
                "index": k,
                "position_mm": 2.0 * k,
                "similarity": None if k % 2 == 0 else 0.9,
                "reference": None,
                "uncertainty_mean": 0.0,
            }
            for k in range(4)
        ]
        params = {
            "result_id": "0" * 32,
            "notice": "Synthetic MRI",
            "slices": slices,
            "slice_status": ["acquired", "retrieved", "acquired", "fallback"],
            "summary": {"tau": 0.95, "versions": {}, "generated_retrieval_success_rate": 0.5},
        }
        nodes = ReBrainLogic().load_result(ReconstructionResult(params=params, volumes={"mri": work / "mri.nii.gz"}))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(nodes["mri"]), mri, atol=1e-6)
        self.assertEqual(nodes["mri"].GetAttribute(SYNTHETIC_ATTRIBUTE), "true")
        self.assertEqual(nodes["table"].GetNumberOfRows(), 4)
