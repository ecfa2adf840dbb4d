"""docs/python.md is executed as written: its Python blocks, in order, in one namespace, on the built-in model.

`python tests/test_python_guide.py docs/python` runs the guide in that folder and so makes its pictures.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "python.md"


def blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_guide(folder: Path) -> dict:
    """Execute every block of the guide with `folder` as the working directory; returns the namespace."""
    namespace: dict = {"__name__": "guide"}
    here = os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        for n, code in enumerate(blocks(GUIDE.read_text())):
            exec(compile(code, f"{GUIDE.name} block {n}", "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


def test_the_python_guide_runs_and_makes_its_pictures(tmp_path, capsys):
    namespace = run_guide(tmp_path)
    pictures = re.findall(r"\]\(python/([^)]+\.png)\)", GUIDE.read_text())
    assert pictures and all((tmp_path / p).is_file() for p in pictures), pictures
    out = capsys.readouterr().out
    assert "error:" in out and "a green square" in out  # the last block's InputError names the phrase
    assert namespace["steered"].maps is not None and len(namespace["seen"]) == namespace["pipe"].preset.steps


if __name__ == "__main__":
    run_guide(Path(sys.argv[1]).resolve())
