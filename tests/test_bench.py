"""scripts/bench.py in its smallest mode: it runs, agrees with diffusers, and reports what it promises.

A smoke test, not a timing assertion: the numbers depend on the machine; their shape and consistency do not.
"""

from __future__ import annotations

import json

import pytest
import torch

from scripts.bench import main


@pytest.fixture
def keep_threads():
    """--threads sets torch's global thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_bench_prints_table_and_writes_json(tmp_path, capsys, keep_threads):
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "threads" in printed and "torch" in printed
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2  # header, rule, one row per dtype
    assert "| step vs diffusers | float32 |" in table[2] and "| step vs diffusers | bfloat16 |" in table[3]

    report = json.loads(out.read_text())
    assert report["environment"]["threads"] == 1
    assert report["shape"]["num_heads"] == 2 and report["shape"]["size"] == 64
    assert [(r["case"], r["dtype"]) for r in report["results"]] == [("step", "float32"), ("step", "bfloat16")]
    for r in report["results"]:
        for engine in ("ours", "reference"):
            assert len(r[engine]["times"]) == 1 and r[engine]["median"] == r[engine]["min"] > 0
        assert r["ratio"] == pytest.approx(r["ours"]["median"] / r["reference"]["median"])
        # same weights, same inputs: the two engines agree (a fast-but-wrong engine would show up here)
        assert r["max_diff"] <= (1e-5 if r["dtype"] == "float32" else 2e-2)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--dtypes", "float64"])
    assert "float64" in capsys.readouterr().err
    assert main(["--tiny", "--size", "1024", "--quiet"]) == 2  # 64 patches do not fit the tiny 16x16 table
    assert "position table" in capsys.readouterr().err
