"""Text encoders and prompt-embedding assembly vs transformers / diffusers, and every official file layout.

References: transformers `CLIPTextModelWithProjection` / `T5EncoderModel` (hidden_states[-2], text_embeds,
last_hidden_state; float16 as `from_pretrained(torch_dtype=float16)` loads it) and diffusers'
`StableDiffusion3Pipeline.encode_prompt`. Weights are random with norm weights/biases moved away from 1/0.
Every model, reference and ours, is loaded from files written in the official layouts, through our loaders.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel
from transformers import T5Config as HFT5Config

from loaders.safetensors import CheckpointError, load_weights
from loaders.text_encoders import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    T5_PREFIX,
    clip_pooling_rule,
    clip_state_dict,
    load_clip,
    load_t5,
    read_text_encoder_json,
    t5_state_dict,
)
from mmdit.clip import CLIPConfig, CLIPOutput, CLIPTextModel
from mmdit.conditioning import Conditioning, assemble, repeat_for_images
from mmdit.t5 import T5Config, relative_position_buckets

F16 = torch.float16
# Ours and the reference run the same kernels in the same order, so float16 results come out bitwise equal
# here. The bound is below one float16 ulp at the output's scale (2**-11 = 4.9e-4 relative), which is also
# below what running T5's `wo` in float16 instead of float32 changes (6e-4 on the real-width block).
FP16_TOL = 3e-4


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """Max abs difference relative to the reference's scale (both taken in float64)."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize_norms_(model: nn.Module, seed: int) -> nn.Module:
    """LayerNorm / RMSNorm weights around 1 and LayerNorm biases non-zero, so defaults cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "final_layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------------------------ CLIP


def hf_clip(width, layers, heads, mlp, act, *, vocab=100, proj=None, eos_token_id=2, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, hidden_act=act, projection_dim=proj or width, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1,
    )
    return randomize_norms_(CLIPTextModelWithProjection(cfg), seed)


def ours_clip(ref, act, *, num_heads=None, eos_token_id=None, dtype=torch.float32) -> CLIPTextModel:
    """Ours from a transformers model's state dict, in memory, through the key map."""
    sd = clip_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, identity_projection=False)
    cfg = CLIPConfig.from_state_dict(sd, activation=act, num_heads=num_heads, eos_token_id=eos_token_id)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    return load_weights(model, sd, what="test CLIP", dtype=dtype, device="cpu")


def clip_ids(batch: int, vocab: int, *, seed: int = 0) -> Tensor:
    """(B, 77) ids shaped like tokenizer output: BOS, words, EOS (= largest id), then padding.

    Row 0 pads with EOS (CLIP-L's tokenizer), row 1 with id 0 (CLIP-G's "!"), row 2 fills all 77 positions.
    """
    g = torch.Generator().manual_seed(seed)
    bos, eos = vocab - 2, vocab - 1
    ids = torch.randint(2, vocab - 2, (batch, 77), generator=g)
    ids[:, 0] = bos
    ends = [9, 40, 76]
    pads = [eos, 0, eos]
    for b in range(batch):
        ids[b, ends[b % 3]] = eos
        ids[b, ends[b % 3] + 1 :] = pads[b % 3]
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_tiny_parity(act, record_property):
    ref = hf_clip(32, 3, 4, 37, act, proj=24, seed=1)
    ours = ours_clip(ref, act, num_heads=4)
    ids = clip_ids(3, 100)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
        o_skip = ours(ids, clip_skip=1)
    assert isinstance(o, CLIPOutput) and o.penultimate.shape == (3, 77, 32) and o.pooled.shape == (3, 24)
    errs = {
        "penultimate": rel_err(o.penultimate, r.hidden_states[-2]),
        "pooled": rel_err(o.pooled, r.text_embeds),
        "clip_skip1": rel_err(o_skip.penultimate, r.hidden_states[-3]),
    }
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs
    assert torch.equal(o_skip.pooled, o.pooled)  # clip_skip never changes the pooled vector
    # the sequence is the un-normed penultimate state, not the last one
    assert rel_err(o.penultimate, r.hidden_states[-1]) > 1e-2


