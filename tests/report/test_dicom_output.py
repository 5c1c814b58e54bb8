"""The synthetic MR series' tags: synthetic, in the input's study, without the input's free text."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lib.report.dicom_output import synthetic_series_description


def test_series_description_says_synthetic_and_never_copies_the_inputs():
    """Issue 17, finding 9: the synthetic series' SeriesDescription copied the CT's free text."""
    reference = Dataset()
    reference.Modality, reference.SeriesDescription = "CT", "Doe Jane, head trauma after fall"
    reference.PatientName, reference.PatientID, reference.StudyDescription = "Doe^Jane", "PID-4711", "CT HEAD"
    reference.StudyInstanceUID, reference.FrameOfReferenceUID, reference.SeriesNumber = (
        generate_uid(),
        generate_uid(),
        3,
    )
    description = synthetic_series_description(reference, "ct2mri", np.linspace(0, 1, 1000).reshape(10, 10, 10))
    assert description.series_description == "SYNTHETIC ReBrain MRI from CT"
    assert description.patient == {
        "PatientName": "Doe^Jane",
        "PatientID": "PID-4711",
    }  # the same patient: it is their study
    assert (description.study_uid, description.frame_of_reference_uid, description.series_number) == (
        reference.StudyInstanceUID,
        reference.FrameOfReferenceUID,
        1003,
    )
    assert description.extra["StudyDescription"] == "CT HEAD" and "SYNTHETIC" in description.extra["ImageComments"]
