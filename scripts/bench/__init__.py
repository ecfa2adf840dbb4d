"""Measurements: speed, memory, float8 error and layout control. Each runs from the repository root as
`python -m scripts.bench.<name>`."""
