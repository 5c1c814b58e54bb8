"""Evaluation: scoring reconstructions against ground truth (METHOD.md section 5)."""
