"""Benchmarks and diagnostics: scripts that print tables (`make bench*`), not tests and not front ends."""
