"""float8 weights: the FP8Linear layer, quantising while loading, ComfyUI's scaled-fp8 files, memory.

The central check (`test_mmdit_fp8_equals_diffusers_on_dequantized_weights`): our float8 MM-DiT equals diffusers'
`SD3Transformer2DModel` loaded with the float8 weights dequantised, in float32 (1e-5 of the output scale) and in
bfloat16 (the tolerance of the bfloat16 parity tests), so the only difference float8 makes is the rounding of the
weights. That rounding's effect on the outputs is recorded per model (`quant_error`);
scripts/bench/fp8_error.py reports it for the real-width models too.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loaders.builtin import MODEL_DIR
from loaders.checkpoint import load_transformer, locate
from loaders.fp8 import UnsupportedQuantization
from loaders.pipeline import Pipeline
from loaders.safetensors import CheckpointError
from loaders.text import find_text_files
from loaders.text_encoders import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, load_clip, load_t5
from loaders.transformer_keys import transformer_from_diffusers, transformer_to_diffusers
from mmdit.attention import linear_rows
from mmdit.errors import InputError
from mmdit.fp8 import FP8Linear, FP8Spec, compute_dtype, dequantize, quantize
from mmdit.model import MMDiT, MMDiTConfig
from tests._fixtures import TINY, diffusers_transformer
from tests.random_weights import random_tensor, randomize_
from tests.test_text_encoders import hf_t5, hf_t5_config, rel_err, t5_weights, write_t5_folder
from tests.test_transformer import inputs, run_ref

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PEAK_PROBE = os.access("/proc/self/clear_refs", os.W_OK)  # Linux: resets the peak resident size


# ------------------------------------------------------------------------------------------------ helpers


def linear_weights(model: nn.Module) -> list[str]:
    """The `<layer>.weight` keys of a model's linear layers (what ComfyUI's files store in float8)."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]


def mmdit_linears(stability_sd: dict[str, Tensor]) -> list[str]:
    with torch.device("meta"):
        return linear_weights(MMDiT(MMDiTConfig.from_state_dict(stability_sd)))