@pytest.mark.parametrize(
    "act,width,heads,mlp",
    [("quick_gelu", 768, 12, 3072), ("gelu", 1280, 20, 5120)],  # CLIP-L / CLIP-G widths, 2 layers
)
def test_clip_real_width_parity(act, width, heads, mlp, record_property):
    ref = hf_clip(width, 2, heads, mlp, act, vocab=300, seed=2)
    ours = ours_clip(ref, act)  # heads from width // 64
    assert ours.cfg.num_heads == heads
    ids = clip_ids(2, 300, seed=3)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    errs = {"penultimate": rel_err(o.penultimate, r.hidden_states[-2]), "pooled": rel_err(o.pooled, r.text_embeds)}
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs


def test_clip_eos_id_pooling_rule():
    """transformers pools at the first `eos_token_id` unless the config says 2 (then argmax); ours follows."""
    ref = hf_clip(32, 2, 4, 37, "gelu", eos_token_id=50, seed=4)
    ids = clip_ids(2, 100, seed=5)
    ids[:, 12] = 50  # EOS id 50 at position 12, larger ids (up to 99) elsewhere
    with torch.no_grad():
        r = ref(ids).text_embeds
        eos_rule = ours_clip(ref, "gelu", num_heads=4, eos_token_id=clip_pooling_rule(50))(ids).pooled
        argmax_rule = ours_clip(ref, "gelu", num_heads=4)(ids).pooled
    assert rel_err(eos_rule, r) < 1e-5
    assert rel_err(argmax_rule, r) > 1e-2  # the two rules really differ here
    assert clip_pooling_rule(2) is None and clip_pooling_rule(None) is None


def test_clip_config_from_real_shapes():
    def shapes(width, layers, mlp, proj=True):
        sd = {
            "text_model.embeddings.token_embedding.weight": (49408, width),
            "text_model.embeddings.position_embedding.weight": (77, width),
            **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": (mlp, width) for i in range(layers)},
        }
        return sd | ({"text_projection.weight": (width, width)} if proj else {})

    g = CLIPConfig.from_state_dict(shapes(1280, 32, 5120), activation="gelu")
    assert (g.width, g.num_layers, g.num_heads, g.mlp_width, g.projection_dim) == (1280, 32, 20, 5120, 1280)
    l_cfg = CLIPConfig.from_state_dict(shapes(768, 12, 3072, proj=False), activation="quick_gelu")
    assert (l_cfg.num_heads, l_cfg.projection_dim, l_cfg.max_positions, l_cfg.eos_token_id) == (12, 768, 77, None)
    with pytest.raises(ValueError, match="num_heads"):
        CLIPConfig.from_state_dict(shapes(32, 2, 37), activation="gelu")
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPConfig.from_state_dict(shapes(768, 2, 3072), activation="relu")


