"""Benchmarks of hiera_perception; `python -m benchmarks --help` (or `hiera-perception bench`)."""