T5_LINEARS = (".SelfAttention.q.weight", ".SelfAttention.k.weight", ".SelfAttention.v.weight",
              ".SelfAttention.o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def comfy_quantize(w: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """ComfyUI's rule (`comfy.quant_ops.TensorCoreFP8Layout.quantize`): scale = max|w| / finfo.max, weight times
    the reciprocal, cast. Written here on its own, so that files do not come from the code under test."""
    scale = w.float().abs().amax() / torch.finfo(dtype).max
    return (w.float() * (1.0 / scale)).to(dtype), scale.to(torch.float32)


def comfy_file(tensors: dict[str, Tensor], prefix: str, linears: list[str], *, style: str = "scaled_fp8",
               dtype: torch.dtype = E4M3) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str] | None]:
    """`tensors` (keys without `prefix`) as ComfyUI writes float8 checkpoints, and the same weights dequantised.

    style "scaled_fp8": `<prefix>scaled_fp8` marker (empty, in the float8 dtype) + `<layer>.scale_weight`;
    "comfy_quant": `<layer>.comfy_quant` JSON tensors + `<layer>.weight_scale` (+ a unit `input_scale`);
    "metadata": `<layer>.weight_scale`, the formats in the `_quantization_metadata` header entry.
    Returns (file tensors with prefix, dequantised float32 tensors without prefix, header metadata).
    """
    out, plain, layers = {}, {}, {}
    for k, v in tensors.items():
        if k in linears:
            q, s = comfy_quantize(v, dtype)
            layer = k.removesuffix(".weight")
            out[prefix + k] = q
            plain[k] = q.float() * s
            if style == "scaled_fp8":
                out[f"{prefix}{layer}.scale_weight"] = s
            else:
                out[f"{prefix}{layer}.weight_scale"] = s
                conf = {"format": str(dtype).removeprefix("torch."), "full_precision_matrix_mult": True}
                if style == "comfy_quant":
                    as_bytes = list(json.dumps(conf).encode())
                    out[f"{prefix}{layer}.comfy_quant"] = torch.tensor(as_bytes, dtype=torch.uint8)
                    out[f"{prefix}{layer}.input_scale"] = torch.tensor(1.0)  # dropped, as ComfyUI drops it
                layers[prefix + layer] = conf
        else:
            out[prefix + k] = v
            plain[k] = v.float()
    if style == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=dtype)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if style == "metadata" else None
    return out, plain, metadata


def save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def dequantized_state(model: nn.Module) -> dict[str, Tensor]:
    """A float8 model's state with every FP8Linear's weight dequantised to float32 (scales dropped)."""
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight_scale"):
            continue
        layer = model.get_submodule(name.rpartition(".")[0])
        if isinstance(layer, FP8Linear) and name.endswith(".weight"):
            t = dequantize(layer.weight, layer.weight_scale, torch.float32)
        sd[name] = t.float()
    return sd


def scaled_err(a: Tensor, b: Tensor) -> float:
    """max|a − b| relative to b's scale (max |b|)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_rounds_each_weight_to_its_nearest_float8(per_channel, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different sizes
    w[3] = 0  # an all-zero row
    q, scale = quantize(w, per_channel=per_channel, dtype=dtype)
    assert q.dtype == dtype and scale.dtype == torch.float32
    assert scale.shape == ((16, 1) if per_channel else ())
    top = torch.finfo(dtype).max
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    if per_channel:
        assert scale[3].item() == 1.0 and (q[3].float() == 0).all()  # zero row: scale 1, no NaN
    else:
        assert torch.equal(scale, amax / top)
    deq = dequantize(q, scale, torch.float32)
    assert torch.isfinite(deq).all()
    # the largest weight (of the tensor, or of each non-zero row) maps onto the largest float8 value
    if per_channel:
        assert (q.float().abs().amax(dim=1)[amax.flatten() > 0] == top).all()
    else:
        assert q.float().abs().max() == top
    # each weight is the float8 value nearest to w / scale: no representable value lies closer
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    codes = codes[torch.isfinite(codes)]
    scaled = w / scale
    nearest = (scaled[..., None] - codes).abs().amin(-1)
    assert torch.allclose((scaled - q.float()).abs(), nearest, rtol=0, atol=1e-6 * top)
    mantissa = 3 if dtype == E4M3 else 2
    normal = scaled.abs() >= torch.finfo(dtype).smallest_normal
    assert ((deq - w).abs()[normal] <= 2.0 ** -(mantissa + 1) * w.abs()[normal] * (1 + 1e-6)).all()


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_dequantize_is_the_float32_product_rounded_once(fp8):
    """`dequantize` to a 16-bit dtype on the CPU skips the float32 copy; its numbers must be those of the
    general formula, every float8 code under many scales (small and large tensors take different kernels)."""
    g = torch.Generator().manual_seed(2)
    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    codes = codes[torch.isfinite(codes.float())]
    q = codes[torch.randint(0, len(codes), (1 << 20,), generator=g)]
    for s in [1.0, 2.0**-20, 1e-7, 3.7e-3, 123.456, *torch.rand(8, generator=g).mul(10).tolist()]:
        scale = torch.tensor(s, dtype=torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            for n in (7, 1 << 20):
                expected = (q[:n].to(torch.float32) * scale).to(dtype)
                assert torch.equal(dequantize(q[:n], scale, dtype).view(torch.int16), expected.view(torch.int16))


def test_fp8_linear_is_a_linear_layer_with_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(3, 5, 16, generator=g)
    q, scale = quantize(w)
    for dtype in (torch.float32, torch.bfloat16):
        layer = FP8Linear(16, 24, spec=FP8Spec(dtype))
        layer.weight.data, layer.weight_scale.data, layer.bias.data = q, scale, b.to(dtype)
        plain = nn.Linear(16, 24, dtype=dtype)
        plain.weight.data, plain.bias.data = dequantize(q, scale, dtype), b.to(dtype)
        xd = x.to(dtype)
        assert torch.equal(layer(xd), plain(xd))  # the same numbers as an nn.Linear, bit for bit
        assert torch.equal(linear_rows(layer, xd, 8), linear_rows(plain, xd, 8))
        if dtype == torch.float32:
            assert torch.allclose(linear_rows(plain, xd, 8), plain(xd)[..., 8:], atol=1e-5)
        assert compute_dtype(layer) == compute_dtype(plain) == dtype
    assert "float8_e4m3fn (scale per tensor)" in repr(layer)
    with pytest.raises(ValueError, match="float8 e4m3fn or e5m2"):
        FP8Linear(2, 2, spec=FP8Spec(torch.float32, weight_dtype=torch.float16))


# ------------------------------------------------------------------------- MM-DiT vs diffusers (item 6)


def stability_file(ref, path: Path, dtype=torch.float32) -> Path:
    sd = {f"model.diffusion_model.{k}": v.to(dtype) for k, v in transformer_from_diffusers(ref.state_dict()).items()}
    return save(path, sd)


@pytest.mark.parametrize("variant", list(TINY))
def test_mmdit_fp8_equals_diffusers_on_dequantized_weights(variant, tmp_path, record_property):
    ref = diffusers_transformer(variant)
    path = stability_file(ref, tmp_path / "model.safetensors")
    ours = load_transformer(locate(path), weights="fp8")  # quantised from float32 while loading
    assert all(isinstance(ours.get_submodule(k.removesuffix(".weight")), FP8Linear) for k in linear_weights(ours))
    assert ours.joint_blocks[0].x_block.attn.qkv.weight.dtype == E4M3
    # diffusers with the very weights our float8 model computes with
    deq = copy.deepcopy(ref)
    deq.load_state_dict(transformer_to_diffusers(dequantized_state(ours)))
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        truth = run_ref(deq, x, t, ctx, pooled)
        scale = truth.abs().max()
        assert scaled_err(ours(x, t, ctx, pooled), truth) <= 1e-5
        # bfloat16: the same float8 weights (quantised from the same file), computed in bfloat16 by both engines
        ours16 = load_transformer(locate(path), dtype=torch.bfloat16, weights="fp8")
        assert torch.equal(ours16.final_layer.linear.weight, ours.final_layer.linear.weight)
        b16 = ours16(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16()).float()
        a16 = run_ref(deq.to(torch.bfloat16), x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16()).float()
        err_ours, err_ref = (b16 - truth).abs().max(), (a16 - truth).abs().max()
        assert torch.isfinite(b16).all()
        assert err_ours <= 1.5 * err_ref + 1e-3 * scale, (err_ours, err_ref)
        # what float8 costs: our float8 model against the full-precision model
        full = run_ref(ref, x, t, ctx, pooled)
        quant_error = scaled_err(ours(x, t, ctx, pooled), full)
    record_property("quant_error", quant_error)
    assert 1e-4 < quant_error < 0.2  # the weights really were rounded, and the model still computes the same thing


def test_mmdit_fp8_real_width_bf16_equals_diffusers_on_dequantized_weights(tmp_path, record_property):
    """SD3.5-Large's width (2432 = 38 heads of 64), one block (the last kind: the text tokens only give keys and
    values, through `linear_rows`), a bfloat16 file quantised while loading, computed in bfloat16; diffusers gets
    the dequantised weights without a random initialisation of its own. (scripts/bench/fp8_error.py: two blocks.)"""
    from diffusers import SD3Transformer2DModel

    cfg = MMDiTConfig(depth=1, num_heads=38, head_dim=64, pos_embed_max_size=24)
    with torch.device("meta"):
        model = MMDiT(cfg)
    model = randomize_(model.to_empty(device="cpu"), torch.Generator().manual_seed(50))
    model.pos_embed.normal_(generator=torch.Generator().manual_seed(51))
    path = save(tmp_path / "large.safetensors",
                {f"model.diffusion_model.{k}": v.bfloat16() for k, v in model.state_dict().items()})
    full_bf16 = {k: v.bfloat16().float() for k, v in model.state_dict().items()}  # what the file holds
    del model
    ours = load_transformer(locate(path), dtype=torch.bfloat16, weights="fp8")
    with torch.device("meta"):
        ref = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                    num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432,
                                    joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=24,
                                    qk_norm="rms_norm", dual_attention_layers=())
    ref.load_state_dict(transformer_to_diffusers(dequantized_state(ours)), assign=True)
    ref.eval()
    x, t, ctx, pooled = inputs(latent=(16, 12), tokens=21, context_dim=4096, pooled_dim=2048)
    with torch.no_grad():
        truth = run_ref(ref, x, t, ctx, pooled)
        b16 = ours(x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16()).float()
        a16 = run_ref(ref.to(torch.bfloat16), x.bfloat16(), t, ctx.bfloat16(), pooled.bfloat16()).float()
        ref.load_state_dict(transformer_to_diffusers(full_bf16), assign=True)  # the file's own 16-bit weights
        full = run_ref(ref.float(), x, t, ctx, pooled)
    scale = truth.abs().max()
    err_ours, err_ref = (b16 - truth).abs().max(), (a16 - truth).abs().max()
    assert torch.isfinite(b16).all()
    assert err_ours <= 1.5 * err_ref + 1e-3 * scale, (err_ours, err_ref)
    quant_error = scaled_err(truth, full)
    record_property("quant_error", quant_error)
    assert 1e-3 < quant_error < 0.2


def test_diffusers_folder_quantizes_to_the_same_float8_model(tmp_path):
    """The diffusers layout is read one tensor group at a time (q, k, v joined): the same model as the single file."""
    ref = diffusers_transformer("sd3.5-medium")
    (tmp_path / "pipe").mkdir()
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="50KB")  # sharded
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1
    a = load_transformer(locate(tmp_path / "pipe"), weights="fp8").state_dict()
    b = load_transformer(locate(stability_file(ref, tmp_path / "single.safetensors")), weights="fp8").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["joint_blocks.2.context_block.attn.qkv.weight"].dtype == E4M3


