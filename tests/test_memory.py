"""Fitting big models: block streaming, T5 elsewhere, float16 that stays finite, the memory report, gpu_check.

On a CPU-only machine streaming runs from "cpu" to "cpu" through the same `BlockStreamer` code, and T5 "on
another device" is T5 on the CPU, so both must give the default output bit for bit. The float16 clamp must
change nothing in float32 and bfloat16, nor in float16 without an overflow, and must keep an overflowing
float16 residual stream finite.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import mmdit.block
from loaders.memory import MemoryLog, memory_table
from loaders.pipeline import Pipeline
from mmdit.errors import InputError
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.streaming import BlockStreamer, StreamedBlock, offload_blocks, pack_blocks
from scripts.generate import main as generate
from tests.random_weights import randomize_

PROMPT = "a red circle"
STEPS = ("--steps", "2")
# Dual attention in block 0, a plain block 1, the pre-only last block 2: every kind of block streams.
CONFIG = MMDiTConfig(depth=3, num_heads=2, head_dim=16, pos_embed_max_size=8, context_dim=32, pooled_dim=24,
                     dual_attention_layers=(0,))


def tiny_model(seed: int = 0) -> MMDiT:
    return randomize_(MMDiT(CONFIG), torch.Generator().manual_seed(seed)).eval()


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 6, generator=g)  # a non-square latent
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 24, generator=g)
    return x.to(dtype), torch.tensor([1000.0, 412.5]), ctx.to(dtype), pooled.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_blocks_give_the_same_output_bit_for_bit(dtype):
    plain = tiny_model().to(dtype)
    streamed = offload_blocks(copy.deepcopy(plain), "cpu")
    assert plain.streamer is None and isinstance(streamed.streamer, BlockStreamer)
    with torch.no_grad():
        for skip in [(), (1,), (2,)]:
            a, b = plain(*inputs(dtype), skip_layers=skip), streamed(*inputs(dtype), skip_layers=skip)
            assert torch.equal(a, b), skip


def test_blocks_are_packed_into_shared_buffers_with_their_values():
    model = tiny_model().requires_grad_(False)  # as loaded
    before = [{k: t.clone() for k, t in b.state_dict().items()} for b in model.joint_blocks]
    sizes = [sum(-(-t.nbytes // 64) * 64 for t in b.values()) for b in before]
    # Room for blocks 0 and 1 together, not for block 2 as well: two buffers.
    assert pack_blocks(model.joint_blocks, pin=False, pack_bytes=sizes[0] + sizes[1]) == 2
    storages = [{t.untyped_storage().data_ptr() for t in b.state_dict().values()} for b in model.joint_blocks]
    assert storages[0] == storages[1] and len(storages[0]) == 1 and storages[2].isdisjoint(storages[0])
    for block, old in zip(model.joint_blocks, before):
        new = block.state_dict()
        assert all(torch.equal(new[k], old[k]) and new[k].dtype == old[k].dtype for k in old)
        assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in block.parameters())


def test_the_streamer_yields_each_block_once_in_order():
    model = tiny_model()
    blocks = [model.joint_blocks[0], model.joint_blocks[2]]
    yielded = list(BlockStreamer("cpu").stream(blocks))
    assert [s.block for s in yielded] == blocks and all(isinstance(s, StreamedBlock) for s in yielded)
    assert set(yielded[1].weights) == set(dict(blocks[1].state_dict()))  # every parameter and buffer travels
    assert list(BlockStreamer("cpu").stream([])) == []
    x = torch.randn(1, 12, CONFIG.dim)
    c, vec = torch.randn(1, 5, CONFIG.dim), torch.randn(1, CONFIG.dim)
    with torch.no_grad():
        out, _ = yielded[0](x, c, vec)
        assert torch.equal(out, blocks[0](x, c, vec)[0])
        with pytest.raises(RuntimeError, match="runs once"):  # its device copy was released by the first call
            yielded[0](x, c, vec)


def overflowing_model() -> MMDiT:
    """Block 0's text MLP writes ~1e5 into the residual stream: past float16's 65504, fine in float32/bfloat16."""
    model = tiny_model(3)
    with torch.no_grad():
        model.joint_blocks[0].context_block.mlp.fc2.weight.mul_(3e4)
    return model


@pytest.mark.parametrize("make, dtype", [(tiny_model, torch.float32), (tiny_model, torch.bfloat16),
                                         (tiny_model, torch.float16), (overflowing_model, torch.float32),
                                         (overflowing_model, torch.bfloat16)])  # float16 overflowing: next test
def test_the_float16_clamp_changes_nothing_that_stays_finite(monkeypatch, make, dtype):
    model = make().to(dtype)
    with torch.no_grad():
        clamped = model(*inputs(dtype))
        monkeypatch.setattr(mmdit.block, "clamp_fp16", lambda x: x)
        unclamped = model(*inputs(dtype))
    assert torch.isfinite(unclamped).all() and torch.equal(clamped, unclamped)


def test_the_float16_clamp_keeps_an_overflowing_stream_finite(monkeypatch):
    model = overflowing_model()
    with torch.no_grad():
        reference = model(*inputs())
        half = model.half()
        clamped = half(*inputs(torch.float16))
        monkeypatch.setattr(mmdit.block, "clamp_fp16", lambda x: x)
        unclamped = half(*inputs(torch.float16))
    assert not torch.isfinite(unclamped).all()  # the overflow is real: without the clamp it spreads as NaN
    assert torch.isfinite(clamped).all()
    # Finite is not exact: the float32 stream really holds ~1e5 where float16 holds 65504, and the LayerNorms
    # that read it see other statistics. Here that moves the output by about a tenth of its scale.
    assert (clamped.float() - reference).abs().max() <= 0.25 * reference.abs().max()


@pytest.fixture(scope="module")
def default_result():
    return Pipeline.load()(PROMPT, steps=3, seed=5)


def test_offload_and_t5_on_the_cpu_change_nothing_here(default_result):
    pipe = Pipeline.load(offload="blocks", t5_device="cpu")
    assert pipe.transformer().streamer is not None  # the streaming path is the one that ran
    result = pipe(PROMPT, steps=3, seed=5)
    assert torch.equal(result.latents, default_result.latents)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(default_result.images[0]))
    assert result.record == default_result.record


def test_t5_output_is_moved_to_the_pipeline_device():
    """T5 on a device that differs from the pipeline's (cpu:0 is not cpu as a torch.device, though the same
    memory): its output goes through the move and the conditioning is unchanged. The encoders are kept from
    the first call, so the second loads no file (safetensors does not open files for "cpu:0")."""
    from loaders.text import encode_prompts

    pipe, kept = Pipeline.load(), {}
    args = dict(max_sequence_length=pipe.preset.max_sequence_length, context_dim=pipe.config.context_dim, keep=kept)
    here = encode_prompts(pipe.files, [PROMPT], [""], **args)
    moved = encode_prompts(pipe.files, [PROMPT], [""], t5_device="cpu:0", **args)
    assert torch.equal(here.positive.context, moved.positive.context)
    assert torch.equal(here.negative.context, moved.negative.context)


def test_bad_memory_options_say_what_to_do(tmp_path, capsys):
    with pytest.raises(InputError, match="'disk' is not one of \\['none', 'blocks'\\]"):
        Pipeline.load(offload="disk")
    with pytest.raises(InputError, match="'gpu7' is not a device; give e.g. 'cpu'"):
        Pipeline.load(t5_device="gpu7")
    with pytest.raises(SystemExit):
        generate(["--prompt", PROMPT, "--offload", "disk", "--quiet"])
    assert "invalid choice: 'disk'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert generate(["--prompt", PROMPT, "--t5-device", "cuda", "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
        assert "no CUDA device; use 'cpu'" in capsys.readouterr().err


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


def test_memory_report_has_every_stage_with_its_weights():
    pipe = Pipeline.load(keep_loaded=True)
    log = MemoryLog()
    pipe(PROMPT, steps=2, memory=log)
    assert [s.stage for s in log.stages] == ["CLIP-L", "CLIP-G", "T5", "sampling", "VAE"]
    by_stage = {s.stage: s for s in log.stages}
    assert by_stage["sampling"].weight_bytes == {"cpu": module_bytes(pipe.transformer())}
    assert by_stage["VAE"].weight_bytes == {"cpu": module_bytes(pipe.autoencoder())}
    assert by_stage["T5"].weight_bytes == {"cpu": module_bytes(pipe._text["T5"])}
    assert all(s.device == "cpu" and s.device_peak is None and s.seconds > 0 for s in log.stages)
    peaks = [s.rss_peak for s in log.stages]
    assert peaks == sorted(peaks) and all(s.rss_rise >= 0 for s in log.stages)  # a lifetime maximum only grows
    # Precomputed embeddings: no text stage; the same log keeps collecting.
    from loaders.text import encode_prompts

    enc = encode_prompts(pipe.files, [PROMPT], [""], max_sequence_length=pipe.preset.max_sequence_length,
                         context_dim=pipe.config.context_dim)
    pipe(prompt_embeds=enc.positive, negative_embeds=enc.negative, steps=2, memory=log)
    assert [s.stage for s in log.stages[5:]] == ["sampling", "VAE"]


def test_cli_prints_the_memory_table_even_when_quiet(tmp_path, capsys):
    assert generate(["--prompt", PROMPT, "--out", str(tmp_path / "x.png"), "--quiet", "--report-memory",
                     "--offload", "blocks", *STEPS]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| stage | weights | peak GPU allocated | peak RSS so far | RSS rise | seconds |")
    assert [line.split("|")[1].strip() for line in out[2:]] == ["CLIP-L", "CLIP-G", "T5", "sampling", "VAE"]
    assert all(" on cpu |" in line for line in out[2:])
    assert memory_table([]).count("\n") == 1  # header and rule only


def test_gpu_check_cpu_fallback_has_a_row_per_mode_and_dtype(tmp_path, capsys):
    from scripts.bench.gpu_check import DTYPES, MODES, STAGES, main

    assert main(["--device", "cpu", "--work", str(tmp_path), "--json", str(tmp_path / "check.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "mode |" not in line]
    assert sorted((r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows) == sorted(
        (m, d) for m in MODES for d in DTYPES)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[3:9]]
        assert "–" not in cells, row  # a time and five stage peaks in every row
    # One row's measurement as a fresh process prints it (the --child protocol the GPU run uses).
    assert main(["--device", "cpu", "--work", str(tmp_path), "--child", "blocks", "bfloat16"]) == 0
    child = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert child["error"] is None and [s["stage"] for s in child["stages"]] == list(STAGES)