def test_clip_rejects_long_input():
    ours = ours_clip(hf_clip(32, 2, 4, 37, "gelu"), "gelu", num_heads=4)
    with pytest.raises(ValueError, match="77"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_clip_fp16_matches_transformers_fp16(tmp_path, record_property):
    ref32 = hf_clip(64, 3, 4, 96, "quick_gelu", seed=6)
    ref32.save_pretrained(tmp_path / "text_encoder")
    ref16 = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder", torch_dtype=F16).eval()
    ours = load_clip(tmp_path / "text_encoder", activation="quick_gelu", dtype=F16)
    ids = clip_ids(3, 100, seed=7)
    with torch.no_grad():
        r = ref16(ids, output_hidden_states=True)
        o = ours(ids)
        r32 = ref32(ids, output_hidden_states=True)
    assert o.penultimate.dtype == F16 and o.pooled.dtype == F16
    errs = {"penultimate": rel_err(o.penultimate, r.hidden_states[-2]), "pooled": rel_err(o.pooled, r.text_embeds)}
    record_property("rel_err", errs)
    assert max(errs.values()) < FP16_TOL, errs
    assert rel_err(o.pooled, r32.text_embeds) < 2e-2  # and float16 is close to float32


# -------------------------------------------------------------------------------------------------- T5


def hf_t5_config(**kw) -> HFT5Config:
    args = dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    return HFT5Config(**(args | kw))


def t5_weights(cfg: HFT5Config, *, seed: int, fp16_exact: bool = False) -> dict[str, Tensor]:
    """A random state dict in transformers' T5EncoderModel names (shared.weight only, as save_pretrained writes).

    Drawn directly (fast for the real width): linear weights ~ N(0, 1/fan_in), embedding ~ N(0, 1), norms
    around 1, a position table with visible structure. `fp16_exact`: rounded to float16 values.
    """
    g = torch.Generator().manual_seed(seed)
    inner, D = cfg.num_heads * cfg.d_kv, cfg.d_model

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    sd = {"shared.weight": torch.randn(cfg.vocab_size, D, generator=g)}
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        sd |= {f"{p}0.SelfAttention.{n}.weight": lin(inner, D) for n in "qkv"}
        sd[f"{p}0.SelfAttention.o.weight"] = lin(D, inner)
        if i == 0:
            sd[f"{p}0.SelfAttention.relative_attention_bias.weight"] = torch.randn(
                cfg.relative_attention_num_buckets, cfg.num_heads, generator=g
            )
        sd[f"{p}0.layer_norm.weight"] = 1 + 0.3 * torch.randn(D, generator=g)
        sd[f"{p}1.DenseReluDense.wi_0.weight"] = lin(cfg.d_ff, D)
        sd[f"{p}1.DenseReluDense.wi_1.weight"] = lin(cfg.d_ff, D)
        sd[f"{p}1.DenseReluDense.wo.weight"] = lin(D, cfg.d_ff)
        sd[f"{p}1.layer_norm.weight"] = 1 + 0.3 * torch.randn(D, generator=g)
    sd["encoder.final_layer_norm.weight"] = 1 + 0.3 * torch.randn(D, generator=g)
    return {k: v.half().float() for k, v in sd.items()} if fp16_exact else sd


def write_t5_folder(folder: Path, cfg: HFT5Config, sd: dict[str, Tensor], dtype=torch.float32) -> Path:
    """A diffusers `text_encoder_3/` folder: config.json + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def hf_t5(folder: Path, dtype=torch.float32) -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(folder, torch_dtype=dtype).eval()


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (8, 20), (32, 16), (16, 64)]:
        pos = torch.arange(512)
        ref = T5Attention._relative_position_bucket(
            pos[None, :] - pos[:, None], bidirectional=True, num_buckets=buckets, max_distance=distance
        )
        assert torch.equal(relative_position_buckets(512, buckets, distance), ref)


def test_t5_tiny_parity_fp32(tmp_path, record_property):
    cfg = hf_t5_config()
    folder = write_t5_folder(tmp_path / "text_encoder_3", cfg, t5_weights(cfg, seed=0))
    ref, ours = hf_t5(folder), load_t5(folder)
    assert ours.cfg.max_distance == 20 and ours.cfg.num_heads == 4  # from config.json / the position table
    ids = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(1))  # > max_distance
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).last_hidden_state)
    record_property("rel_err", err)
    assert err < 1e-5


@pytest.fixture(scope="module")
def real_width_t5(tmp_path_factory):
    """One T5-XXL-width block (d_model 4096, d_ff 10240, 64 heads x 64) stored in float16, as t5xxl_fp16."""
    cfg = hf_t5_config(
        vocab_size=48, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=1,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
    )
    folder = write_t5_folder(tmp_path_factory.mktemp("t5") / "text_encoder_3", cfg, t5_weights(cfg, seed=2), F16)
    ids = torch.randint(0, 48, (2, 40), generator=torch.Generator().manual_seed(3))
    ids[:, 30] = 1  # </s>, then padding
    ids[:, 31:] = 0
    return folder, ids


def test_t5_real_width_fp32(real_width_t5, record_property):
    folder, ids = real_width_t5
    ref = hf_t5(folder)
    ours = load_t5(folder)
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).last_hidden_state)
    record_property("rel_err", err)
    assert err < 1e-5


def test_t5_real_width_fp16(real_width_t5, record_property):
    folder, ids = real_width_t5
    ref = hf_t5(folder, F16)
    ours = load_t5(folder, dtype=F16)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert ref.get_parameter(wo).dtype == torch.float32 and ours.get_parameter(wo).dtype == torch.float32
    assert ours.get_parameter("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").dtype == F16
    with torch.no_grad():
        r, o = ref(ids).last_hidden_state, ours(ids)
    assert o.dtype == r.dtype == F16 and torch.isfinite(o).all()
    err = rel_err(o, r)
    record_property("rel_err", err)
    assert err < FP16_TOL


def overflow_weights(cfg: HFT5Config) -> dict[str, Tensor]:
    """Weights that overflow a float16 residual stream in block 0's attention sub-layer.

    Embeddings of +-60000 in half the channels plus an attention output in the thousands pass 65504 (the
    float16 maximum): without transformers' clamp the stream holds inf and the next RMS norm makes NaN.
    """
    sd = t5_weights(cfg, seed=5)
    big = torch.sign(torch.randn(cfg.vocab_size, cfg.d_model // 2, generator=torch.Generator().manual_seed(6)))
    sd["shared.weight"][:, : cfg.d_model // 2] = 60000.0 * big
    for i in range(cfg.num_layers):
        sd[f"encoder.block.{i}.layer.0.SelfAttention.o.weight"] *= 3000.0
    return sd


def test_t5_fp16_overflow_is_clamped_like_transformers(tmp_path, record_property):
    cfg = hf_t5_config()
    folder = write_t5_folder(tmp_path / "text_encoder_3", cfg, overflow_weights(cfg))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    errs = {}

    # 1) as from_pretrained(torch_dtype=float16) loads it: wo in float32, residual float32 after block 0
    ref, ours = hf_t5(folder, F16), load_t5(folder, dtype=F16)
    with torch.no_grad():
        h = ours.shared(ids)
        bias = ours.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])
        pre_clamp = ours.encoder.block[0].layer[0](h, bias)
        r, o = ref(ids).last_hidden_state, ours(ids)
    assert pre_clamp.dtype == F16 and torch.isinf(pre_clamp).any()  # the clamp is really exercised
    assert torch.isfinite(r).all() and torch.isfinite(o).all()
    errs["wo_fp32"] = rel_err(o, r)

    # 2) everything float16 (transformers' .half()): the clamp runs after every sub-layer
    ref16 = hf_t5(folder).half()
    ours16 = load_t5(folder).half()
    with torch.no_grad():
        r, o = ref16(ids).last_hidden_state, ours16(ids)
    assert torch.isfinite(r).all() and torch.isfinite(o).all()
    errs["all_fp16"] = rel_err(o, r)
    record_property("rel_err", errs)
    assert max(errs.values()) < FP16_TOL, errs


def test_t5_bf16_keeps_wo_in_bf16(tmp_path, record_property):
    cfg = hf_t5_config(num_layers=1)
    folder = write_t5_folder(tmp_path / "te3", cfg, t5_weights(cfg, seed=8))
    ours = load_t5(folder, dtype=torch.bfloat16)
    ref = hf_t5(folder, torch.bfloat16)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert ours.get_parameter(wo).dtype == ref.get_parameter(wo).dtype == torch.bfloat16
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).last_hidden_state)
    record_property("rel_err", err)
    assert err < 2e-3  # bfloat16 ulp is 2**-8 = 3.9e-3


def test_t5_config_from_xxl_shapes():
    shapes = {
        "shared.weight": (32128, 4096),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        **{f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight": (10240, 4096) for i in range(24)},
    }
    cfg = T5Config.from_state_dict(shapes)
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.num_buckets) == (
        4096, 10240, 24, 64, 64, 32,
    )
    with pytest.raises(ValueError, match="num_heads=32"):
        T5Config.from_state_dict(shapes, num_heads=32)


# ----------------------------------------------------------------------------------- official layouts


def test_stability_standalone_files(tmp_path, record_property):
    """clip_l / clip_g / t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors: bare transformers names, no config.json."""
    errs = {}
    ids = clip_ids(3, 100, seed=10)

    # clip_l.safetensors: no text_projection (-> identity, pooled = un-projected EOS state); old position_ids
    ref_l = hf_clip(32, 3, 4, 37, "quick_gelu", seed=11)
    sd = {k: v for k, v in ref_l.state_dict().items() if k != "text_projection.weight"}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(tmp_path / "clip_l.safetensors"))
    ours_l = load_clip(tmp_path / "clip_l.safetensors", activation="quick_gelu", num_heads=4)
    assert torch.equal(ours_l.text_projection.weight, torch.eye(32))
    with torch.no_grad():
        r = ref_l.text_model(ids, output_hidden_states=True)
        o = ours_l(ids)
    errs["clip_l"] = max(rel_err(o.pooled, r.pooler_output), rel_err(o.penultimate, r.hidden_states[-2]))
    # a clip_l file that does carry a (non-identity) projection: SD3 still uses the identity
    save_file(dict(ref_l.state_dict()), str(tmp_path / "clip_l_with_projection.safetensors"))
    ours_lp = load_clip(tmp_path / "clip_l_with_projection.safetensors", activation="quick_gelu", num_heads=4)
    assert torch.equal(ours_lp.text_projection.weight, torch.eye(32))

    # clip_g.safetensors: its own projection
    ref_g = hf_clip(48, 3, 4, 64, "gelu", proj=40, seed=12)
    save_file(dict(ref_g.state_dict()), str(tmp_path / "clip_g.safetensors"))
    ours_g = load_clip(tmp_path / "clip_g.safetensors", activation="gelu", num_heads=4)
    with torch.no_grad():
        r = ref_g(ids, output_hidden_states=True)
        o = ours_g(ids)
    errs["clip_g"] = max(rel_err(o.pooled, r.text_embeds), rel_err(o.penultimate, r.hidden_states[-2]))

    # a CLIP-G file without its projection is an error, not an identity
    save_file({k: v for k, v in ref_g.state_dict().items() if k != "text_projection.weight"},
              str(tmp_path / "clip_g_broken.safetensors"))
    with pytest.raises(CheckpointError, match="text_projection"):
        load_clip(tmp_path / "clip_g_broken.safetensors", activation="gelu", num_heads=4)

    # t5xxl_fp16.safetensors: float16, both embedding names (shared + tied encoder.embed_tokens), max distance 128
    cfg = hf_t5_config(relative_attention_num_buckets=32, relative_attention_max_distance=128)
    w = t5_weights(cfg, seed=13, fp16_exact=True)
    ref_folder = write_t5_folder(tmp_path / "ref_t5", cfg, w)
    ref = hf_t5(ref_folder)
    t5_ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(14))  # > 128: saturation
    with torch.no_grad():
        r = ref(t5_ids).last_hidden_state
    fp16 = {k: v.half() for k, v in w.items()} | {"encoder.embed_tokens.weight": w["shared.weight"].half()}
    save_file(fp16, str(tmp_path / "t5xxl_fp16.safetensors"))
    with torch.no_grad():
        errs["t5xxl_fp16"] = rel_err(load_t5(tmp_path / "t5xxl_fp16.safetensors")(t5_ids), r)

    # only the tied name present
    only_tied = {k: v for k, v in fp16.items() if k != "shared.weight"}
    save_file(only_tied, str(tmp_path / "t5_embed_tokens.safetensors"))
    with torch.no_grad():
        errs["t5_embed_tokens"] = rel_err(load_t5(tmp_path / "t5_embed_tokens.safetensors")(t5_ids), r)

    # t5xxl_fp8_e4m3fn.safetensors: matrices in float8 e4m3fn, norm weights in float16; upcast on load
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.half()) for k, v in w.items()}
    save_file(fp8, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    with safe_open(str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == torch.float8_e4m3fn
    ref8_folder = write_t5_folder(tmp_path / "ref_t5_fp8", cfg, {k: v.float() for k, v in fp8.items()})
    ours8 = load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    assert ours8.get_parameter("encoder.block.0.layer.0.SelfAttention.q.weight").dtype == torch.float32
    with torch.no_grad():
        r8 = hf_t5(ref8_folder)(t5_ids).last_hidden_state
        o8 = ours8(t5_ids)
    errs["t5xxl_fp8"] = rel_err(o8, r8)
    assert rel_err(o8, r) > 1e-3  # float8 really changed the weights (the file is not secretly fp16)
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs


def test_combined_checkpoint_prefixes(tmp_path, record_property):
    """sd3_medium_incl_clips_t5xxlfp16-style file: text_encoders.{clip_l,clip_g,t5xxl}.transformer.* + the rest."""
    ref_l = hf_clip(32, 2, 4, 37, "quick_gelu", seed=20)
    ref_g = hf_clip(48, 2, 4, 64, "gelu", seed=21)
    cfg = hf_t5_config(relative_attention_num_buckets=32, relative_attention_max_distance=128)
    w = t5_weights(cfg, seed=22)
    combined = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}
    combined |= {CLIP_L_PREFIX + k: v for k, v in ref_l.state_dict().items()}  # projection ignored (identity)
    combined |= {CLIP_G_PREFIX + k: v for k, v in ref_g.state_dict().items()}
    combined |= {T5_PREFIX + k: v for k, v in w.items()}
    path = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    save_file(combined, str(path))

    ids = clip_ids(2, 100, seed=23)
    t5_ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        o_l = load_clip(path, activation="quick_gelu", num_heads=4, prefix=CLIP_L_PREFIX)(ids)
        o_g = load_clip(path, activation="gelu", num_heads=4, prefix=CLIP_G_PREFIX)(ids)
        o_t = load_t5(path, prefix=T5_PREFIX)(t5_ids)
        r_l = ref_l.text_model(ids, output_hidden_states=True)
        r_g = ref_g(ids, output_hidden_states=True)
        r_t = hf_t5(write_t5_folder(tmp_path / "ref", cfg, w))(t5_ids).last_hidden_state
    errs = {
        "clip_l": max(rel_err(o_l.pooled, r_l.pooler_output), rel_err(o_l.penultimate, r_l.hidden_states[-2])),
        "clip_g": max(rel_err(o_g.pooled, r_g.text_embeds), rel_err(o_g.penultimate, r_g.hidden_states[-2])),
        "t5": rel_err(o_t, r_t),
    }
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs
    with pytest.raises(CheckpointError, match="combined checkpoint.*text_encoders.clip_l.transformer."):
        load_clip(path, activation="quick_gelu")
    with pytest.raises(CheckpointError, match="text_encoders.t5xxl.transformer."):
        load_t5(path)


def test_diffusers_folders_and_config_json(tmp_path, record_property):
    """text_encoder/ (+config.json: heads, act, eos), text_encoder_3/ sharded with an index."""
    ref = hf_clip(32, 2, 4, 37, "quick_gelu", eos_token_id=2, seed=30)  # random projection: used as stored
    ref.save_pretrained(tmp_path / "text_encoder")
    got = read_text_encoder_json(tmp_path / "text_encoder")
    assert (got.num_heads, got.activation, got.eos_token_id) == (4, "quick_gelu", 2)
    ours = load_clip(tmp_path / "text_encoder", activation="quick_gelu")  # heads from config.json (32 // 64 = 0)
    ids = clip_ids(3, 100, seed=31)
    with torch.no_grad():
        r, o = ref(ids, output_hidden_states=True), ours(ids)
    errs = {"clip": max(rel_err(o.pooled, r.text_embeds), rel_err(o.penultimate, r.hidden_states[-2]))}
    with pytest.raises(CheckpointError, match="hidden_act='quick_gelu'"):
        load_clip(tmp_path / "text_encoder", activation="gelu")

    cfg = hf_t5_config()
    w = t5_weights(cfg, seed=32)
    ref_t5 = hf_t5(write_t5_folder(tmp_path / "plain", cfg, w))
    ref_t5.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="20KB")
    assert (tmp_path / "text_encoder_3" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "text_encoder_3").glob("*.safetensors"))) > 1
    ours_t5 = load_t5(tmp_path / "text_encoder_3")
    t5_ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        errs["t5_sharded"] = rel_err(ours_t5(t5_ids), ref_t5(t5_ids).last_hidden_state)
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs
    with pytest.raises(CheckpointError, match="num_heads=2"):
        load_t5(tmp_path / "text_encoder_3", num_heads=2)


def test_key_maps():
    emb = torch.zeros(10, 8)
    clip = clip_state_dict({"embeddings.token_embedding.weight": emb, "final_layer_norm.weight": torch.ones(8)},
                           identity_projection=True)  # transformers >= 5.6 flattened CLIPTextModel names
    assert set(clip) == {"text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
                         "text_projection.weight"}
    with pytest.raises(CheckpointError, match="open_clip"):
        clip_state_dict({"transformer.resblocks.0.attn.in_proj_weight": emb}, identity_projection=True)
    t5 = t5_state_dict({"shared.weight": emb, "encoder.embed_tokens.weight": emb + 1, "decoder.block.0.x": emb,
                        "lm_head.weight": emb, "encoder.final_layer_norm.weight": emb[0]})
    assert set(t5) == {"shared.weight", "encoder.final_layer_norm.weight"} and torch.equal(t5["shared.weight"], emb)
    with pytest.raises(CheckpointError, match="v1.0"):
        t5_state_dict({"encoder.block.0.layer.1.DenseReluDense.wi.weight": emb})
    with pytest.raises(CheckpointError, match="scaled"):
        t5_state_dict({"encoder.block.0.layer.1.DenseReluDense.wo.scale_weight": emb[0, 0]})


# ----------------------------------------------------------------------------------- assembly vs diffusers


def clip_tokenizer(pad_token: str):
    """An in-memory byte-level BPE CLIP tokenizer (docs/numerics.md §6.3); specials are the two top ids (EOS = max)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token=pad_token,
    )


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["▁the", "▁cat", "▁of", "▁a", "t", "h", "e", "c", "a", "i", "n", "g", "s", "o", "f", "r", "!"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(p, -3.0) for p in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def sd3_pipeline(t5_width: int | None, joint_attention_dim: int, folder: Path):
    """A tiny StableDiffusion3Pipeline (CLIP-L 24 wide, CLIP-G 32 wide, optional T5), encoders saved to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    te = hf_clip(24, 3, 4, 40, "quick_gelu", vocab=521, seed=40)
    te2 = hf_clip(32, 3, 4, 48, "gelu", vocab=521, seed=41)
    te3 = None
    if t5_width is not None:
        cfg = hf_t5_config(vocab_size=40, d_model=t5_width, num_heads=4, d_kv=8)
        te3 = hf_t5(write_t5_folder(folder / "text_encoder_3", cfg, t5_weights(cfg, seed=42)))
    te.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=joint_attention_dim, pooled_projection_dim=56, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=te, tokenizer=clip_tokenizer("<|endoftext|>"), text_encoder_2=te2,
        tokenizer_2=clip_tokenizer("!"), text_encoder_3=te3, tokenizer_3=t5_tokenizer() if te3 is not None else None,
    )


@pytest.mark.parametrize(
    "t5_width,joint_dim",
    [(64, 64), (40, 40), (None, 64), (None, 40)],  # CLIP concat is 56: zero-pad to 64, crop to 40; no T5: zeros
)
def test_assembly_matches_diffusers_encode_prompt(t5_width, joint_dim, tmp_path, record_property):
    pipe = sd3_pipeline(t5_width, joint_dim, tmp_path)
    prompts, negatives = ["the cat of things!", "a thing!! of the cat " * 3], ["", "the cat"]
    n, t5_len = 2, 24
    with torch.no_grad():
        ref_pos, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"), num_images_per_prompt=n,
            do_classifier_free_guidance=True, negative_prompt=negatives, max_sequence_length=t5_len,
        )

    clip_l = load_clip(tmp_path / "text_encoder", activation="quick_gelu")
    clip_g = load_clip(tmp_path / "text_encoder_2", activation="gelu")
    t5 = load_t5(tmp_path / "text_encoder_3") if t5_width is not None else None

    def ours(texts: list[str]) -> Conditioning:
        def ids(tok, length):
            return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids

        with torch.no_grad():
            seq = t5(ids(pipe.tokenizer_3, t5_len)) if t5 is not None else None
            cond = assemble(
                clip_l(ids(pipe.tokenizer, 77)), clip_g(ids(pipe.tokenizer_2, 77)), seq,
                t5_length=t5_len, context_dim=joint_dim,
            )
        return repeat_for_images(cond, n)

    pos, neg = ours(prompts), ours(negatives)
    assert pos.context.shape == ref_pos.shape == (len(prompts) * n, 77 + t5_len, joint_dim)
    assert pos.pooled.shape == ref_pooled.shape == (len(prompts) * n, 24 + 32)
    errs = {
        "context": rel_err(pos.context, ref_pos),
        "pooled": rel_err(pos.pooled, ref_pooled),
        "neg_context": rel_err(neg.context, ref_neg),
        "neg_pooled": rel_err(neg.pooled, ref_neg_pooled),
    }
    record_property("rel_err", errs)
    assert max(errs.values()) < 1e-5, errs
    if t5_width is None:
        assert torch.count_nonzero(pos.context[:, 77:]) == 0
    if joint_dim > 56:
        assert torch.count_nonzero(pos.context[:, :77, 56:]) == 0


def test_assemble_dtypes_and_checks():
    """CLIP-G and the zeros follow CLIP-L's dtype; pooled and T5 keep theirs and are promoted by torch.cat."""
    g = torch.Generator().manual_seed(50)
    l_out = CLIPOutput(torch.randn(2, 77, 8, generator=g).half(), torch.randn(2, 8, generator=g).half())
    g_out = CLIPOutput(torch.randn(2, 77, 12, generator=g), torch.randn(2, 12, generator=g))
    c = assemble(l_out, g_out, None, t5_length=5, context_dim=32)
    assert c.context.dtype == F16 and c.context.shape == (2, 82, 32) and c.pooled.dtype == torch.float32
    assert torch.equal(c.context[:, :77, 8:20], g_out.penultimate.half()) and torch.equal(c.pooled[:, 8:], g_out.pooled)
    c32 = assemble(l_out, g_out, torch.randn(2, 5, 32, generator=g), t5_length=5, context_dim=32)
    assert c32.context.dtype == torch.float32  # float16 CLIP + float32 T5, as diffusers' torch.cat gives
    with pytest.raises(ValueError, match="t5_length"):
        assemble(l_out, g_out, torch.randn(2, 6, 32), t5_length=5, context_dim=32)
    rep = repeat_for_images(c, 3)
    assert rep.context.shape[0] == 6 and torch.equal(rep.context[3], c.context[1])
    assert torch.equal(rep.pooled[2], c.pooled[0])


def test_clip_width_not_multiple_of_64_says_what_to_do(tmp_path):
    """A single-file CLIP whose heads cannot be inferred names the config file that would fix it, and a
    transformers config beside the file (<name>.json) then supplies the head count."""
    import json

    ref = hf_clip(48, 2, 3, 64, "gelu", proj=40, seed=21)
    path = tmp_path / "clip_g.safetensors"
    save_file(dict(ref.state_dict()), str(path))
    with pytest.raises(CheckpointError, match=r"multiple of 64.*num_attention_heads.*clip_g\.json"):
        load_clip(path, activation="gelu")
    (tmp_path / "clip_g.json").write_text(json.dumps({"num_attention_heads": 3, "hidden_act": "gelu"}))
    ours = load_clip(path, activation="gelu")
    ids = clip_ids(2, 100, seed=22)
    with torch.no_grad():
        assert torch.equal(ours(ids).pooled, ref(ids).text_embeds)