# ----------------------------------------------------------------------------------------------- T5


def t5_linears(sd: dict[str, Tensor]) -> list[str]:
    return [k for k in sd if k.endswith(T5_LINEARS)]


def test_t5_fp8_equals_transformers_on_dequantized_weights(tmp_path, record_property):
    cfg = hf_t5_config(relative_attention_num_buckets=32, relative_attention_max_distance=128, d_model=64, d_kv=16,
                       d_ff=96)
    w = t5_weights(cfg, seed=40)
    path = save(tmp_path / "t5xxl_fp16.safetensors", {k: v.half() for k, v in w.items()})
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(41))
    ours = load_t5(path, weights="fp8")
    assert isinstance(ours.encoder.block[1].layer[1].DenseReluDense.wo, FP8Linear)
    deq = dequantized_state(ours)
    ref = hf_t5(write_t5_folder(tmp_path / "deq", cfg, deq))
    with torch.no_grad():
        truth = ref(ids).last_hidden_state
        errs = {"fp32": rel_err(ours(ids), truth)}
        # bfloat16 and float16 (wo computing in float32, as transformers keeps wo in float32) against float32
        for dtype in (torch.bfloat16, torch.float16):
            ours_d = load_t5(path, weights="fp8", dtype=dtype)
            wo = ours_d.encoder.block[0].layer[1].DenseReluDense.wo
            assert compute_dtype(wo) == (torch.float32 if dtype == torch.float16 else dtype)
            err_ours = rel_err(ours_d(ids).float(), truth)
            err_ref = rel_err(hf_t5(write_t5_folder(tmp_path / f"deq_{dtype}", cfg, deq), dtype)(ids)
                              .last_hidden_state.float(), truth)
            assert err_ours <= 1.5 * err_ref + 1e-3, (dtype, err_ours, err_ref)
        full = hf_t5(write_t5_folder(tmp_path / "full", cfg, {k: v.half().float() for k, v in w.items()}))
        record_property("quant_error", rel_err(ours(ids), full(ids).last_hidden_state))
    record_property("rel_err", errs)
    assert errs["fp32"] < 1e-5, errs


