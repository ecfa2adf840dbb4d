"""Tests for dense/ (DenseDiffusion layout control, docs/densediffusion.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense import (CLIP_TOKENS, PRESETS, AttentionMaps, DenseConfig, DensePlan, LayoutError, PhraseEncoding,
                   PhraseMatch, RegionTokens, active_steps, assign_tokens, box_mask, layout_prompt, map_to_image,
                   match_phrase, parse_layout, read_layout, region_masks, replace_phrase_embeddings,
                   resize_nearest, step_lambdas, text_classes)
from dense.reference import reference_row_constant, reference_scores
from mmdit.attention import attention

INF = float("inf")

# ----------------------------------------------------------------------------------------------------------
# A tiny layout for the formula: 4 image tokens (2×2 grid) and 4 text tokens.
#   image seg  = [0, 0, 1, none]  -> areas a_0 = 0.5, a_1 = 0.25 -> size 0.5 and 0.75
#   text class = [other, phrase 0, phrase 1, other]
# Joint positions: image 0..3, text 4..7.

SEG = torch.tensor([0, 0, 1, -1])
CLASSES_MATCHES = [PhraseMatch(clip=range(1, 2), t5=range(0)), PhraseMatch(clip=range(2, 3), t5=range(0))]
IMG_ROW = [1.0, 2.0, 3.0, 4.0]  # image-key scores of a row: M = 4, m = 1
TXT_ROW = [0.0, 2.0, 1.0, -1.0]  # text-key scores of a row: M = 2, m = -1


def tiny_regions() -> RegionTokens:
    return RegionTokens(seg=SEG, coverage=torch.zeros(2, 4), area=(0.5, 0.25), grid=(2, 2))


def tiny_plan(config: DenseConfig, strength: float = 1.0, record: bool = False) -> DensePlan:
    # shift 1 and sigma 1 at step 0: u = 1, so λ_0 = strength
    return DensePlan.build(tiny_regions(), CLASSES_MATCHES, ["red", "blue"], n_txt=4, sigmas=[1.0, 0.5, 0.2],
                           num_steps=3, shift=1.0, config=config, strength=strength, record_maps=record)


def joint_row_scores(rows: int) -> torch.Tensor:
    """(1, 2, rows, 8): head 0 uses IMG_ROW ‖ TXT_ROW on every row, head 1 the same values negated."""
    row = torch.tensor(IMG_ROW + TXT_ROW)
    s = row.expand(rows, 8)
    return torch.stack([s, -s])[None].clone()


def edited(config: DenseConfig, q: int, strength: float = 1.0) -> torch.Tensor:
    d = tiny_plan(config, strength).for_call(0, slice(0, 1))
    assert d is not None and d.editing
    # soft mode returns s' minus the row constant ω_I·m_I (same softmax), subtracted below as `row_constant`
    return d.edit(joint_row_scores(1), q, q + 1)[0, :, 0]  # (2, 8): per head


# ----------------------------------------------------------------------------------------------------------
# The formula, hand-computed


def test_image_query_ii_and_it():
    out = edited(PRESETS["faithful"], q=0)  # image token of region 0: size 0.5
    # II: ω = 0.3·0.5 = 0.15; keys 0,1 (region 0) pulled up to M = 4, keys 2,3 down to m = 1
    # IT: ω = 1.0·0.5 = 0.5; text key 1 (phrase 0) up to M = 2, every other text key down to m = -1
    expected = [1 + 0.15 * 3, 2 + 0.15 * 2, 3 - 0.15 * 2, 4 - 0.15 * 3, 0 - 0.5 * 1, 2.0, 1 - 0.5 * 2, -1.0]
    row_constant = 0.15 * 1  # the dropped ω_I·m_I
    torch.testing.assert_close(out[0], torch.tensor(expected) - row_constant, rtol=0, atol=1e-6)


def test_stats_are_per_head():
    out = edited(PRESETS["faithful"], q=0)
    # head 1 sees the negated row: image M = -1, m = -4; text M = 1, m = -2
    expected = [-1 + 0.15 * 0, -2 + 0.15 * 1, -3 - 0.15 * 1, -4 - 0.15 * 0, 0 - 0.5 * 2, -2 + 0.5 * 3, -1 - 0.5 * 1,
                1 - 0.5 * 3]
    torch.testing.assert_close(out[1], torch.tensor(expected) - 0.15 * -4, rtol=0, atol=1e-6)  # ω_I·m_I


def test_step_weight_scales_the_edit():
    out = edited(PRESETS["faithful"], q=2, strength=0.5)  # region 1: size 0.75, λ = 0.5
    omega_ii, omega_it = 0.5 * 0.3 * 0.75, 0.5 * 1.0 * 0.75
    expected = [1 - omega_ii * 0, 2 - omega_ii * 1, 3 + omega_ii * 1, 4 - omega_ii * 3,
                0 - omega_it * 1, 2 - omega_it * 3, 1 + omega_it * 1, -1.0]
    torch.testing.assert_close(out[0], torch.tensor(expected) - omega_ii * 1, rtol=0, atol=1e-6)


def test_unassigned_image_query_is_flattened_with_size_one():
    out = edited(PRESETS["faithful"], q=3)
    # R empty, Q = every key; size 1: ω_ii = 0.3, ω_it = 1.0 (text row collapses onto its minimum)
    expected = [1.0, 2 - 0.3 * 1, 3 - 0.3 * 2, 4 - 0.3 * 3, -1.0, -1.0, -1.0, -1.0]
    torch.testing.assert_close(out[0], torch.tensor(expected) - 0.3 * 1, rtol=0, atol=1e-6)


def test_text_queries_ti_and_tt_in_joint_preset():
    out = edited(PRESETS["joint"], q=5)  # text token of phrase 0: size 0.5, ω_ti = 0.5, ω_tt = 0.15
    expected = [1 + 0.5 * 3, 2 + 0.5 * 2, 3 - 0.5 * 2, 4 - 0.5 * 3,  # TI: region 0 up, the rest down
                0.0, 2.0, 1 - 0.15 * 2, -1.0]  # TT: 'other' keys 4, 7 neutral; phrase 1's key down
    torch.testing.assert_close(out[0], torch.tensor(expected) - 0.5 * 1, rtol=0, atol=1e-6)


def test_text_queries_untouched_in_faithful_and_other_rows_never():
    row = joint_row_scores(1)[0, :, 0]
    torch.testing.assert_close(edited(PRESETS["faithful"], q=5), row, rtol=0, atol=0)  # w_ti = w_tt = 0
    torch.testing.assert_close(edited(PRESETS["joint"], q=4), row, rtol=0, atol=0)  # class 'other'
    torch.testing.assert_close(edited(PRESETS["joint"], q=7), row, rtol=0, atol=0)


def test_size_term_clamps_at_zero():
    regions = RegionTokens(seg=torch.tensor([0, 0, 0, 0]), coverage=torch.zeros(1, 4), area=(1.0,), grid=(2, 2))
    plan = DensePlan.build(regions, [PhraseMatch(range(1, 2), range(0))], ["all"], n_txt=4, sigmas=[1.0] * 4,
                           num_steps=4, shift=1.0, config=DenseConfig(sizereg=1.5))
    s = joint_row_scores(4)[:, :, :4]
    out = plan.for_call(0, slice(0, 1)).edit(s.clone(), 0, 4)
    torch.testing.assert_close(out, s, rtol=0, atol=0)  # size = max(0, 1 - 1.5) = 0: nothing moves


def test_hard_mode():
    out = edited(PRESETS["hard"], q=0)[0]  # region 0: other image keys and every non-phrase-0 text key out
    assert out.tolist() == [1.0, 2.0, -INF, -INF, -INF, 2.0, -INF, -INF]
    out = edited(PRESETS["hard"], q=5)[0]  # phrase 0: image keys outside region 0 and phrase 1's key out
    assert out.tolist() == [1.0, 2.0, -INF, -INF, 0.0, 2.0, -INF, -1.0]
    row = joint_row_scores(1)[0, 0, 0]
    assert torch.equal(edited(PRESETS["hard"], q=3)[0], row)  # unassigned image rows are left alone
    assert torch.equal(edited(PRESETS["hard"], q=4)[0], row)  # 'other' text rows too
    # every row keeps its own diagonal and so a finite softmax
    d = tiny_plan(PRESETS["hard"]).for_call(0, slice(0, 1))
    s = d.edit(torch.randn(2, 3, 8, 8), 0, 8)
    assert torch.isfinite(s.diagonal(dim1=-2, dim2=-1)).all()
    assert torch.isfinite(s.softmax(-1)).all()


def test_image_only_attention_uses_ii_only():
    d = tiny_plan(PRESETS["joint"]).for_call(0, slice(0, 1))
    s = torch.tensor(IMG_ROW).expand(4, 4)[None, None].clone()  # (1, 1, 4, 4): image queries, image keys
    out = d.edit(s, 0, 4)[0, 0]
    expected0 = torch.tensor([1 + 0.15 * 3, 2 + 0.15 * 2, 3 - 0.15 * 2, 4 - 0.15 * 3])
    torch.testing.assert_close(out[0], expected0 - 0.15 * 1)  # minus the row constant ω·m, as above
    torch.testing.assert_close(out[3], torch.tensor([1.0, 2 - 0.3 * 1, 3 - 0.3 * 2, 4 - 0.3 * 3]) - 0.3 * 1)
    with pytest.raises(ValueError, match="keys"):
        d.edit(torch.zeros(1, 1, 4, 6), 0, 4)


# ----------------------------------------------------------------------------------------------------------
# The fast path against the pair-by-pair reference (dense.reference), and chunking


def random_layout(seed: int, n_img: int = 24, n_txt: int = 10):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, 3, (n_img,), generator=g)
    seg[:3] = torch.tensor([0, 1, 2])  # every region owns a token
    area = [float((seg == r).float().mean()) for r in range(3)]
    matches = [PhraseMatch(range(1, 3), range(0)), PhraseMatch(range(4, 5), range(0)), PhraseMatch(range(6, 8), range(0))]
    regions = RegionTokens(seg=seg, coverage=torch.zeros(3, n_img), area=tuple(area), grid=(4, 6))
    cls = text_classes(matches, n_txt)
    return regions, matches, cls, area, g


@pytest.mark.parametrize("preset", ["faithful", "joint", "hard"])
def test_matches_reference_and_chunking(preset):
    regions, matches, cls, area, g = random_layout(0)
    cfg = PRESETS[preset]
    plan = DensePlan.build(regions, matches, ["a", "b", "c"], n_txt=10, sigmas=[0.9] * 10, num_steps=10,
                           shift=3.0, config=cfg, strength=0.8)
    d = plan.for_call(1, slice(0, 2))
    lam = 0.8 * (0.9 / (3 - 2 * 0.9)) ** 5
    assert d.step_weight == pytest.approx(lam)
    s = torch.randn(2, 3, 34, 34, generator=g)
    full = d.edit(s.clone(), 0, 34)
    ref = reference_scores(s, regions.seg, cls, area, cfg, lam)
    row_constant = reference_row_constant(s, regions.seg, cls, area, cfg, lam)
    torch.testing.assert_close(full, ref - row_constant[..., None], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full.softmax(-1), ref.softmax(-1), rtol=1e-6, atol=1e-7)
    for bounds in ([0, 5, 24, 34], [0, 23, 25, 34], [0, 7, 14, 21, 28, 34]):  # chunks inside and across N_img
        chunked = torch.cat([d.edit(s[:, :, a:b].clone(), a, b) for a, b in zip(bounds, bounds[1:])], dim=2)
        # a chunk holding text rows takes another order of operations for the text block: rounding only
        torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    # SD3.5-M's image-only attn2: N_img keys, the II rule alone
    s_img = s[:, :, :24, :24]
    ref = reference_scores(s_img, regions.seg, cls[:0], area, cfg, lam)
    row_constant = reference_row_constant(s_img, regions.seg, cls[:0], area, cfg, lam)
    torch.testing.assert_close(d.edit(s_img.clone(), 0, 24), ref - row_constant[..., None], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.edit(s_img[:, :, 9:20].clone(), 9, 20),
                               ref[:, :, 9:20] - row_constant[..., 9:20, None], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Plans: schedule window, None for the plain path, recording


def test_active_steps_round():
    assert [active_steps(k) for k in (10, 28, 50)] == [3, 8, 15]
    assert active_steps(15) == 4 and active_steps(5) == 2  # Python's round: 4.5 -> 4 (float 4.4999...), 1.5 -> 2


def test_step_lambdas_use_unshifted_sigma():
    K, a = 28, 3.0
    u = torch.linspace(1.0, 1 / 1000, K, dtype=torch.float64)
    sigmas = (a * u / (1 + (a - 1) * u)).tolist() + [0.0]  # FlowMatchEuler's shifted sigmas, trailing 0
    lams = step_lambdas(sigmas, K, shift=a, strength=2.0)
    assert len(lams) == 8
    for k in range(8):
        assert lams[k] == pytest.approx(2.0 * float(u[k]) ** 5, rel=1e-9)
    assert lams[0] == pytest.approx(2.0)
    assert lams[8 - 1] == pytest.approx(2.0 * (1 - 7 * 0.999 / 27) ** 5)
    assert len(step_lambdas(sigmas[:11], 10, shift=a)) == 3 and len(step_lambdas([1.0] * 50, 50, shift=a)) == 15
    assert step_lambdas([0.5] * 10, 10, shift=1.0, power=5.0, fraction=0.1) == (0.5 ** 5,)


def test_linear_preset_is_faithful_with_a_linear_decay():
    """`linear` changes nothing but the exponent of λ's decay: faithful's weights, and λ_k = u_k."""
    assert replace(PRESETS["linear"], power=PRESETS["faithful"].power) == PRESETS["faithful"]
    K, a = 20, 3.0
    u = torch.linspace(1.0, 1 / 1000, K, dtype=torch.float64)
    sigmas = (a * u / (1 + (a - 1) * u)).tolist() + [0.0]
    lams = step_lambdas(sigmas, K, shift=a, power=PRESETS["linear"].power)
    assert lams == pytest.approx([float(x) for x in u[:6]], rel=1e-9)
    assert all(x > y for x, y in zip(lams[1:], step_lambdas(sigmas, K, shift=a)[1:]))  # more push after step 0


def test_config_mode_is_soft_or_hard():
    assert PRESETS["faithful"].mode == "soft" and PRESETS["hard"].mode == "hard"
    with pytest.raises(ValueError, match='mode must be "soft" or "hard"'):
        DenseConfig(mode="medium")


def test_for_call_window_and_plain_path():
    plan = tiny_plan(PRESETS["faithful"])  # 3 steps -> round(0.9) = 1 active step
    assert plan.num_active == 1
    d = plan.for_call(0, slice(1, 2))
    assert d is not None and d.rows == slice(1, 2) and d.editing and d.chunk_size == 64
    assert plan.for_call(1, slice(1, 2)) is None
    assert tiny_plan(PRESETS["faithful"], strength=0.0).for_call(0, slice(1, 2)) is None
    # recording forces the explicit path in the window, without editing
    rec = tiny_plan(PRESETS["faithful"], strength=0.0, record=True)
    d = rec.for_call(0, slice(1, 2))
    assert d is not None and not d.editing and d.maps is rec.maps
    s = torch.randn(1, 2, 8, 8)
    assert torch.equal(d.edit(s.clone(), 0, 8), s)
    assert rec.for_call(0, slice(1, 2), skip_layers=(7,)) is None  # SLG pass: not recorded
    assert rec.for_call(1, slice(1, 2)) is None


def test_plan_rejects_duplicate_phrases():
    same = [PhraseMatch(range(1, 3), range(0)), PhraseMatch(range(1, 3), range(0))]
    with pytest.raises(LayoutError, match=r'regions\[0\] \("a rose"\) and regions\[1\] \("a rose"\) bind to the same'):
        DensePlan.build(tiny_regions(), same, ["a rose", "a rose"], n_txt=4, sigmas=[1.0], num_steps=1, shift=1.0)


# ----------------------------------------------------------------------------------------------------------
# Attention maps


def test_maps_stats_on_synthetic_probabilities():
    plan = tiny_plan(PRESETS["faithful"], record=True)
    d = plan.for_call(0, slice(0, 1))
    p = torch.zeros(1, 2, 8, 8)
    # image queries 0..3 put this mass on text key 5 (phrase 0) and on text key 6 (phrase 1), in both heads
    on_red = torch.tensor([0.4, 0.2, 0.1, 0.1])
    on_blue = torch.tensor([0.0, 0.1, 0.6, 0.2])
    p[:, :, :4, 5] = on_red.reshape(1, 1, 4)
    p[:, :, :4, 6] = on_blue.reshape(1, 1, 4)
    p[:, 1, :4, 5] *= 2  # head 1 twice as much on red: the head mean is 1.5×
    p[:, :, 4:, 5] = 9.0  # text queries are not recorded
    d.record(p[:, :, 0:3], 0, 3)  # chunked like the attention does
    d.record(p[:, :, 3:8], 3, 8)
    d.record(p, 0, 8)  # a second call (another block)
    d.record(torch.ones(1, 2, 4, 4), 0, 4)  # image-only attn2: ignored
    maps = plan.maps.region_maps()
    torch.testing.assert_close(maps[0], (1.5 * on_red).reshape(2, 2))
    torch.testing.assert_close(maps[1], on_blue.reshape(2, 2))
    stats = plan.maps.to_stats()
    assert stats["recorded_calls"] == 2
    (red, blue) = stats["regions"]
    assert red["phrase"] == "red" and red["area"] == 0.5 and red["region"] == 0
    assert red["in_region_fraction"] == pytest.approx(0.6 / 0.8)  # seg 0 = tokens 0, 1
    assert blue["in_region_fraction"] == pytest.approx(0.6 / 0.9)  # seg 1 = token 2
    json.dumps(stats)
    image = map_to_image(maps[1], 32, 32)
    assert image.dtype == np.uint8 and image.shape == (32, 32)
    assert image[16, 0] == 255 and image[0, 0] == 0 and image[31, 31] == round(0.2 / 0.6 * 255)


def test_maps_only_for_regions_with_phrases():
    maps = AttentionMaps(SEG, (2, 2), [1], ["blue"], [(2,)], [0.25], n_txt=4)
    assert maps.to_stats()["regions"][0]["in_region_fraction"] is None  # nothing recorded yet
    regions = RegionTokens(seg=SEG, coverage=torch.zeros(2, 4), area=(0.5, 0.25), grid=(2, 2))
    plan = DensePlan.build(regions, [PhraseMatch(range(0), range(0)), CLASSES_MATCHES[1]], ["", "blue"], n_txt=4,
                           sigmas=[1.0] * 4, num_steps=4, shift=1.0, record_maps=True)
    assert plan.maps.regions == (1,)


# ----------------------------------------------------------------------------------------------------------
# Layout files


def write_layout(tmp_path: Path, data: object, sub: str = "") -> Path:
    folder = tmp_path / sub
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "layout.json"
    path.write_text(json.dumps(data))
    return path


def test_read_layout_with_relative_mask_path(tmp_path, monkeypatch):
    folder = tmp_path / "layouts"
    folder.mkdir()
    grey = np.zeros((2, 2), np.uint8)
    grey[0, 1] = 128  # threshold: >= 128 inside
    grey[1, 0] = 127
    Image.fromarray(grey).save(folder / "m.png")
    path = write_layout(tmp_path, {"prompt": "a cat", "regions": [{"phrase": "a cat", "mask": "m.png"},
                                                                   {"phrase": "", "box": [0, 0, 1, 0.5]}]}, "layouts")
    monkeypatch.chdir(tmp_path)  # the mask path is relative to the JSON file, not the working directory
    layout = read_layout(path)
    assert layout.prompt == "a cat" and len(layout.regions) == 2
    assert layout.regions[0].mask.tolist() == [[False, True], [False, False]]
    masks = region_masks(layout, 4, 6)  # nearest resize: 2x2 -> 4x6
    assert masks.shape == (2, 4, 6) and masks.dtype == torch.bool
    assert masks[0].tolist() == [[False] * 3 + [True] * 3] * 2 + [[False] * 6] * 2
    assert masks[1].tolist() == [[True] * 6] * 2 + [[False] * 6] * 2


def test_mask_colour_image_and_nearest_resize(tmp_path):
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[1, 1] = (255, 255, 255)
    rgb[0, 0] = (255, 0, 0)  # luma 76: outside
    Image.fromarray(rgb).save(tmp_path / "c.png")
    layout = parse_layout({"regions": [{"phrase": "x", "mask": "c.png"}]}, tmp_path)
    assert layout.regions[0].mask.tolist() == [[False] * 3, [False, True, False], [False] * 3]
    # nearest with pixel centres: output y reads source row floor((y + 0.5)·h/H)
    src = torch.arange(9).reshape(3, 3)
    out = resize_nearest(src, 4, 7)
    assert out[:, 0].tolist() == [0, 3, 3, 6] and out[0].tolist() == [0, 0, 1, 1, 1, 2, 2]
    ref = np.asarray(Image.fromarray(src.numpy().astype(np.uint8)).resize((7, 4), Image.NEAREST))
    assert out.numpy().tolist() == ref.tolist()


def test_box_pixel_centre_rule():
    m = box_mask((0.25, 0.0, 0.55, 0.5), 4, 10)
    # column centres 0.05, 0.15, ..., 0.95: [0.25, 0.55) holds columns 2, 3, 4 (0.25 in, 0.55 out)
    assert m[0].nonzero().flatten().tolist() == [2, 3, 4]
    # row centres 0.125, 0.375, 0.625, 0.875: [0, 0.5) holds rows 0, 1
    assert m[:, 3].tolist() == [True, True, False, False]
    assert box_mask((0.0, 0.0, 1.0, 1.0), 3, 5).all()


def bad(region: dict) -> dict:
    return {"regions": [{"phrase": "a cat", "box": [0, 0, 1, 1]}, region]}


@pytest.mark.parametrize("data, message", [
    ({"regions": [], "prompt": "x"}, r'non-empty "regions" list'),
    ({"regions": [{"phrase": "a", "box": [0, 0, 1, 1]}], "promt": "x"}, r"unknown key\(s\) \['promt'\]"),
    (bad({"phrase": "a dog", "box": [0, 0, 1, 1], "color": "red"}),
     r'regions\[1\] \("a dog"\): unknown key\(s\) \[\'color\'\]'),
    (bad({"phrase": "a dog", "box": [0, 0, 1, 1], "mask": "m.png"}), r'regions\[1\] \("a dog"\): has both'),
    (bad({"phrase": "a dog"}), r'regions\[1\] \("a dog"\): has neither'),
    (bad({"phrase": "a dog", "box": [0, 0, 1.2, 1]}), r'regions\[1\] \("a dog"\): "box" .* out of range'),
    (bad({"phrase": "a dog", "box": [-0.1, 0, 1, 1]}), r'regions\[1\] \("a dog"\): "box" .* out of range'),
    (bad({"phrase": "a dog", "box": [0.5, 0, 0.5, 1]}), r'regions\[1\] \("a dog"\): "box" .* is empty'),
    (bad({"phrase": "a dog", "box": [0.2, 0.9, 0.5, 0.1]}), r'regions\[1\] \("a dog"\): "box" .* is empty'),
    (bad({"phrase": "a dog", "box": [0, 0, 1]}), r'regions\[1\] \("a dog"\): "box" must be four numbers'),
    (bad({"phrase": "a dog", "box": [0, 0, True, 1]}), r'regions\[1\] \("a dog"\): "box" must be four numbers'),
    (bad({"phrase": "a dog", "mask": "missing.png"}), r'regions\[1\] \("a dog"\): cannot read the mask image .*missing'),
    (bad({"phrase": "a dog", "mask": "not_an_image.png"}), r'regions\[1\] \("a dog"\): cannot read the mask image'),
    (bad({"box": [0, 0, 1, 1]}), r'regions\[1\] has no "phrase"'),
    (bad({"phrase": 3, "box": [0, 0, 1, 1]}), r'regions\[1\]: "phrase" must be a string'),
    (bad({"phrase": "  ", "box": [0, 0, 1, 1]}), r"only whitespace"),
    ({"regions": [{"phrase": f"p{i}", "box": [0, 0, 1, 1]} for i in range(17)]}, r"17 regions; at most 16"),
    ([1, 2], r"must be a JSON object"),
])
def test_layout_errors(tmp_path, data, message):
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(LayoutError, match=message):
        read_layout(write_layout(tmp_path, data))


def test_layout_file_errors_and_prompt(tmp_path):
    (tmp_path / "broken.json").write_text("{regions: ")
    with pytest.raises(LayoutError, match="not valid JSON"):
        read_layout(tmp_path / "broken.json")
    with pytest.raises(LayoutError, match="cannot read the layout file"):
        read_layout(tmp_path / "nope.json")
    with_prompt = parse_layout({"prompt": "a cat", "regions": [{"phrase": "", "box": [0, 0, 1, 1]}]})
    without = parse_layout({"regions": [{"phrase": "", "box": [0, 0, 1, 1]}]})
    assert layout_prompt(with_prompt, None) == "a cat" and layout_prompt(with_prompt, "a cat") == "a cat"
    assert layout_prompt(without, "a dog") == "a dog"
    with pytest.raises(LayoutError, match="differs from the prompt being generated"):
        layout_prompt(with_prompt, "a dog")
    with pytest.raises(LayoutError, match="no prompt"):
        layout_prompt(without, None)


# ----------------------------------------------------------------------------------------------------------
# Image tokens -> regions


def test_assign_tokens_threshold_ties_and_area():
    masks = torch.zeros(3, 32, 48, dtype=torch.bool)  # 2×3 token grid, tokens 0..5 row-major
    masks[0, :16, :8] = True  # token 0: region 0 covers exactly half -> assigned (>= 0.5)
    masks[1, :16, 16:24] = True  # token 1: region 1 covers 129 pixels ...
    masks[1, 0, 24] = True
    masks[2, :16, 24:32] = True  # ... region 2 covers 128: the larger coverage wins
    masks[0, :15, 32:48] = True  # token 2: region 0 covers 240 pixels, region 2 all 256:
    masks[2, :16, 32:48] = True  # more coverage beats the earlier index
    masks[1, 16:, :16] = True  # token 3: regions 1 and 2 both cover it fully:
    masks[2, 16:, :16] = True  # a tie goes to the earlier region 1
    masks[2, 16:, 16:32] = True  # token 4: region 2 alone
    masks[0, 16:, 32:40] = True  # token 5: region 0 covers 128 pixels minus one -> no region
    masks[0, 16, 32] = False
    rt = assign_tokens(masks, ["a", "b", "c"])
    assert rt.grid == (2, 3) and rt.n_img == 6
    assert rt.seg.tolist() == [0, 1, 2, 1, 2, -1]
    assert rt.area == (1 / 6, 2 / 6, 2 / 6)
    assert rt.coverage[0, 0] == 0.5 and rt.coverage[0, 5] == 127 / 256 and rt.coverage[1, 1] == 129 / 256


def test_assign_tokens_region_with_no_token():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0] = True
    masks[1, :16, :16] = True  # fully covered token, but region 0 covers it as well and wins the tie
    with pytest.raises(LayoutError, match=r'regions\[1\] \("small"\) covers no image token at 32×32'):
        assign_tokens(masks, ["big", "small"])
    with pytest.raises(ValueError, match="multiple of 16"):
        assign_tokens(torch.zeros(1, 24, 32, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# Phrases -> text tokens

BOS, EOS = 49406, 49407


def clip_ids(words: list[int]) -> list[int]:
    ids = [BOS] + words[:75] + [EOS]
    return ids + [EOS] * (77 - len(ids))


def test_match_phrase_first_match_in_both_parts():
    prompt_clip = clip_ids([10, 11, 12, 13, 11, 12])
    prompt_t5 = [20, 21, 22, 23, 21, 22, 1] + [0] * 9  # L_t5 = 16
    m = match_phrase(prompt_clip, [11, 12], prompt_t5, [21, 22])
    assert m.clip == range(2, 4) and m.t5 == range(1, 3)  # repeated phrase: the first occurrence
    assert m.positions == (2, 3, CLIP_TOKENS + 1, CLIP_TOKENS + 2)
    # the CLIP search starts after BOS
    assert match_phrase([7, 8, 7] + [EOS] * 74, [7], None, None).clip == range(2, 3)
    assert match_phrase(prompt_clip, [], prompt_t5, []).positions == ()  # empty phrase
    with pytest.warns(UserWarning, match="not in its T5 tokens"):
        assert match_phrase(prompt_clip, [11, 12], prompt_t5, [29]).positions == (2, 3)


def test_match_phrase_only_in_t5():
    words = list(range(100, 180))  # 80 words: CLIP keeps the first 75
    prompt_t5 = words + [1]
    m = match_phrase(clip_ids(words), [176, 177], prompt_t5, [176, 177])
    assert m.clip == range(0) and m.t5 == range(76, 78)
    assert m.positions == (CLIP_TOKENS + 76, CLIP_TOKENS + 77)
    # a phrase straddling CLIP's truncation is not in the CLIP part either
    assert match_phrase(clip_ids(words), [174, 175], prompt_t5, [174, 175]).clip == range(0)


def test_match_phrase_missing_shows_tokens_near_best_partial_match():
    vocab = {10: "a</w>", 11: "red</w>", 12: "rose</w>", 13: "roses</w>", 14: "on</w>", 15: "sea</w>", BOS: "<s>",
             EOS: "</s>"}
    prompt_clip = clip_ids([10, 11, 13, 14, 10, 15])
    with pytest.raises(LayoutError) as err:
        match_phrase(prompt_clip, [10, 11, 12], None, None, name='regions[0] ("a red rose")',
                     describe_clip=lambda ids: [vocab[i] for i in ids])
    msg = str(err.value)
    assert 'regions[0] ("a red rose"): the phrase is not in the prompt\'s tokens' in msg
    assert "phrase tokens ['a</w>', 'red</w>', 'rose</w>']" in msg
    assert "best partial match (2 of 3 tokens) at positions 1..3" in msg
    assert "['<s>', 'a</w>', 'red</w>', 'roses</w>', 'on</w>', 'a</w>', 'sea</w>']" in msg
    with pytest.raises(LayoutError, match=r"T5: phrase tokens \['99'\]; none of them occurs"):
        match_phrase(prompt_clip, [98], [20, 1, 0], [99])


def test_text_classes():
    matches = [PhraseMatch(range(2, 4), range(1, 2)), PhraseMatch(range(0), range(0)), PhraseMatch(range(5, 6), range(0))]
    cls = text_classes(matches, CLIP_TOKENS + 4)
    expected = [-1] * (CLIP_TOKENS + 4)
    expected[2] = expected[3] = expected[CLIP_TOKENS + 1] = 0
    expected[5] = 2
    assert cls.tolist() == expected


# ----------------------------------------------------------------------------------------------------------
# Phrase-embedding replacement


def test_replace_phrase_embeddings_rows_and_channels():
    g = torch.Generator().manual_seed(0)
    L_t5, D, d_l, d_g = 6, 32, 8, 12
    context = torch.randn(2, CLIP_TOKENS + L_t5, D, generator=g)
    context[:, :CLIP_TOKENS, d_l + d_g:] = 0  # the CLIP part's zero padding
    enc = PhraseEncoding(clip_l=torch.randn(1, CLIP_TOKENS, d_l, generator=g),
                         clip_g=torch.randn(1, CLIP_TOKENS, d_g, generator=g),
                         t5=torch.randn(1, L_t5, D, generator=g))
    match = PhraseMatch(clip=range(3, 5), t5=range(1, 3))
    before = context.clone()
    out = replace_phrase_embeddings(context, [enc, None], [match, PhraseMatch(range(0), range(0))])
    assert torch.equal(context, before)  # the input is not modified
    expected = before.clone()
    expected[:, 3:5, :d_l] = enc.clip_l[:, 1:3]  # the phrase's rows 1..w (its BOS row 0 is skipped)
    expected[:, 3:5, d_l:d_l + d_g] = enc.clip_g[:, 1:3]
    expected[:, CLIP_TOKENS + 1:CLIP_TOKENS + 3] = enc.t5[:, 0:2]  # T5 rows 0..w'-1
    assert torch.equal(out, expected)
    assert (out[:, :CLIP_TOKENS, d_l + d_g:] == 0).all()
    # without T5 the T5 rows stay as they are
    no_t5 = replace_phrase_embeddings(context, [PhraseEncoding(enc.clip_l, enc.clip_g, None)], [match])
    assert torch.equal(no_t5[:, CLIP_TOKENS:], before[:, CLIP_TOKENS:])
    assert torch.equal(no_t5[:, :CLIP_TOKENS], expected[:, :CLIP_TOKENS])
    with pytest.raises(ValueError, match="T5 encoding must be"):
        replace_phrase_embeddings(context, [PhraseEncoding(enc.clip_l, enc.clip_g, enc.t5[:, :4])], [match])


@pytest.mark.parametrize("preset", ["faithful", "joint", "hard"])
def test_score_edit_raises_in_region_fraction(preset):
    regions, matches, cls, area, g = random_layout(1)
    q, k, v = (torch.randn(1, 2, 34, 8, generator=g) for _ in range(3))
    fractions = []
    for strength in (0.0, 1.0):
        plan = DensePlan.build(regions, matches, ["a", "b", "c"], n_txt=10, sigmas=[1.0] * 10, num_steps=10,
                               shift=1.0, config=PRESETS[preset], strength=strength, record_maps=True, chunk_size=5)
        out = attention(q, k, v, plan.for_call(0, slice(0, 1)))  # the model's attention, chunks of 5
        if strength == 0:
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        fractions.append([r["in_region_fraction"] for r in plan.maps.to_stats()["regions"]])
    for before, after in zip(*fractions):
        assert after > before + 0.1
