"""LoRA: each format merged as diffusers' `load_lora_weights` + `fuse_lora` merges it, and every bad input refused.

Random LoRAs are written for a tiny SD3.5-Medium-shaped model (dual attention in blocks 0-1, a pre-only last
block: every kind of layer there is, the fused qkv, and both (scale, shift) layers) in each format. Formats
diffusers reads are compared with diffusers; kohya and ComfyUI files (which diffusers does not read for SD3) with
an independent merge in plain torch, converted by diffusers' own single-file converter and run in diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loaders.checkpoint import load_transformer, locate
from loaders.lora import (LoRA, LoRAFormatError, LoRAMismatchError, NotForSD3Error, merge_loras, read_lora,
                          unmerge_loras)
from loaders.pipeline import Pipeline
from loaders.transformer_keys import transformer_from_diffusers
from mmdit.errors import InputError
from tests._fixtures import diffusers_transformer, diffusers_vae, write_single_file
from tests.test_transformer import inputs, run_ref

VARIANT = "sd3.5-medium"


@pytest.fixture(scope="module")
def ref():
    return diffusers_transformer(VARIANT)


@pytest.fixture(scope="module")
def model_file(ref, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora_model") / "sd3.5_tiny.safetensors"
    write_single_file(path, ref.state_dict(), diffusers_vae().state_dict())
    return path


def layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def factors(shape: tuple[int, ...], rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for a weight of `shape`: a linear's (out, in) or a convolution's (out, in, kh, kw), sized so that
    the update is of the order of the weights (a wrong row block or swap shows as a large difference)."""
    fan_in = int(torch.tensor(shape[1:]).prod())
    down = torch.randn(rank, *shape[1:], generator=g) / fan_in**0.5
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.3
    return up, down


def peft_lora(ref, seed: int, names=None, ranks=(2, 3), prefix="transformer."):
    """A random LoRA in the diffusers / PEFT format for `ref`'s layers (all, or `names`); rank cycles `ranks`."""
    g = torch.Generator().manual_seed(seed)
    sd, rank_of = {}, {}
    for i, (name, m) in enumerate(layers(ref).items()):
        if names is not None and name not in names:
            continue
        rank_of[name] = ranks[i % len(ranks)]
        up, down = factors(tuple(m.weight.shape), rank_of[name], g)
        sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = down, up
    return sd, rank_of