def test_comfy_t5_scaled_file_loads_directly(tmp_path):
    """`t5xxl_fp8_e4m3fn_scaled.safetensors`: marker `scaled_fp8` at the top, `scale_weight` per linear layer;
    found in text_encoders/ and read with either weights setting."""
    cfg = hf_t5_config(relative_attention_num_buckets=32, relative_attention_max_distance=128)
    w = t5_weights(cfg, seed=42)
    tensors, plain, _ = comfy_file({k: v.half() for k, v in w.items()}, "", t5_linears(w))
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    path = save(folder / "t5xxl_fp8_e4m3fn_scaled.safetensors", tensors)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(43))
    with torch.no_grad():
        truth = hf_t5(write_t5_folder(tmp_path / "plain", cfg, plain))(ids).last_hidden_state
        full, fp8 = load_t5(path)(ids), load_t5(path, weights="fp8")(ids)
    assert rel_err(full, truth) < 1e-5
    assert torch.equal(full, fp8)  # dequantised on load, or at each matrix product: the same numbers
    # the standalone file is found beside a single-file model
    for name in ("clip_l", "clip_g"):
        save(folder / f"{name}.safetensors", {"x": torch.zeros(1)})
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp_path / name).mkdir()
    model = save(tmp_path / "model.safetensors", {"model.diffusion_model.x": torch.zeros(1)})
    assert find_text_files(model).t5.path == path


