"""Figures that show a reconstruction to a person: previews of CT, synthetic MRI and provenance."""
