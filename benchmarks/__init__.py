"""Performance benchmarks (issue 5): `python -m benchmarks.run --help`."""