# --------------------------------------------------------------------- ComfyUI's all-in-one checkpoint


def builtin_all_in_one(tmp_path: Path) -> tuple[Path, Path]:
    """The built-in model's weights as `sd3.5_large_fp8_scaled.safetensors` (MM-DiT and T5 scaled float8, VAE and
    CLIPs 16-bit, encoders under `text_encoders.*.transformer.`), and the same dequantised in a plain file."""
    single = load_file(str(MODEL_DIR / "sd3.5_tiny.safetensors"))
    prefix = "model.diffusion_model."
    dit = {k.removeprefix(prefix): v for k, v in single.items() if k.startswith(prefix)}
    dit_file, dit_plain, _ = comfy_file(dit, prefix, mmdit_linears(dit))
    t5 = load_file(str(MODEL_DIR / "text_encoders" / "t5xxl_fp16.safetensors"))
    t5_file, t5_plain, _ = comfy_file(t5, T5_PREFIX, t5_linears(t5))
    rest = {k: v for k, v in single.items() if not k.startswith(prefix)}  # the VAE
    for name, p in (("clip_l", CLIP_L_PREFIX), ("clip_g", CLIP_G_PREFIX)):
        rest |= {p + k: v for k, v in load_file(str(MODEL_DIR / "text_encoders" / f"{name}.safetensors")).items()}
    (tmp_path / "comfy").mkdir()
    (tmp_path / "plain").mkdir()
    comfy = save(tmp_path / "comfy" / "sd3.5_large_fp8_scaled.safetensors", rest | dit_file | t5_file)
    plain = save(tmp_path / "plain" / "sd3.5_large_dequantized.safetensors",
                 rest | {prefix + k: v for k, v in dit_plain.items()} | {T5_PREFIX + k: v for k, v in t5_plain.items()})
    return comfy, plain


def test_comfy_all_in_one_checkpoint(tmp_path):
    comfy, plain = builtin_all_in_one(tmp_path)
    call = dict(seed=5, steps=1, height=128, width=128, max_sequence_length=16)
    runs = {}
    for name, path, weights in (("plain", plain, "full"), ("comfy", comfy, "full"), ("comfy fp8", comfy, "fp8")):
        pipe = Pipeline.load(path, tokenizers=MODEL_DIR, weights=weights, device="cpu")
        assert pipe.files.t5.prefix == T5_PREFIX  # the encoders come from inside the file
        runs[name] = pipe("a red circle", **call)
    # the float8 file dequantised on load gives what the dequantised weights give; float8 in memory too
    assert torch.equal(runs["comfy"].latents, runs["plain"].latents)
    assert torch.equal(runs["comfy fp8"].latents, runs["plain"].latents)
    assert runs["comfy fp8"].record["weights"] == "fp8" and "weights" not in runs["comfy"].record
    model = load_transformer(locate(comfy), weights="fp8")
    assert model.joint_blocks[0].x_block.mlp.fc1.weight.dtype == E4M3  # kept as stored: no second rounding
    # and the float8 weights really differ from the 16-bit built-in ones they were made from
    fc1 = "joint_blocks.0.x_block.mlp.fc1.weight"
    original = load_file(str(MODEL_DIR / "sd3.5_tiny.safetensors"))["model.diffusion_model." + fc1].float()
    assert 1e-3 < rel_err(load_file(str(plain))["model.diffusion_model." + fc1], original) < 0.1


