"""What a user runs. The tools at the top (`python scripts/generate.py`, `tour.py`, `parity.py`,
`dense_demo.py`) import only the installed library; `bench/` and `builtin/` run from the repository root as
modules (`python -m scripts.bench.bench`, `python -m scripts.builtin.train`)."""
