"""scripts/bench/bench.py (and profile_step.py) in its smallest mode: it runs, agrees with diffusers, and reports
what it promises.

A smoke test, not a timing assertion: the numbers depend on the machine; their shape and consistency do not.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from scripts.bench.bench import Shape, attention_memory, main

# The peak-memory probe resets Linux's peak resident size through /proc; some containers forbid that write.
PEAK_PROBE = os.access("/proc/self/clear_refs", os.W_OK)


@pytest.fixture
def keep_threads():
    """--threads sets torch's global thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_bench_prints_table_and_writes_json(tmp_path, capsys, keep_threads):
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-compile", "--json", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "threads" in printed and "torch" in printed
    steps, _, memory = printed.partition("## Peak memory")
    table = [line for line in steps.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, two cases per dtype
    assert "| tiny | step vs diffusers | float32 |" in table[2] and "| tiny | step vs diffusers | bfloat16 |" in table[4]
    assert "| tiny | DenseDiffusion step vs our plain step | float32 |" in table[3]
    assert "(meant to differ)" in table[3] and "(meant to differ)" in table[5]

    report = json.loads(out.read_text())
    assert report["environment"]["threads"] == 1
    [shape] = report["shapes"]
    assert shape["num_heads"] == 2 and shape["size"] == 64 and shape["dual_blocks"] == [0]  # MMDiT-X's block too
    assert [(r["case"], r["dtype"]) for r in report["results"]] == [
        ("step", "float32"), ("DenseDiffusion step", "float32"), ("step", "bfloat16"), ("DenseDiffusion step", "bfloat16")]
    for r in report["results"]:
        for engine in ("ours", "reference"):
            assert len(r[engine]["times"]) == 1 and r[engine]["median"] == r[engine]["min"] > 0
        assert len(r["first_call"]) == 2 and min(r["first_call"]) > 0
        assert r["ratio"] == pytest.approx(r["ours"]["median"] / r["reference"]["median"])
        if r["case"] == "step":
            # same weights, same inputs: the two engines agree (a fast-but-wrong engine would show up here)
            assert r["max_diff"] <= (1e-5 if r["dtype"] == "float32" else 2e-2)
        else:
            assert r["max_diff"] is None and r["reference_name"] == "our plain step"

    # the memory table: the plain call and one row per chunk size (tiny defaults 16, 64) at 128x128
    if not PEAK_PROBE:
        assert report["memory"] is None and not memory
        return
    assert [c["chunk"] for c in report["memory"]["calls"]] == [None, 16, 64]
    assert report["memory"]["shape"]["size"] == 128
    assert memory.count("| modulated, chunk ") == 2 and "| plain (SDPA, no layout) |" in memory


@pytest.mark.skipif(not PEAK_PROBE, reason="/proc/self/clear_refs is not writable here")
def test_modulated_attention_memory_is_bounded_by_the_chunk():
    """One modulated call over 4096 + 9 tokens: with 64-query chunks it needs a small fraction of the full
    L x L scores; with one chunk holding every query it needs at least those scores. Measured by the bench's
    own peak-memory probe (Linux /proc), each call in a fresh process."""
    shape = Shape(blocks=1, num_heads=2, head_dim=16, context_dim=64, pooled_dim=48, pos_embed_max_size=16,
                  size=1024, text_tokens=9, batch=2)
    L = shape.image_tokens + shape.text_tokens
    full = shape.num_heads * L * L * 4  # one row's fp32 scores, 135 MB
    plain, chunked, unchunked = attention_memory(shape, [64, 0], "faithful", lambda s: None)  # 0: all at once
    assert plain.chunk is None and chunked.chunk == 64 and unchunked.chunk == L
    assert chunked.chunk_scores_bytes == shape.num_heads * 64 * L * 4
    assert chunked.extra_bytes < full / 4, (chunked, full)
    assert chunked.extra_bytes >= chunked.chunk_scores_bytes  # the probe does see the chunk's scores
    assert unchunked.extra_bytes >= full, (unchunked, full)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--dtypes", "float64"])
    assert "float64" in capsys.readouterr().err
    assert main(["--tiny", "--size", "1024", "--quiet"]) == 2  # 64 patches do not fit the tiny 16x16 table
    assert "position table" in capsys.readouterr().err


def test_profile_step_tiny_has_a_row_per_engine_and_dtype(capsys):
    from scripts.bench.profile_step import main as profile_main

    assert profile_main(["--tiny", "--blocks", "1", "--calls", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2:4] for r in rows] == [[" ours ", " float32 "], [" diffusers ", " float32 "],
                                                 [" ours ", " bfloat16 "], [" diffusers ", " bfloat16 "]]
    for row in rows:  # the four shares add up to the whole step
        shares = [float(c.strip().rstrip("%")) for c in row.split("|")[5:9]]
        assert 97 <= sum(shares) <= 103, row


def test_tiny_bench_compiled_step_agrees_with_diffusers_compiled(tmp_path, keep_threads):
    """--compile adds one case per dtype: our compiled blocks against diffusers' compiled transformer, on the
    same weights; their outputs agree within the parity tolerance, and the compilation is the first call."""
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--blocks", "1", "--repeats", "1", "--dtypes", "float32", "--dense-preset", "none",
                 "--threads", "1", "--json", str(out), "--quiet"]) == 0
    step, compiled = json.loads(out.read_text())["results"]
    assert (step["case"], compiled["case"]) == ("step", "compiled step")
    assert compiled["reference_name"] == "diffusers compiled" and compiled["max_diff"] <= 1e-5
    assert compiled["first_call"][0] > compiled["ours"]["median"]  # compiling is slower than a compiled call