def peft_metadata(rank_of: dict[str, int], alpha: float, alpha_pattern: dict[str, float], prefix="transformer"):
    """diffusers' `lora_adapter_metadata`: a PEFT LoraConfig, every field under `<prefix>.`."""
    r = max(set(rank_of.values()), key=list(rank_of.values()).count)
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(rank_of),
              "rank_pattern": {f"^{k}": v for k, v in rank_of.items() if v != r},
              "alpha_pattern": {f"^{k}": v for k, v in alpha_pattern.items()}}
    return {"lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}


def write(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def diffusers_fused(ref, files: list[tuple[Path, float]]):
    """A copy of `ref` with `files` loaded by `StableDiffusion3Pipeline.load_lora_weights` (one adapter each),
    weighted by `set_adapters` and fused by `fuse_lora`: diffusers' merged model."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = copy.deepcopy(ref)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    names = []
    for i, (path, _) in enumerate(files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in files])
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()  # the fused weights stay; PEFT's wrappers go
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def outputs(ours, theirs):
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        return ours(x, t, ctx, pooled), run_ref(theirs, x, t, ctx, pooled)


# ------------------------------------------------------------------------- diffusers / PEFT, against diffusers


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on the second adapter
def test_peft_format_equals_diffusers_fuse_lora(ref, model_file, tmp_path):
    """Two LoRAs at once: one on every layer (mixed ranks; PEFT metadata with lora_alpha and an alpha_pattern),
    one on the fused-qkv row blocks and both (scale, shift) layers with two bias updates (no metadata: alpha =
    rank), at scales 0.7 and -1.3. Merged weights and outputs as diffusers'."""
    sd1, ranks1 = peft_lora(ref, 1)
    alpha_pattern = {"transformer_blocks.1.attn.to_k": 0.5, "norm_out.linear": 5.0}
    f1 = write(tmp_path / "all.safetensors", sd1, peft_metadata(ranks1, 4.0, alpha_pattern))
    few = ["transformer_blocks.0.attn.to_v", "transformer_blocks.2.attn.add_q_proj", "transformer_blocks.1.attn2.to_k",
           "transformer_blocks.2.norm1_context.linear", "norm_out.linear", "pos_embed.proj"]
    sd2, _ = peft_lora(ref, 2, few, ranks=(4,))
    for name in ("transformer_blocks.0.attn.to_v", "norm_out.linear"):  # PEFT lora_bias: a row block, a swap
        rows = sd2[f"transformer.{name}.lora_B.weight"].shape[0]
        sd2[f"transformer.{name}.lora_B.bias"] = torch.randn(rows, generator=torch.Generator().manual_seed(rows))
    f2 = write(tmp_path / "few.safetensors", sd2)
    theirs = diffusers_fused(ref, [(f1, 0.7), (f2, -1.3)])

    pipe = Pipeline.load(model_file, loras=[(f1, 0.7), LoRA(f2, -1.3)])
    ours = pipe.transformer()
    expected = transformer_from_diffusers(theirs.state_dict())
    merged = ours.state_dict()
    assert merged.keys() == expected.keys()
    worst = max(relative(merged[k], expected[k]) for k in merged)
    assert worst <= 1e-6, worst
    a, b = outputs(ours, theirs)
    assert relative(a, b) <= 1e-5, relative(a, b)
    base = run_ref(ref, *inputs()).detach()
    assert relative(base, b) > 0.05  # the LoRAs change the output a lot, so the comparison above means something
    assert pipe.loras[0].formats == ["diffusers/PEFT"] and pipe.loras[0].components == ["transformer"]


def test_diffusers_folder_and_other_diffusers_name_prefixes(ref, model_file, tmp_path):
    """The same LoRA under PEFT's `base_model.model.`, OneTrainer's `lora_transformer_` and SimpleTuner's
    `lycoris_` (ComfyUI's `model_lora_keys_unet` reads all three; alpha as `.alpha` tensors) merges bit for bit
    as the `transformer.` file with its metadata does, into a diffusers folder or the single file."""
    sd, ranks = peft_lora(ref, 3, ranks=(2,))
    plain = write(tmp_path / "plain.safetensors", sd, peft_metadata(ranks, 3.0, {}))
    folder = tmp_path / "pipe"
    ref.save_pretrained(folder / "transformer")
    want = Pipeline.load(folder, loras=[(plain, 0.5)]).transformer().state_dict()
    single = Pipeline.load(model_file, loras=[(plain, 0.5)]).transformer().state_dict()
    assert all(torch.equal(want[k], single[k]) for k in want)
    for prefix, underscored in [("base_model.model.", False), ("lora_transformer_", True), ("lycoris_", True)]:
        renamed = {}
        for key, t in sd.items():
            module, tensor = key.removeprefix("transformer.").rsplit(".lora_", 1)
            name = module.replace(".", "_") if underscored else module
            renamed[f"{prefix}{name}.lora_{tensor}"] = t
            renamed[f"{prefix}{name}.alpha"] = torch.tensor(3.0)
        f = write(tmp_path / f"{prefix.strip('._')}.safetensors", renamed)
        got = Pipeline.load(model_file, loras=[(f, 0.5)]).transformer().state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), prefix


# ----------------------------------------------------------------------- kohya and ComfyUI: Stability names


def stability_lora(seed: int, model_file: Path):
    """Random factors and per-module alphas for every layer of our model, in Stability names."""
    g = torch.Generator().manual_seed(seed)
    model = load_transformer(locate(model_file))
    out = {}
    for i, (name, m) in enumerate(layers(model).items()):
        rank = (2, 3, 4)[i % 3]
        up, down = factors(tuple(m.weight.shape), rank, g)
        out[name] = (up, down, float(rank) * (0.5 + i % 4 / 2))
    return out


def test_kohya_and_comfyui_formats(ref, model_file, tmp_path):
    """kohya (`lora_unet_…`, `.alpha`) and ComfyUI (`diffusion_model.…`) files of the same LoRA merge to the same
    weights, W + s·(alpha/r)·up@down computed here in float64 on the Stability state dict; that merged state dict,
    converted by diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers` and run in diffusers, gives our
    output."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    lora, scale = stability_lora(4, model_file), 0.8
    kohya, comfy = {}, {}
    for name, (up, down, alpha) in lora.items():
        k, c = "lora_unet_" + name.replace(".", "_"), "diffusion_model." + name
        kohya |= {f"{k}.lora_up.weight": up.half(), f"{k}.lora_down.weight": down.half(),
                  f"{k}.alpha": torch.tensor(alpha, dtype=torch.float16)}  # sd-scripts saves float16
        comfy |= {f"{c}.lora_up.weight": up, f"{c}.lora_down.weight": down, f"{c}.alpha": torch.tensor(alpha)}
    f_kohya, f_comfy = write(tmp_path / "kohya.safetensors", kohya), write(tmp_path / "comfy.safetensors", comfy)
    ours_k = Pipeline.load(model_file, loras=[(f_kohya, scale)]).transformer()
    ours_c = Pipeline.load(model_file, loras=[(f_comfy, scale)]).transformer()
    assert read_lora(f_kohya).formats == ["kohya"] and read_lora(f_comfy).formats == ["ComfyUI"]

    base = transformer_from_diffusers(ref.state_dict())
    for ours, half in [(ours_c, False), (ours_k, True)]:
        expected = {}
        for key, w in base.items():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in lora:
                up, down, alpha = lora[name]
                if half:
                    up, down = up.half(), down.half()
                delta = up.double().flatten(1) @ down.double().flatten(1)
                expected[key] = (w.double() + scale * alpha / down.shape[0] * delta.reshape(w.shape)).float()
            else:
                expected[key] = w
        merged = ours.state_dict()
        worst = max(relative(merged[k], expected[k]) for k in expected)
        assert worst <= 1e-6, worst
    theirs = diffusers_transformer(VARIANT)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in ours_c.state_dict().items()})
    theirs.load_state_dict(converted, strict=True)
    a, b = outputs(ours_c, theirs)
    assert relative(a, b) <= 1e-5
    assert relative(run_ref(ref, *inputs()).detach(), b) > 0.05


# ------------------------------------------------------------------------------- dtypes, removal, no-ops


def test_bfloat16_merges_in_float32_and_rounds_once(ref, model_file, tmp_path):
    sd, _ = peft_lora(ref, 5, ["transformer_blocks.0.attn.to_k", "proj_out"], ranks=(2,))
    f = write(tmp_path / "l.safetensors", sd)
    base = load_transformer(locate(model_file), dtype=torch.bfloat16).state_dict()
    merged = Pipeline.load(model_file, dtype=torch.bfloat16, loras=[(f, 0.9)]).transformer().state_dict()
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    up, down = sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"], sd[
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    want = base[qkv].float()
    n = want.shape[0] // 3
    want[n:2 * n] += (up @ down) * 0.9
    assert merged[qkv].dtype == torch.bfloat16 and torch.equal(merged[qkv], want.to(torch.bfloat16))
    proj = "joint_blocks.0.x_block.attn.proj.weight"
    assert torch.equal(merged[proj], base[proj])  # a layer the LoRA does not touch keeps its bits


def test_unmerge_and_scale_zero(ref, model_file, tmp_path):
    sd, _ = peft_lora(ref, 6)
    f = write(tmp_path / "l.safetensors", sd)
    base = load_transformer(locate(model_file))
    model = load_transformer(locate(model_file))
    updates = merge_loras(model, [read_lora((f, 1.5))])
    changed = model.state_dict()
    assert len(updates) == len(sd) // 2
    assert relative(changed["final_layer.linear.weight"], base.state_dict()["final_layer.linear.weight"]) > 0.01
    unmerge_loras(model, updates)
    for k, w in base.state_dict().items():  # float32: back to within rounding
        assert (model.state_dict()[k] - w).abs().max() <= 1e-6 * changed[k].abs().max(), k
    zero = Pipeline.load(model_file, loras=[(f, 0.0)]).transformer().state_dict()
    assert all(torch.equal(zero[k], w) for k, w in base.state_dict().items())  # scale 0: bit for bit


def test_float8_layers_are_requantised_and_offloaded_blocks_merge_in_place(ref, model_file, tmp_path):
    from mmdit.fp8 import FP8Linear, dequantize, quantize

    sd, _ = peft_lora(ref, 7, ["transformer_blocks.1.ff.net.2", "context_embedder"], ranks=(3,))
    f = write(tmp_path / "l.safetensors", sd)
    base = load_transformer(locate(model_file), weights="fp8")
    ours = Pipeline.load(model_file, weights="fp8", loras=[(f, 1.0)]).transformer()
    old, new = base.joint_blocks[1].x_block.mlp.fc2, ours.joint_blocks[1].x_block.mlp.fc2
    assert isinstance(new, FP8Linear)
    up, down = (sd[f"transformer.transformer_blocks.1.ff.net.2.lora_{x}.weight"] for x in "BA")
    q, s = quantize(dequantize(old.weight, old.weight_scale, torch.float32) + up @ down)
    assert torch.equal(new.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(new.weight_scale, s)
    streamed = Pipeline.load(model_file, offload="blocks", loras=[(f, 1.0)]).transformer()
    plain = Pipeline.load(model_file, loras=[(f, 1.0)]).transformer()
    assert all(torch.equal(a, b) for a, b in zip(streamed.state_dict().values(), plain.state_dict().values()))


# ------------------------------------------------------------------------------------------- bad input


def test_path_and_scale_spelling(tmp_path):
    assert LoRA.parse("a.safetensors") == LoRA(Path("a.safetensors"), 1.0)
    assert LoRA.parse("dir/a.safetensors:0.75") == LoRA(Path("dir/a.safetensors"), 0.75)
    assert LoRA.parse("a.safetensors:-1e-1").scale == -0.1
    assert LoRA.parse("C:\\loras\\a.safetensors") == LoRA(Path("C:\\loras\\a.safetensors"))
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert LoRA.parse(str(odd)).path == odd  # a colon in an existing file's name
    for bad, says in [("a.safetensors:", "nothing after ':'"), ("a.safetensors:strong", "'strong' after the last"),
                      (":0.5", "no path before"), ("a.safetensors:nan", "not a finite number")]:
        with pytest.raises(LoRAFormatError, match=says):
            LoRA.parse(bad)
    with pytest.raises(LoRAFormatError, match="a path, a \\(path, scale\\) pair"):
        LoRA.of(("a.safetensors", "x"))


def test_cli_flag(model_file, tmp_path, capsys):
    from scripts.generate import main

    args = ["--model", str(model_file), "--prompt-embeds", str(tmp_path / "e.safetensors"), "--steps", "1",
            "--cfg", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png"), "--quiet"]
    with pytest.raises(SystemExit) as stop:
        main(args + ["--lora", "a.safetensors:x"])
    assert stop.value.code == 2 and "argument --lora: 'a.safetensors:x'" in capsys.readouterr().err
    save_file({"prompt_embeds": torch.randn(1, 5, 64), "pooled_prompt_embeds": torch.randn(1, 48)},
              str(tmp_path / "e.safetensors"))
    assert main(args + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LoRA") and "missing.safetensors: no such file" in err


def test_keys_that_fit_nothing(ref, model_file, tmp_path):
    sd, _ = peft_lora(ref, 8, ["transformer_blocks.0.attn.to_q"], ranks=(2,))
    cases = {
        "deeper": ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                    "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
                   r"transformer\.transformer_blocks\.7\.attn\.to_q matches no layer of the MM-DiT"),
        "misspelt": ({"lora_unet_joint_blocks_0_x_block_attn_qkvv.lora_down.weight": torch.zeros(2, 32),
                      "lora_unet_joint_blocks_0_x_block_attn_qkvv.lora_up.weight": torch.zeros(96, 2)},
                     r"lora_unet_joint_blocks_0_x_block_attn_qkvv matches no layer"),
        "no dual attention there": ({"diffusion_model.joint_blocks.2.x_block.attn2.qkv.lora_down.weight":
                                     torch.zeros(2, 32),
                                     "diffusion_model.joint_blocks.2.x_block.attn2.qkv.lora_up.weight":
                                     torch.zeros(96, 2)},
                                    r"joint_blocks\.2\.x_block\.attn2\.qkv matches no layer"),
        "wider model": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
                         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)},
                        r"transformer\.transformer_blocks\.0\.attn\.to_q does not fit "
                        r"joint_blocks\.0\.x_block\.attn\.qkv rows 0:32 \(its q block\): up is \[64, 2\] and "
                        r"down \[2, 64\], the layer needs up \[32, 2\] and down \[2, 32\]"),
        "ranks differ": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(3, 32),
                          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
                         r"lora_B\.weight \[32, 2\] and .*lora_A\.weight \[3, 32\] do not multiply"),
        "unknown prefix": ({"model.blocks.0.lora_A.weight": torch.zeros(2, 2),
                            "model.blocks.0.lora_B.weight": torch.zeros(2, 2)},
                           r"match no SD3 module, e.g. 'model\.blocks\.0\.lora_A\.weight'; SD3 LoRA keys start "
                           r"with one of transformer\., "),
        "half a pair": ({"transformer.proj_out.lora_A.weight": torch.zeros(2, 32)}, r"not both factors"),
    }
    for case, (tensors, says) in cases.items():
        f = write(tmp_path / "bad.safetensors", {**sd, **tensors})
        with pytest.raises(InputError, match=says):
            Pipeline.load(model_file, loras=[f])
        with pytest.raises(InputError, match=str(f).replace(".", r"\.")):  # every message names the file
            Pipeline.load(model_file, loras=[f])
    assert issubclass(LoRAMismatchError, InputError)


def test_files_that_adapt_nothing_or_another_model(tmp_path):
    cases = {
        "empty": ({}, LoRAFormatError, "holds no tensors"),
        "only alphas": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)}, LoRAFormatError,
                        "not both factors"),
        "not LoRA tensors": ({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, LoRAFormatError,
                             "are not LoRA tensors"),
        "SDXL kohya": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                        torch.zeros(2, 2)}, NotForSD3Error, r"is for a UNet \(Stable Diffusion 1\.x / 2\.x / SDXL\)"),
        "SDXL diffusers": ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, NotForSD3Error,
                           "is for a UNet"),
        "FLUX": ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2)},
                 NotForSD3Error, "is for FLUX"),
        "LoHa": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a": torch.zeros(2, 2)}, LoRAFormatError,
                 "is a LoHa adapter"),
        "T5": ({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 4),
                "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(4, 2)},
               LoRAFormatError, "adapts T5"),
    }
    for case, (tensors, error, says) in cases.items():
        f = write(tmp_path / f"{case.replace(' ', '_')}.safetensors", tensors)
        with pytest.raises(error, match=says):
            read_lora(f)
    (tmp_path / "pickled.ckpt").write_bytes(b"x")
    with pytest.raises(InputError, match="pickled"):
        read_lora(tmp_path / "pickled.ckpt")


# ------------------------------------------------------------------- text encoders, end to end against diffusers


def test_text_encoder_and_transformer_lora_end_to_end(tmp_path):
    """One diffusers-format file adapting the MM-DiT, CLIP-L and CLIP-G (`text_encoder.`, `text_encoder_2.`): the
    CLI with `--lora FILE:0.6` on the Stability layout gives `StableDiffusion3Pipeline` + `load_lora_weights` +
    `fuse_lora(lora_scale=0.6)`'s latents. The kohya spelling of the CLIP part (`lora_te1_`, `lora_te2_`) merges
    to the same encoder weights."""
    from safetensors.torch import load_file

    from loaders.text_encoders import load_clip
    from scripts.generate import main
    from tests._fixtures import tiny_text_pipeline

    pipe = tiny_text_pipeline(tmp_path / "tiny")
    sd, _ = peft_lora(pipe.transformer, 9, ranks=(2,))
    te = {}
    for prefix, kohya, encoder in [("text_encoder.", "lora_te1_", pipe.text_encoder),
                                   ("text_encoder_2.", "lora_te2_", pipe.text_encoder_2)]:
        part, _ = peft_lora(encoder, 10 + len(te), ranks=(2,), prefix=prefix)
        sd |= part
        for key, t in part.items():  # kohya: module path with `_`, lora_down / lora_up
            module, tensor = key.removeprefix(prefix).rsplit(".lora_", 1)
            role = "down" if tensor == "A.weight" else "up"
            te.setdefault(kohya, {})[f"{kohya}{module.replace('.', '_')}.lora_{role}.weight"] = t
    lora = write(tmp_path / "both.safetensors", sd)
    scale = 0.6
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=scale)
    kwargs = dict(prompt="a red fox", negative_prompt="blurry", guidance_scale=4.5, num_inference_steps=2,
                  height=64, width=64, max_sequence_length=32, output_type="latent")
    with torch.no_grad():
        want = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(5))[0]
    pipe.unload_lora_weights()  # the fused weights stay; PEFT's wrappers go
    single = tmp_path / "tiny" / "single" / "model.safetensors"
    out = tmp_path / "lat.safetensors"
    assert main(["--model", str(single), "--prompt", "a red fox", "--negative-prompt", "blurry", "--cfg", "4.5",
                 "--steps", "2", "--seed", "5", "--height", "64", "--width", "64", "--max-sequence-length", "32",
                 "--shift", "3.0", "--slg-layers", "", "--out", str(tmp_path / "x.png"), "--save-latents", str(out),
                 "--lora", f"{lora}:{scale}", "--quiet"]) == 0
    got = load_file(str(out))["latents"]
    assert relative(got, want) <= 1e-5, relative(got, want)

    file = read_lora((lora, scale))
    assert file.components == ["transformer", "clip_l", "clip_g"]
    kohya_sd = {**te["lora_te1_"], **te["lora_te2_"]}
    kohya = read_lora((write(tmp_path / "kohya_te.safetensors", kohya_sd), scale))
    clip_l = single.parent / "text_encoders" / "clip_l.safetensors"
    a, b = load_clip(clip_l, activation="quick_gelu"), load_clip(clip_l, activation="quick_gelu")
    merge_loras(a, [file], "clip_l"), merge_loras(b, [kohya], "clip_l")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fused = pipe.text_encoder.state_dict()
    assert all(relative(v, fused[k]) <= 1e-6 for k, v in a.state_dict().items())  # diffusers' fused CLIP-L

    ours = Pipeline.load(single, loras=[(lora, scale)])
    embeds = {"context": torch.randn(1, 8, 256), "pooled": torch.randn(1, 192)}
    from mmdit.conditioning import Conditioning

    result = ours(prompt_embeds=Conditioning(**embeds), steps=1, cfg=1.0, height=32, width=32)
    assert any("also adapts the text encoders" in w for w in result.warnings)
    assert result.record["loras"] == [{"path": str(lora), "scale": scale, "formats": ["diffusers/PEFT"],
                                       "components": ["transformer", "clip_l", "clip_g"]}]
