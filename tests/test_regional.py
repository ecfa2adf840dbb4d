"""Regional Prompting (dense/regional.py, docs/layout-control.md): the mask and the attention against the pair-by-pair
reference, and the exactness guarantees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dense import RegionalConfig, RegionalPlan, blend, joint_labels, regional_mask, regional_prompts
from dense.regional_reference import reference_attention, reference_mask
from mmdit.attention import attention
from mmdit.errors import InputError

# 3×3 image tokens, regions 0 ("a red circle"), 1 (""), 2 ("a blue square"); -1 = no region.
SEG = torch.tensor([0, 0, -1,
                    0, 1, 2,
                    -1, 1, 2])
PHRASES = ["a red circle", "", "a blue square"]


def test_prompts_and_background():
    p = regional_prompts(SEG, PHRASES, "grey")
    assert p.texts == ("a red circle", "a blue square", "grey") and p.background
    # the empty-phrase region and the tokens of no region follow the background prompt (index 2)
    assert p.image_label.tolist() == [0, 0, 2, 0, 2, 1, 2, 2, 1]


def test_no_background_prompt_when_regions_cover_everything():
    p = regional_prompts(torch.tensor([0, 1, 1, 0]), ["a", "b"], "grey")
    assert p.texts == ("a", "b") and not p.background
    assert p.image_label.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("masked", [True, False])
def test_mask_equals_the_pair_by_pair_reference(masked):
    p = regional_prompts(SEG, PHRASES, "grey")
    n_base, length = 4, 4
    labels = joint_labels(p.image_label, n_base, len(p.texts), length)
    got = regional_mask(labels, SEG.numel(), n_base, masked)
    want = torch.tensor(reference_mask(p.image_label.tolist(), n_base, len(p.texts), length, masked))
    assert got.shape == (9 + 4 + 3 * 4,) * 2
    assert torch.equal(got, want)
    assert got.any(dim=1).all()  # no query row without a key


def test_mask_by_hand():
    # two image tokens (prompts 0, 1), one base token, one token per prompt: order [i0, i1, base, p0, p1]
    m = regional_mask(joint_labels(torch.tensor([0, 1]), 1, 2, 1), 2, 1)
    assert m.int().tolist() == [[1, 0, 0, 1, 0],
                                [0, 1, 0, 0, 1],
                                [1, 1, 1, 0, 0],
                                [1, 0, 0, 1, 0],
                                [0, 1, 0, 0, 1]]


def _plan(base_ratio=0.3, interval=1, n_base=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = regional_prompts(SEG, PHRASES, "grey")
    contexts = torch.randn(len(prompts.texts), n_base, dim, generator=g)
    return RegionalPlan.build(prompts, contexts, RegionalConfig(base_ratio, 3, interval))


def _qkv(B, H, Lq, L, Dh=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, Dh, generator=g).to(dtype), torch.randn(B, H, L, Dh, generator=g).to(dtype),
            torch.randn(B, H, L, Dh, generator=g).to(dtype))


@pytest.mark.parametrize("last", [False, True])  # the last block: only the image tokens ask
@pytest.mark.parametrize("masked", [True, False])
def test_attention_equals_the_reference(last, masked):
    plan = _plan(interval=2)
    n_img, n_base, n = 9, 4, len(plan.prompts.texts)
    L = n_img + n_base + n * n_base
    q, k, v = _qkv(3, 2, n_img if last else L, L)
    call = plan.for_call(0, slice(1, 3)).for_block(0 if masked else 1)  # CFG: row 0 negative, rows 1-2 positive
    got = attention(q, k, v, call)
    want = reference_attention(q, k, v, plan.prompts.image_label.tolist(), n_base, n, n_base, range(1, 3), 0.3,
                               masked)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_blocks_between_masked_ones_are_unmasked():
    call = _plan(interval=2).for_call(0, slice(0, 1))
    assert call.for_block(0).masked and not call.for_block(1).masked and call.for_block(4).masked
    assert torch.equal(call.for_block(1).mask, call.tables.unmasked)


def test_base_ratio_one_is_the_plain_attention_bit_for_bit():
    plan = _plan(base_ratio=1.0)
    n_img, n_base, n = 9, 4, len(plan.prompts.texts)
    L, P = n_img + n_base + n * n_base, n_img + n_base
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(2, 2, L, L, dtype=dtype)
        got = attention(q, k, v, plan.for_call(0, slice(1, 2)))
        plain = F.scaled_dot_product_attention(q[:, :, :P].contiguous(), k[:, :, :P].contiguous(),
                                               v[:, :, :P].contiguous())
        assert torch.equal(got[:, :, :P], plain)  # image and base text rows, positive and negative


def test_image_only_attention_is_plain():
    q, k, v = _qkv(2, 2, 9, 9)
    assert torch.equal(attention(q, k, v, _plan().for_call(0, slice(1, 2))), F.scaled_dot_product_attention(q, k, v))


def test_blend():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    assert torch.equal(blend(a, b, 0.0), a) and torch.equal(blend(a, b, 1.0), b)
    torch.testing.assert_close(blend(a, b, 0.25), 0.75 * a + 0.25 * b)


def test_schedule_and_context():
    plan = _plan()
    assert plan.for_call(2, slice(0, 1)) is not None and plan.for_call(3, slice(0, 1)) is None
    ctx = torch.randn(2, 4, 8)
    out = plan.context(ctx, slice(1, 2))  # (2, 4·(1+3), 8)
    assert out.shape == (2, 16, 8)
    assert torch.equal(out[:, :4], ctx)
    assert torch.equal(out[1, 4:], plan.contexts.reshape(12, 8))  # the positive row: the regional prompts
    assert torch.equal(out[0, 4:], ctx[0].repeat(3, 1))  # the negative row: its own prompt again, a filler


@pytest.mark.parametrize("bad", [dict(base_ratio=-0.1), dict(base_ratio=1.5), dict(inject_steps=-1),
                                 dict(inject_interval=0)])
def test_bad_config(bad):
    with pytest.raises(InputError):
        RegionalConfig(**bad)


# ----------------------------------------------------------------------------------------------------------
# In the pipeline, on the built-in model (6 blocks, dual attention in 0-2, CFG 4.5)

LAYOUT = {
    "prompt": "a blue square and a red circle",
    "regions": [{"phrase": "a blue square", "box": [0.0, 0.625, 0.375, 1.0]},
                {"phrase": "a red circle", "box": [0.625, 0.0, 1.0, 0.375]}],
}


@pytest.fixture(scope="module")
def pipe():
    from loaders.pipeline import Pipeline

    return Pipeline.load(keep_loaded=True)


def _latents(pipe, **kw):
    return pipe(seed=3, steps=4, **kw).latents


def test_pipeline_exactness(pipe):
    plain = _latents(pipe, prompt=LAYOUT["prompt"])
    regional = lambda **c: _latents(pipe, layout=LAYOUT, layout_method="regional",  # noqa: E731
                                    regional=RegionalConfig(**c))
    # β = 1: the image rows take only the base pass, so the run is the base prompt's plain one
    assert torch.equal(regional(base_ratio=1.0, inject_steps=4), plain)
    # inject steps 0: the regional prompts are never used (nor encoded)
    assert torch.equal(regional(inject_steps=0), plain)
    steered = regional(inject_steps=2)
    assert not torch.equal(steered, plain)  # so the equalities above are not vacuous
    # with skip-layer guidance (its pass gets the regional prompts too) β = 1 is still the plain run
    slg = dict(slg_layers=(4,), slg_start=0.0, slg_stop=1.0)
    assert torch.equal(_latents(pipe, layout=LAYOUT, layout_method="regional",
                                regional=RegionalConfig(base_ratio=1.0, inject_steps=4), **slg),
                       _latents(pipe, prompt=LAYOUT["prompt"], **slg))


def test_pipeline_records_the_method(pipe):
    r = pipe(seed=0, steps=2, layout=dict(LAYOUT, background="grey"), layout_method="regional",
             regional=RegionalConfig(0.2, 1, 2))
    assert r.record["layout_method"] == "regional" and r.record["dense_strength"] is None
    assert r.record["regional"] == {"base_ratio": 0.2, "inject_steps": 1, "inject_interval": 2}
    assert r.record["layout"]["background"] == "grey"
    # the phrases are prompts of their own: they need not occur in the base prompt (DenseDiffusion refuses this)
    pipe("two shapes", seed=0, steps=1, layout={"regions": LAYOUT["regions"]}, layout_method="regional")
    with pytest.raises(InputError):
        pipe("two shapes", seed=0, steps=1, layout={"regions": LAYOUT["regions"]})
    with pytest.raises(InputError):
        pipe(seed=0, steps=2, layout=LAYOUT, layout_method="nope")
    with pytest.raises(InputError):
        pipe(seed=0, steps=2, layout=LAYOUT, layout_method="regional", record_maps=True)


def test_step_benchmark_times_a_regional_step(capsys):
    from scripts.bench.bench import main

    n = torch.get_num_threads()
    try:
        assert main(["--tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-compile", "--dtypes",
                     "float32", "--dense-preset", "none", "--memory-size", "0", "--regional", "--quiet"]) == 0
    finally:
        torch.set_num_threads(n)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "| tiny | Regional Prompting step vs our plain step | float32 |" in table[3]
    assert "(meant to differ)" in table[3]