@pytest.mark.parametrize("style, dtype", [("comfy_quant", E4M3), ("metadata", E4M3), ("scaled_fp8", E5M2)])
def test_newer_comfy_formats_and_e5m2(style, dtype, tmp_path):
    """Per-layer `comfy_quant` JSON tensors, or the `_quantization_metadata` header, with `weight_scale`; e5m2."""
    ref = diffusers_transformer("sd3.5-large")
    sd = transformer_from_diffusers(ref.state_dict())
    prefix = "model.diffusion_model."
    tensors, plain, metadata = comfy_file(sd, prefix, mmdit_linears(sd), style=style, dtype=dtype)
    quant = save(tmp_path / "quant.safetensors", tensors, metadata)
    plain = save(tmp_path / "plain.safetensors", {prefix + k: v for k, v in plain.items()})
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        expected = load_transformer(locate(plain))(x, t, ctx, pooled)
        for weights in ("full", "fp8"):
            model = load_transformer(locate(quant), weights=weights)
            assert torch.equal(model(x, t, ctx, pooled), expected), weights
    assert model.joint_blocks[1].x_block.attn.qkv.weight.dtype == dtype


def unsupported_cases() -> dict[str, tuple]:
    """name -> (edit of a scaled_fp8 file's tensors, metadata, what the message must say)."""
    p = "model.diffusion_model."
    layer = p + "joint_blocks.0.x_block.attn.qkv"

    def conf(fmt):
        return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)

    return {
        "input scale": (lambda t: t.update({layer + ".scale_input": torch.tensor(0.5)}), None, r"scale_input.*input"),
        "nvfp4 comfy_quant": (lambda t: t.update({layer + ".comfy_quant": conf("nvfp4")}), None, "'nvfp4'"),
        "nvfp4 scales": (lambda t: t.update({layer + ".weight_scale_2": torch.tensor(1.0)}), None, "nvfp4"),
        "int8 in the header": (lambda t: None, {"_quantization_metadata": json.dumps(
            {"layers": {layer: {"format": "int8_tensorwise"}}})}, "int8_tensorwise"),
        "float16 marker": (lambda t: t.update({p + "scaled_fp8": torch.empty(0, dtype=torch.float16)}), None,
                           "marker says torch.float16"),
        "scale shape": (lambda t: t.update({layer + ".scale_weight": torch.ones(5)}), None, "neither per tensor"),
    }


@pytest.mark.parametrize("case", list(unsupported_cases()))
def test_unsupported_float8_files_say_what_they_hold(case, tmp_path):
    edit, metadata, message = unsupported_cases()[case]
    ref = diffusers_transformer("sd3.5-large")
    sd = transformer_from_diffusers(ref.state_dict())
    tensors, _, _ = comfy_file(sd, "model.diffusion_model.", mmdit_linears(sd))
    edit(tensors)
    path = save(tmp_path / "odd.safetensors", tensors, metadata)
    for weights in ("full", "fp8"):
        with pytest.raises(UnsupportedQuantization, match=message) as caught:
            load_transformer(locate(path), weights=weights)
        assert isinstance(caught.value, InputError) and "supported:" in str(caught.value)


def test_scaled_clip_and_bad_weights_setting_are_input_errors(tmp_path):
    clip = load_file(str(MODEL_DIR / "text_encoders" / "clip_l.safetensors"))
    linears = [k for k in clip if k.endswith(("proj.weight", "fc1.weight", "fc2.weight"))]
    tensors, _, _ = comfy_file(clip, "", linears)
    path = save(tmp_path / "clip_l.safetensors", tensors)
    with pytest.raises(UnsupportedQuantization, match="CLIP.*scaled float8.*MM-DiT and T5"):
        load_clip(path, activation="quick_gelu")
    with pytest.raises(InputError, match="'fp16' is not one of \\['full', 'fp8'\\]"):
        Pipeline.load(None, weights="fp16")
    with pytest.raises(InputError, match="not one of"):
        load_transformer(locate(MODEL_DIR / "sd3.5_tiny.safetensors"), weights="int8")


def test_scale_without_weight_is_named(tmp_path):
    ref = diffusers_transformer("sd3.5-large")
    sd = {f"model.diffusion_model.{k}": v for k, v in transformer_from_diffusers(ref.state_dict()).items()}
    sd["model.diffusion_model.joint_blocks.0.nothing.scale_weight"] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match="scale joint_blocks.0.nothing.scale_weight has no weight"):
        load_transformer(locate(save(tmp_path / "x.safetensors", sd)))


# -------------------------------------------------------------------------------------- the CLI, memory


