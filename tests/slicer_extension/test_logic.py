"""The module's Logic headless (pip ``slicer-core``): a real CT volume node goes to the real
server and comes back as MRI, uncertainty, overlay and table nodes with the right geometry."""

from __future__ import annotations

import numpy as np
import vtk
from ReBrainLib import ReBrainClient
from ReBrainLib.geometry import read_volume

from lib.io import dense_grid
from lib.io import read_volume as read_lib_volume


def ijk_to_ras(node) -> np.ndarray:
    import slicer

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_logic_round_trip_with_the_server(scene, server, server_studies, tmp_path):
    import slicer
    from ReBrain import NO_SIMILARITY, SYNTHETIC_ATTRIBUTE, ReBrainLogic

    array, matrix = read_volume(server_studies / "head_ct.nii.gz")
    ct_node = slicer.util.addVolumeFromArray(array, matrix, "head CT")
    logic = ReBrainLogic()
    exported = logic.export_volume(ct_node, tmp_path / "input.nii.gz")
    back, back_matrix = read_volume(exported)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(back_matrix, matrix, atol=1e-5)

    params = logic.request_params("tinyct", simulate_sparsity=2, steps=2, samples=2, seed=3)
    assert params == {"preset": "tinyct", "steps": 2, "samples": 2, "seed": 3, "simulate_sparsity": 2}
    prepared = logic.request_params("tinyct", simulate_sparsity=None, steps=2, samples=1, seed=0, prepared=True)
    assert (
        prepared["brain_extraction"] is False and prepared["alignment"] is False and "simulate_sparsity" not in prepared
    )
    result = ReBrainClient(server).reconstruct(exported, params, tmp_path / "result")
    nodes = logic.load_result(result, "head CT")

    source = read_lib_volume(server_studies / "head_ct.nii.gz", modality="CT")
    grid = dense_grid(source.take_slices(list(range(0, source.shape[2], 2))), 1.0)
    mri = slicer.util.arrayFromVolume(nodes["mri"])
    assert mri.shape == tuple(reversed(grid.shape))
    for name in ("mri", "uncertainty", "similarity", "status"):
        np.testing.assert_allclose(ijk_to_ras(nodes[name]), grid.affine, atol=1e-4)
        assert nodes[name].GetAttribute(SYNTHETIC_ATTRIBUTE) == "true"
        assert nodes[name].GetName().startswith("SYNTHETIC")
    assert nodes["status"].IsA("vtkMRMLLabelMapVolumeNode")
    # In-plane the MRI lies on the input's own voxel grid.
    np.testing.assert_allclose(ijk_to_ras(nodes["mri"])[:3, :2], matrix[:3, :2], atol=1e-4)

    similarity = slicer.util.arrayFromVolume(nodes["similarity"])
    status = slicer.util.arrayFromVolume(nodes["status"])
    codes = {"acquired": 1, "retrieved": 2, "fallback": 3}
    for k, (record, state) in enumerate(zip(result.params["slices"], result.params["slice_status"])):
        expected = NO_SIMILARITY if record["similarity"] is None else record["similarity"]
        assert np.allclose(similarity[k], expected, atol=1e-6)
        assert np.all(status[k] == codes[state])
    display = nodes["similarity"].GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 0.0
    colours = display.GetColorNode()
    assert float(colours.GetAttribute("ReBrain.Tau")) == result.params["summary"]["tau"]
    assert nodes["status"].GetDisplayNode().GetColorNode().GetNumberOfColors() == 4

    table = nodes["table"].GetTable()
    assert nodes["table"].GetNumberOfRows() == len(result.params["slices"])
    assert table.GetColumnByName("status").GetValue(0) == result.params["slice_status"][0]
