"""Many prompts with the weights loaded once (`generate.py --prompts`), resumable, and sharded under torchrun:
every image equals the one `Pipeline` makes alone with the same settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders.pipeline
from loaders import Pipeline
from scripts.generate import main as generate

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--steps", "3"]
LINES = [
    "a red circle",
    json.dumps({"prompt": "a blue square and a green triangle", "seed": 5, "negative_prompt": "a yellow circle"}),
    "",  # blank lines are skipped
    json.dumps({"layout": {"prompt": "a yellow triangle and a red square",
                           "regions": [{"phrase": "a yellow triangle", "box": [0, 0, 0.5, 1]}]}, "seed": 2}),
    json.dumps({"prompt": "a green circle", "out": "named.png"}),
]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def expected() -> list[np.ndarray]:
    """Each line drawn alone through the Python API."""
    pipe = Pipeline.load(keep_loaded=True)
    calls = [dict(prompt="a red circle", seed=0),
             dict(prompt="a blue square and a green triangle", seed=5, negative_prompt="a yellow circle"),
             dict(layout=json.loads(LINES[3])["layout"], seed=2),
             dict(prompt="a green circle", seed=0)]
    return [np.asarray(pipe(steps=3, **c).images[0]) for c in calls]


def write_prompts(folder: Path, lines: list[str] = LINES) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def outputs(folder: Path) -> list[Path]:
    return [folder / "img" / f"{i:02d}.png" for i in range(3)] + [Path("named.png")]


def test_prompts_file_equals_single_calls_and_resumes(tmp_path, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the line's "out" is relative to where the command runs
    prompts = write_prompts(tmp_path)
    template = str(tmp_path / "img" / "{index:02d}.png")
    assert generate(["--prompts", str(prompts), "--out", template, "--quiet", *STEPS]) == 0
    for path, want in zip(outputs(tmp_path), expected):
        assert np.array_equal(pixels(path), want), path
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["status"] for e in manifest["images"]] == ["made"] * 4

    # An interrupted batch: one image lost, one replaced by something the user keeps. The rerun redoes only
    # the lost one and leaves the other alone.
    first, second = outputs(tmp_path)[:2]
    first.unlink()
    second.write_bytes(b"precious")
    assert generate(["--prompts", str(prompts), "--out", template, "--quiet", *STEPS]) == 0
    assert np.array_equal(pixels(first), expected[0])
    assert second.read_bytes() == b"precious"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["status"] for e in manifest["images"]] == ["made", "existed", "existed", "existed"]


def test_torchrun_two_processes_equal_one(tmp_path):
    """The same command alone and under torchrun with 2 processes (gloo on CPU) writes the same images.

    Both runs use one CPU thread per process (torchrun's default): on CPUs the thread count can change how
    matrix products round, so "the same settings" includes it."""
    prompts = write_prompts(tmp_path, LINES[:4])  # three prompts, named from the template
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [str(ROOT / "scripts" / "generate.py"), "--prompts", str(prompts), "--quiet", *STEPS]
    runs = {"alone": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", "2", "--master-port", "29731"]}
    for name, launcher in runs.items():
        out = ["--out", str(tmp_path / name / "{index:02d}.png")]
        done = subprocess.run(launcher + script + out, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for i in range(3):
        assert np.array_equal(pixels(tmp_path / "torchrun" / f"{i:02d}.png"), pixels(tmp_path / "alone" / f"{i:02d}.png"))
    manifest = json.loads((tmp_path / "torchrun" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [e["made_by_rank"] for e in manifest["images"]] == [0, 1, 0]


def test_bad_prompt_lines_are_input_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle", "colour": "red"}\n')
    assert generate(["--prompts", str(bad), "--quiet"]) == 2
    assert "bad.jsonl:1: unknown key(s) ['colour']" in capsys.readouterr().err
    bad.write_text("a red circle\na blue square\n")
    assert generate(["--prompts", str(bad), "--out", str(tmp_path / "same.png"), "--quiet"]) == 2
    assert "would write the same file" in capsys.readouterr().err


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    """Only input errors become one-line messages; a ValueError from a bug in our code propagates."""

    def broken(*args, **kwargs):
        raise ValueError("a shape bug deep in the model")

    monkeypatch.setattr(loaders.pipeline, "generate_latents", broken)
    with pytest.raises(ValueError, match="a shape bug"):
        generate(["--prompt", "a red circle", "--out", str(tmp_path / "x.png"), "--quiet", *STEPS])


def test_non_finite_latents_stop_before_a_black_png(tmp_path, monkeypatch, capsys):
    """float16 overflow: a one-line error that suggests bfloat16, and no PNG; in float32 it is not the user's
    input, so it keeps its traceback."""
    import torch

    real = loaders.pipeline.generate_latents

    def overflowing(*args, **kwargs):
        latents = real(*args, **kwargs)
        return torch.full_like(latents, float("inf"))

    monkeypatch.setattr(loaders.pipeline, "generate_latents", overflowing)
    out = tmp_path / "x.png"
    assert generate(["--prompt", "a red circle", "--dtype", "float16", "--out", str(out), "--quiet", *STEPS]) == 2
    assert "bfloat16" in capsys.readouterr().err and not out.exists()
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(["--prompt", "a red circle", "--out", str(out), "--quiet", *STEPS])
    assert not out.exists()