def test_cli_weights_fp8(tmp_path):
    from PIL import Image

    from scripts.generate import main as generate

    out = tmp_path / "fp8.png"
    assert generate(["--prompt", "a red circle", "--weights", "fp8", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    record = json.loads(Image.open(out).text["sd3_minimal"])
    assert record["weights"] == "fp8"
    with pytest.raises(SystemExit):
        generate(["--prompt", "x", "--weights", "fp16"])


def test_quantizing_while_loading_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Every full-precision weight read from the file is dropped (quantised) before the next one is read: at
    most one is alive at a time, or the three parts of a diffusers q/k/v."""
    import weakref

    from loaders.safetensors import TensorReader

    live, peak = [0], [0]
    read = TensorReader.read

    def counting(self, key):
        t = read(self, key)
        if key.endswith(".weight") and t.ndim == 2 and t.dtype not in (E4M3, E5M2):  # a linear weight to quantise
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(TensorReader, "read", counting)
    ref = diffusers_transformer("sd3.5-medium")
    model = load_transformer(locate(stability_file(ref, tmp_path / "m.safetensors", torch.bfloat16)), weights="fp8")
    assert peak[0] == 1 and live[0] == 0 and isinstance(model.context_embedder, FP8Linear)
    (tmp_path / "pipe").mkdir()
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    peak[0] = 0
    load_transformer(locate(tmp_path / "pipe"), weights="fp8")
    assert peak[0] == 3 and live[0] == 0


LOAD_PEAK = """
import json, sys, torch
from pathlib import Path
from loaders.checkpoint import load_transformer, locate
def status(field):
    return next(int(x.split()[1]) * 1024 for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from here
before = status("VmRSS")
model = load_transformer(locate(sys.argv[1]), dtype=torch.bfloat16, weights=sys.argv[2])
print(json.dumps({"extra": status("VmHWM") - before,
                  "weights": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])}))
"""


@pytest.mark.skipif(not PEAK_PROBE, reason="/proc/self/clear_refs is not writable here")
def test_quantizing_while_loading_needs_no_full_precision_copy(tmp_path):
    """A float32 file loaded as float8, in a fresh process: the peak memory of loading stays near the float8
    model's size, far below the file's (which reading the checkpoint whole would need first). The same file
    loaded as bfloat16 by the ordinary loader shows that the probe does see a whole-file read."""
    import subprocess
    import sys

    cfg = MMDiTConfig(depth=16, num_heads=4, head_dim=64, pos_embed_max_size=32)  # 38 M weights, none over 1 M
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMDiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    path = save(tmp_path / "f32.safetensors",
                {f"model.diffusion_model.{k}": random_tensor(k, s, g).float() for k, s in shapes.items()})
    file_bytes = path.stat().st_size

    def peak(weights):
        # A fixed mmap threshold makes glibc hand every block over 128 kB back when it is freed, so the peak is
        # what the loader holds, not what the allocator happened to keep cached (its default adapts, and varies).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path), weights], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, env=env, check=True)
        return json.loads(out.stdout)

    fp8, full = peak("fp8"), peak("full")
    assert fp8["weights"] < 0.3 * file_bytes
    assert fp8["extra"] < fp8["weights"] + 0.2 * file_bytes, (fp8, file_bytes)
    assert full["extra"] > file_bytes, (full, file_bytes)


def test_memory_bench_tiny(tmp_path, capsys):
    from scripts.bench.memory_bench import main

    report = tmp_path / "bench.json"
    args = ["--blocks", "1", "--width", "128", "--size", "128", "--warmup", "0", "--work", str(tmp_path),
            "--json", str(report), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| bf16 |" in printed and "| fp8 |" in printed and "fp8 output vs bf16" in printed
    got = json.loads(report.read_text())
    bf16, fp8 = got["results"]["bf16"], got["results"]["fp8"]
    assert fp8["weight_bytes"] < bf16["weight_bytes"]
    assert bf16["peak_rss_bytes"] > bf16["baseline_kb"] * 1024 and fp8["step_s"] > 0
    assert fp8["baseline_kb"] <= fp8["load_peak_kb"] and fp8["load_peak_kb"] * 1024 <= fp8["peak_rss_bytes"]
    assert 1e-4 < got["fp8_vs_bf16"]["rms_diff_over_rms"] < 0.2
    # a second run reuses the weights file
    mtime = Path(got["file"]).stat().st_mtime_ns
    assert main(args) == 0 and Path(got["file"]).stat().st_mtime_ns == mtime
