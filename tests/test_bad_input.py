"""Nothing lost, nothing silently wrong: a table of bad inputs a hostile-but-realistic user gives the built-in
model, through the command line (in-process `generate.main`), prompts-file lines and the Python API.

Every case must end in exit status 2 (or, in Python, an `InputError`) with a one-line message that says what is
wrong, and must leave every file it could touch (outputs, the user's own files next to them, the inputs)
exactly as it was. Then: a batch whose disk fills up halfway is resumed by rerunning it, remaking exactly the
broken image; Ctrl-C gives a line instead of a traceback; high-bit-depth images read with their own scale;
`--weights` follows what the checkpoint stores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import loaders.pipeline
from loaders import Pipeline
from loaders.builtin import FILE_NAME, MODEL_DIR
from loaders.validate import check_size
from mmdit.model import MMDiTConfig
from mmdit.errors import InputError
from scripts.generate import main as generate

PROMPT = "a red circle"
FAST = ["--steps", "2", "--quiet"]  # should a case not fail, it is at least quick


# ---------------------------------------------------------------------------------------------- the inputs


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels (a decompression bomb's header; no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def link_text_side(folder: Path) -> None:
    """Text encoders and tokenizers of the built-in model beside a single file in `folder`."""
    for name in ("text_encoders", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (folder / name).symlink_to(MODEL_DIR / name, target_is_directory=True)


def diffusers_folder(root: Path, transformer: dict, vae: dict, tensors: dict[str, Path]) -> Path:
    """The built-in MM-DiT and VAE as a diffusers folder (weights linked), with the config.json files given."""
    for part, config in (("transformer", transformer), ("vae", vae)):
        (root / part).mkdir(parents=True)
        (root / part / "diffusion_pytorch_model.safetensors").symlink_to(tensors[part])
        (root / part / "config.json").write_bytes(config if isinstance(config, bytes) else
                                                  json.dumps(config).encode())
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Every bad (and some good) input file the cases use, made once; the cases must never change them."""
    from loaders.transformer_keys import transformer_to_diffusers
    from loaders.vae_keys import vae_to_diffusers

    a = tmp_path_factory.mktemp("assets")
    grey = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    Image.fromarray(np.dstack([grey] * 3)).save(a / "init.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(a / "white.png")
    (a / "text.png").write_text("not an image")
    (a / "bomb.png").write_bytes(png_claiming(20000, 20000))
    Image.fromarray(np.full((64, 64), 100, np.uint16)).save(a / "near_black16.png")  # 100 / 65535: black
    Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)])).save(a / "red.png")
    Image.fromarray(np.full((64, 64), np.nan, np.float32)).save(a / "nan.tif")
    Image.new("L", (4000, 3000)).save(a / "photo.png")  # 12 megapixels
    layouts = {
        "broken": "{ not json",
        "outside": {"regions": [{"phrase": "a red circle", "box": [0, 0, 1.5, 1]}]},
        "elsewhere": {"regions": [{"phrase": "a blue square", "box": [0, 0, 0.5, 1]}]},
        "coloured": {"regions": [{"phrase": "a red circle", "mask": "red.png"}]},
        "missing_mask": {"regions": [{"phrase": "a red circle", "mask": "nothing.png"}]},
        "unknown_key": {"regions": [{"phrase": "a red circle", "box": [0, 0, 1, 1], "colour": "red"}]},
        "good": {"regions": [{"phrase": "a red circle", "box": [0, 0, 0.5, 1]}]},
    }
    for name, data in layouts.items():
        (a / f"{name}.json").write_text(data if isinstance(data, str) else json.dumps(data))

    # Weights: a copy of the built-in file with one NaN; a pickle; a truncated file; the diffusers layout.
    state = load_file(MODEL_DIR / FILE_NAME)
    bad = dict(state)
    key = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    (a / "nan_model").mkdir()
    save_file(bad, str(a / "nan_model" / FILE_NAME))
    link_text_side(a / "nan_model")
    (a / "model.ckpt").write_bytes(b"\x80\x04pickle")
    (a / "cut.safetensors").write_bytes((MODEL_DIR / FILE_NAME).read_bytes()[:5000])
    (a / "not_a_pipeline").mkdir()
    mmdit = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()
             if k.startswith("model.diffusion_model.")}
    vae = {k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")}
    tensors = {"transformer": a / "transformer.safetensors", "vae": a / "vae.safetensors"}
    save_file({k: v.contiguous() for k, v in transformer_to_diffusers(mmdit).items()}, str(tensors["transformer"]))
    save_file({k: v.contiguous() for k, v in vae_to_diffusers(vae).items()}, str(tensors["vae"]))
    good_t, good_v = {"num_attention_heads": 2}, {"scaling_factor": 1.5305, "shift_factor": 0.0609,
                                                  "use_quant_conv": False, "use_post_quant_conv": False}
    configs = {
        "t_list": ([1, 2], good_v), "t_latin1": ("{\"x\": \"caf\xe9\"}".encode("latin-1"), good_v),
        "t_heads_text": ({"num_attention_heads": "two"}, good_v), "t_heads_wrong": ({"num_attention_heads": 3}, good_v),
        "v_nan": (good_t, {**good_v, "scaling_factor": float("nan")}),
        "v_text": (good_t, {**good_v, "scaling_factor": "1.5"}), "v_zero": (good_t, {**good_v, "scaling_factor": 0}),
        "v_groups": (good_t, {**good_v, "norm_num_groups": 7}), "v_groups0": (good_t, {**good_v, "norm_num_groups": 0}),
        "v_blocks": (good_t, {**good_v, "down_block_types": "DownEncoderBlock2D"}),
        "v_json": (good_t, b"{ scaling_factor: 1.5"),
    }
    for name, (t, v) in configs.items():
        diffusers_folder(a / name, t, v, tensors)

    # LoRAs: rank 0, NaN factors, a UNet's, a PEFT file whose alpha is text.
    def lora(name: str, down: torch.Tensor, up: torch.Tensor, prefix: str = "lora_unet_joint_blocks_0_x_block_attn_qkv",
             metadata: dict | None = None) -> None:
        save_file({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}, str(a / name),
                  metadata=metadata)

    lora("rank0.safetensors", torch.zeros(0, 128), torch.zeros(384, 0))
    lora("nan.safetensors", torch.full((4, 128), float("nan")), torch.zeros(384, 4))
    lora("unet.safetensors", torch.zeros(4, 320), torch.zeros(320, 4), prefix="lora_unet_down_blocks_0_attentions_0")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4)},
              str(a / "peft_alpha.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "eight"})})

    # Prompts files, one bad line each (the good lines before it must not be drawn).
    ok = [PROMPT, json.dumps({"prompt": "a blue square", "seed": 3})]
    prompt_files = {
        "seed_bool": ok + ['{"prompt": "a red circle", "seed": true}'],
        "seed_float": ok + ['{"prompt": "a red circle", "seed": 1.5}'],
        "seed_huge": ok + ['{"prompt": "a red circle", "seed": 1180591620717411303424}'],
        "negative_null": ok + ['{"prompt": "a red circle", "negative_prompt": null}'],
        "out_number": ok + ['{"prompt": "a red circle", "out": 5}'],
        "out_jpeg": ok + ['{"prompt": "a red circle", "out": "x.jpg"}'],
        "layout_number": ok + ['{"prompt": "a red circle", "layout": 5}'],
        "prompt_list": ok + ['{"prompt": ["a red circle"]}'],
        "unknown_key": ok + ['{"prompt": "a red circle", "colour": "red"}'],
        "broken_json": ok + ['{"prompt": "a red circle"'],
        "bad_layout_line": ok + [json.dumps({"prompt": "a red circle", "layout": "elsewhere.json"})],
        "two_spellings": [json.dumps({"prompt": PROMPT, "out": "d/x.png"}),
                          json.dumps({"prompt": "a blue square", "out": "d/../d/x.png"})],
        "empty": ["", "   "],
        "steps_line_size": ok,  # used with --height 272
    }
    for name, lines in prompt_files.items():
        (a / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (a / "latin1.txt").write_bytes("a red caf\xe9\n".encode("latin-1"))
    return a


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()  # headers only: every API case fails before a weight is read


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    name: str  # "class/what"
    run: Callable  # (assets, work folder) -> argv for generate, or (assets, work, pipe) -> None for the API
    message: str  # a regular expression the one-line message must match
    api: bool = False


def cli(name: str, argv: Callable[[Path, Path], list[str]], message: str) -> Case:
    return Case(name, argv, message)


def api(name: str, call: Callable[[Path, Path, Pipeline], object], message: str) -> Case:
    return Case(name, call, message, api=True)


def out(w: Path) -> list[str]:
    return ["--out", str(w / "out" / "x.png")]


class LargeModel:
    """What `check_size` reads of a pipeline, for SD3.5 Medium (a 384×384 position table: up to 6144 pixels)."""

    config = MMDiTConfig(depth=24, num_heads=24, head_dim=64, pos_embed_max_size=384)


LAYOUT = ["--prompt", PROMPT, "--layout"]
CASES = [
    # weights
    cli("weights/pickle", lambda a, w: ["--model", str(a / "model.ckpt"), "--prompt", PROMPT], r"only \.safetensors"),
    cli("weights/truncated", lambda a, w: ["--model", str(a / "cut.safetensors"), "--prompt", PROMPT],
        r"not a readable safetensors file.*truncated or corrupt"),
    cli("weights/nan", lambda a, w: ["--model", str(a / "nan_model" / FILE_NAME), "--prompt", PROMPT, "--height",
                                     "128", "--width", "128", "--max-sequence-length", "16"],
        r"joint_blocks\.0\.x_block\.attn\.qkv\.weight' holds NaN or infinite values"),
    cli("weights/no-such-path", lambda a, w: ["--model", "./no/such/model.safetensors", "--prompt", PROMPT],
        r"no such file or folder"),
    cli("weights/not-a-pipeline", lambda a, w: ["--model", str(a / "not_a_pipeline"), "--prompt", PROMPT],
        r"not a diffusers pipeline folder"),
    cli("weights/hub-unreachable", lambda a, w: ["--model", "sd3-minimal-tests/no-such-repo", "--prompt", PROMPT],
        r"Hub cannot be reached|did not answer"),
    # diffusers config.json values
    cli("configs/transformer-list", lambda a, w: ["--model", str(a / "t_list"), "--prompt", PROMPT],
        r"holds a JSON list, not the object"),
    cli("configs/transformer-not-utf8", lambda a, w: ["--model", str(a / "t_latin1"), "--prompt", PROMPT],
        r"not a UTF-8 text file"),
    cli("configs/heads-text", lambda a, w: ["--model", str(a / "t_heads_text"), "--prompt", PROMPT],
        r"num_attention_heads='two'; it must be a positive whole number"),
    cli("configs/heads-wrong", lambda a, w: ["--model", str(a / "t_heads_wrong"), "--prompt", PROMPT],
        r"config\.json and the weights disagree: num_heads=3"),
    cli("configs/vae-scaling-nan", lambda a, w: ["--model", str(a / "v_nan"), "--prompt", PROMPT],
        r"scaling_factor=nan; it must be a finite number"),
    cli("configs/vae-scaling-text", lambda a, w: ["--model", str(a / "v_text"), "--prompt", PROMPT],
        r"scaling_factor='1\.5'; it must be a finite number"),
    cli("configs/vae-scaling-zero", lambda a, w: ["--model", str(a / "v_zero"), "--prompt", PROMPT],
        r"scaling_factor=0"),
    cli("configs/vae-groups", lambda a, w: ["--model", str(a / "v_groups"), "--prompt", PROMPT],
        r"norm_groups=7 does not divide"),
    cli("configs/vae-groups-zero", lambda a, w: ["--model", str(a / "v_groups0"), "--prompt", PROMPT],
        r"norm_num_groups=0; it must be a positive whole number"),
    cli("configs/vae-block-types", lambda a, w: ["--model", str(a / "v_blocks"), "--prompt", PROMPT],
        r"down_block_types must be a list of block names"),
    cli("configs/vae-not-json", lambda a, w: ["--model", str(a / "v_json"), "--prompt", PROMPT], r"not valid JSON"),
    # LoRAs
    cli("loras/rank-0", lambda a, w: ["--prompt", PROMPT, "--lora", str(a / "rank0.safetensors")], r"has rank 0"),
    cli("loras/nan", lambda a, w: ["--prompt", PROMPT, "--lora", str(a / "nan.safetensors")],
        r"lora_down\.weight holds NaN or infinite values"),
    cli("loras/missing", lambda a, w: ["--prompt", PROMPT, "--lora", str(a / "nothing.safetensors")], r"no such file"),
    cli("loras/unet", lambda a, w: ["--prompt", PROMPT, "--lora", str(a / "unet.safetensors")], r"is for a UNet"),
    cli("loras/alpha-text", lambda a, w: ["--prompt", PROMPT, "--lora", str(a / "peft_alpha.safetensors")],
        r"lora_alpha is 'eight', not a finite number"),
    # layouts
    cli("layouts/not-json", lambda a, w: [*LAYOUT, str(a / "broken.json")], r"is not valid JSON"),
    cli("layouts/box-outside", lambda a, w: [*LAYOUT, str(a / "outside.json")], r"is out of range"),
    cli("layouts/phrase-elsewhere", lambda a, w: [*LAYOUT, str(a / "elsewhere.json")], r"a blue square"),
    cli("layouts/coloured-mask", lambda a, w: [*LAYOUT, str(a / "coloured.json")], r"is in colour"),
    cli("layouts/missing-mask", lambda a, w: [*LAYOUT, str(a / "missing_mask.json")], r"cannot read the mask image"),
    cli("layouts/unknown-key", lambda a, w: [*LAYOUT, str(a / "unknown_key.json")], r"unknown key\(s\) \['colour'\]"),
    cli("layouts/dense-strength-nan", lambda a, w: [*LAYOUT, str(a / "good.json"), "--dense-strength", "nan"],
        r"dense_strength must be a finite number"),
    cli("layouts/maps-over-a-file", lambda a, w: [*LAYOUT, str(a / "good.json"), "--attention-maps",
                                                  str(w / "mine.txt" / "maps")], r"is a file, not a folder"),
    # flags
    cli("flags/cfg-nan", lambda a, w: ["--prompt", PROMPT, "--cfg", "nan"], r"cfg must be a finite number"),
    cli("flags/cfg-inf", lambda a, w: ["--prompt", PROMPT, "--cfg", "inf"], r"must be a finite number, got inf"),
    cli("flags/shift-nan", lambda a, w: ["--prompt", PROMPT, "--shift", "nan"], r"shift must be a finite"),
    cli("flags/slg-scale-inf", lambda a, w: ["--prompt", PROMPT, "--slg-scale=-inf"],
        r"slg_scale must be a finite number, got -inf"),
    cli("flags/slg-start", lambda a, w: ["--prompt", PROMPT, "--slg-start", "2"], r"slg_start must be in \[0, 1\]"),
    cli("flags/steps-huge", lambda a, w: ["--prompt", PROMPT, "--steps", "1000000000"],
        r"steps must be between 1 and 1000"),
    cli("flags/steps-zero", lambda a, w: ["--prompt", PROMPT, "--steps", "0"], r"must be between 1 and 1000, got 0"),
    cli("flags/num-images", lambda a, w: ["--prompt", PROMPT, "--num-images", "10000"],
        r"num_images must be between 1 and 64"),
    cli("flags/height-table", lambda a, w: ["--prompt", PROMPT, "--height", "272"],
        r"height 272 is more than this model draws.*256x256"),
    cli("flags/height-multiple", lambda a, w: ["--prompt", PROMPT, "--height", "100"],
        r"not a positive multiple of 16"),
    cli("flags/seed-huge", lambda a, w: ["--prompt", PROMPT, "--seed", str(2**70)], r"seed must be between"),
    cli("flags/device-foo", lambda a, w: ["--prompt", PROMPT, "--device", "foo"], r"'foo' is not a device"),
    cli("flags/strength-nan", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "init.png"), "--strength",
                                            "nan"], r"strength must be a finite number"),
    cli("flags/strength-high", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "init.png"), "--strength",
                                             "1.5"], r"must be in \(0, 1\], got 1\.5"),
    cli("flags/mask-alone", lambda a, w: ["--prompt", PROMPT, "--mask", str(a / "white.png")],
        r"a mask needs an init image"),
    cli("flags/long-prompt", lambda a, w: ["--prompt", "a red circle " * 10000],
        r"has 130,000 characters; at most 100,000"),
    # images
    cli("images/text", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "text.png")], r"not an image PIL"),
    cli("images/missing", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "nothing.png")],
        r"does not exist"),
    cli("images/bomb", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "bomb.png")],
        r"decompression bombs"),
    cli("images/mask-bomb", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "init.png"), "--mask",
                                          str(a / "bomb.png")], r"decompression bombs"),
    cli("images/photo-size", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "photo.png")],
        r"2992 \(the init image's size; give --height/--width to resize it\) is more than this model draws"),
    api("images/photo-size-on-a-large-model", lambda a, w, p: check_size(LargeModel(), 3008, 4000, from_image=True),
        r"sets the output size to 4000x3008 \(12\.0 megapixels\), more than 4\.2; give --height and --width"),
    cli("images/float-nan", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "nan.tif")],
        r"holds NaN or infinite values"),
    cli("images/mask-colour", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "init.png"), "--mask",
                                            str(a / "red.png")], r"mask must be greyscale"),
    cli("images/mask-16bit-near-black", lambda a, w: ["--prompt", PROMPT, "--init-image", str(a / "init.png"),
                                                      "--mask", str(a / "near_black16.png")], r"black everywhere"),
    # prompts files
    *[cli(f"prompts/{name}", lambda a, w, name=name: ["--prompts", str(a / f"{name}.jsonl"), "--out",
                                                      str(w / "batch" / "{index}.png")], message) for name, message in [
        ("seed_bool", r":3: \"seed\" must be a whole number, got true"),
        ("seed_float", r":3: \"seed\" must be a whole number, got 1\.5"),
        ("seed_huge", r":3: \"seed\" 1180591620717411303424 is outside torch's seed range"),
        ("negative_null", r":3: \"negative_prompt\" must be a string, got null"),
        ("out_number", r":3: \"out\" must be a string, got 5"),
        ("out_jpeg", r":3 \"out\" 'x\.jpg': images are written as PNG"),
        ("layout_number", r":3: \"layout\" must be a layout file path or a layout object, got 5"),
        ("prompt_list", r":3: needs a \"prompt\" string"),
        ("unknown_key", r":3: unknown key\(s\) \['colour'\]"),
        ("broken_json", r":3: not valid JSON"),
        ("bad_layout_line", r"a blue square"),
        ("two_spellings", r"would write the same file \(d/x\.png and d/\.\./d/x\.png\)"),
        ("empty", r"holds no prompts"),
    ]],
    cli("prompts/not-utf8", lambda a, w: ["--prompts", str(a / "latin1.txt")], r"is not UTF-8 text"),
    cli("prompts/size-for-every-line", lambda a, w: ["--prompts", str(a / "steps_line_size.jsonl"), "--height", "272",
                                                     "--out", str(w / "batch" / "{index}.png")],
        r"272 is more than this model draws"),
    cli("prompts/template", lambda a, w: ["--prompts", str(a / "steps_line_size.jsonl"), "--out", "{nope}.png"],
        r"is not a template of \{index\} and \{seed\}"),
    cli("prompts/foreign-manifest", lambda a, w: ["--prompts", str(a / "steps_line_size.jsonl"), "--out",
                                                  str(w / "out" / "{index}.png")],
        r"not a manifest this program wrote"),
    # outputs
    cli("outputs/jpeg", lambda a, w: ["--prompt", PROMPT, "--out", str(w / "x.jpg")], r"images are written as PNG"),
    cli("outputs/under-a-file", lambda a, w: ["--prompt", PROMPT, "--out", str(w / "mine.txt" / "x.png")],
        r"is a file, not a folder"),
    cli("outputs/name-too-long", lambda a, w: ["--prompt", PROMPT, "--out", str(w / ("x" * 300 + ".png"))],
        r"is 304 bytes long"),
    cli("outputs/a-folder", lambda a, w: ["--prompt", PROMPT, "--out", str(w / "out")], r"images are written as PNG"),
    cli("outputs/folder-named-png", lambda a, w: ["--prompt", PROMPT, "--out", str(w / "folder.png")], r"is a folder"),
    cli("outputs/unwritable", lambda a, w: ["--prompt", PROMPT, "--out", "/proc/sd3-minimal/x.png"],
        r"cannot write in /proc"),
    cli("outputs/latents-unwritable", lambda a, w: ["--prompt", PROMPT, *out(w), "--save-latents",
                                                    "/proc/x.safetensors"], r"--save-latents .*cannot write in /proc"),
    cli("outputs/maps-unwritable", lambda a, w: [*LAYOUT, str(a / "good.json"), *out(w), "--attention-maps",
                                                 "/proc/maps"], r"--attention-maps .*cannot write in /proc"),
    cli("outputs/existing", lambda a, w: ["--prompt", PROMPT, "--out", str(w / "out" / "mine.png")],
        r"mine\.png already exist\(s\)"),
    cli("outputs/existing-map", lambda a, w: [*LAYOUT, str(a / "good.json"), *out(w), "--attention-maps",
                                              str(w / "maps")], r"region_0\.png already exist\(s\)"),
    cli("outputs/latents-same-as-image", lambda a, w: ["--prompt", PROMPT, *out(w), "--save-latents",
                                                       str(w / "out" / "x.png")], r"would write the same file"),
    cli("outputs/two-images-one-file", lambda a, w: ["--prompt", PROMPT, "--num-images", "2", "--out",
                                                     str(w / "out" / "x.png"), "--save-latents",
                                                     str(w / "out" / "x_1.png")], r"would write the same file"),
    # the Python API
    api("api/prompt-number", lambda a, w, p: p(5), r"prompt must be a string or None, got 5"),
    api("api/negative-none", lambda a, w, p: p(PROMPT, negative_prompt=None),
        r"negative_prompt must be a string \(.. for none\), got None"),
    api("api/layout-list", lambda a, w, p: p(PROMPT, layout=[{"phrase": "x"}]), r"layout must be"),
    api("api/seed-float", lambda a, w, p: p(PROMPT, seed=1.5), r"seed must be a whole number, got 1\.5"),
    api("api/seed-bool", lambda a, w, p: p(PROMPT, seed=True), r"seed must be a whole number, got True"),
    api("api/cfg-text", lambda a, w, p: p(PROMPT, cfg="4.5"), r"cfg must be a number, got '4\.5'"),
    api("api/num-images-float", lambda a, w, p: p(PROMPT, num_images=2.5),
        r"num_images must be a whole number, got 2\.5"),
    api("api/sequence-length", lambda a, w, p: p(PROMPT, max_sequence_length=100000),
        r"max_sequence_length must be between 1 and 512, got 100000"),
    api("api/height-float", lambda a, w, p: p(PROMPT, height=128.0), r"height must be a whole number"),
    api("api/steps-bool", lambda a, w, p: p(PROMPT, steps=True), r"steps must be a whole number"),
    api("api/slg-list", lambda a, w, p: p(PROMPT, slg_layers=[1]), r"slg_layers must be a tuple"),
    api("api/dense-preset", lambda a, w, p: p(PROMPT, dense_preset="strong"), r"dense_preset must be one of faithful"),
    api("api/sampler", lambda a, w, p: p(PROMPT, sampler="heun"), r"unknown sampler 'heun'"),
    api("api/record-maps-text", lambda a, w, p: p(PROMPT, record_maps="yes"), r"record_maps must be True or False"),
    api("api/init-image-number", lambda a, w, p: p(PROMPT, init_image=5), r"init image must be a file path or a PIL"),
    api("api/callback", lambda a, w, p: p(PROMPT, callback=5), r"callback must be a function"),
    api("api/preset", lambda a, w, p: Pipeline.load(preset="turbo"), r"unknown preset 'turbo'"),
    api("api/device", lambda a, w, p: Pipeline.load(device="foo"), r"device \(--device\) 'foo' is not a device"),
    api("api/dtype-text", lambda a, w, p: Pipeline.load(dtype="float32"), r"dtype must be one of"),
    api("api/loras-string", lambda a, w, p: Pipeline.load(loras=str(a / "nan.safetensors")),
        r"loras must be a list of LoRAs"),
    api("api/lora-scale-nan", lambda a, w, p: Pipeline.load(loras=[(a / "nan.safetensors", math.nan)]),
        r"scale nan is not a finite number"),
    api("api/keep-loaded-text", lambda a, w, p: Pipeline.load(keep_loaded="yes"), r"keep_loaded must be True or False"),
]
if not torch.cuda.is_available():
    CASES.append(cli("flags/device-cuda", lambda a, w: ["--prompt", PROMPT, "--device", "cuda"],
                     r"this machine has no CUDA device; use 'cpu'"))


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders (links not followed) -> a hash of its bytes."""
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return files


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The folder a case runs in, holding the user's own files where a careless run would write."""
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once: offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.png").write_bytes(b"the user's own picture")
    (tmp_path / "out" / "manifest.json").write_text("the user's own notes")
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "region_0.png").write_bytes(b"the user's own map")
    (tmp_path / "mine.txt").write_text("a file, not a folder")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, assets, pipe, work, capsys):
    before = snapshot(assets, work)
    if case.api:
        with pytest.raises(InputError) as raised:
            case.run(assets, work, pipe)
        message = str(raised.value)
        assert "\n" not in message, message
    else:
        argv = case.run(assets, work)
        if "--out" not in argv and "--prompts" not in argv:
            argv += out(work)
        assert generate(argv + ["--quiet"] + ([] if "--steps" in argv else ["--steps", "2"])) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        message = lines[0]
    import re

    assert re.search(case.message, message), message
    assert snapshot(assets, work) == before  # nothing written, nothing the user had changed
    assert not list(work.rglob("*.partial"))


def test_the_table_covers_every_class():
    classes = {c.name.split("/")[0] for c in CASES}
    assert classes == {"weights", "configs", "loras", "layouts", "flags", "images", "prompts", "outputs", "api"}
    assert len(CASES) >= 60


# ---------------------------------------------------------------------------------------------- after the work


def batch(folder: Path) -> list[str]:
    """A three-line batch, small and fast (the numbers do not matter here, only which files are made)."""
    prompts = folder / "prompts.txt"
    folder.mkdir(exist_ok=True)
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return ["--prompts", str(prompts), "--out", str(folder / "img" / "{index}.png"), "--steps", "1", "--cfg", "1",
            "--height", "64", "--width", "64", "--quiet"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_full_disk_halfway_is_resumed_by_rerunning(tmp_path, monkeypatch, capsys):
    """The second image's write fails halfway (ENOSPC): the run stops with one line, the first image stays, no
    part of the second is anywhere; rerunning makes exactly the missing image, equal to an undisturbed run's.
    An image cut short by an older, non-atomic write (our metadata, then truncated pixels) is remade too."""
    reference = tmp_path / "reference"
    assert generate(batch(reference)) == 0
    want = [pixels(reference / "img" / f"{i}.png") for i in range(3)]

    real_save = Image.Image.save
    writes = []

    def full_disk(self, fp, format=None, **params):
        writes.append(fp)
        if len(writes) == 2:  # half of the PNG reaches the disk, then the disk is full
            import io

            buffer = io.BytesIO()
            real_save(self, buffer, format=format, **params)
            fp.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, format=format, **params)

    run = tmp_path / "run"
    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert generate(batch(run)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    monkeypatch.setattr(Image.Image, "save", real_save)
    img = run / "img"
    assert sorted(p.name for p in img.iterdir()) == ["0.png"]  # no partial file, no half image under its name
    first = (img / "0.png").stat().st_mtime_ns

    assert generate(batch(run)) == 0
    assert (img / "0.png").stat().st_mtime_ns == first  # trusted: complete, and ours
    for i in range(3):
        assert np.array_equal(pixels(img / f"{i}.png"), want[i])

    # An image an older version left cut short (written in place) is ours but unfinished: remade.
    whole = (img / "1.png").read_bytes()
    (img / "1.png").write_bytes(whole[: len(whole) // 2])
    assert generate(batch(run)) == 0
    assert np.array_equal(pixels(img / "1.png"), want[1])
    manifest = json.loads((img / "manifest.json").read_text())
    assert [e["status"] for e in manifest["images"]] == ["existed", "made", "existed"]


def test_ctrl_c_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loaders.pipeline, "generate_latents", interrupted)
    assert generate(["--prompt", PROMPT, "--out", str(tmp_path / "x.png"), *FAST]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), lines
    assert list(tmp_path.iterdir()) == []


def test_non_finite_latents_name_the_step(monkeypatch):
    """A model whose output turns NaN at step 2 stops there, and says so, instead of decoding a black image."""
    pipe = Pipeline.load(keep_loaded=True)
    model = pipe.transformer()
    real = model.forward
    calls = []

    def poisoned(x, *args, **kwargs):
        calls.append(1)
        v = real(x, *args, **kwargs)
        return v * float("nan") if len(calls) == 2 else v

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite .* at sampling step 2"):
        pipe(PROMPT, steps=3, cfg=1.0)


def test_long_prompts_are_reported_briefly(pipe):
    """A 20,000-character prompt is cut with a short note per encoder, not echoed; so is a long negative prompt."""
    long = "a red circle " * 1540  # 20,020 characters
    notes = pipe(long, negative_prompt=long, steps=1, height=32, width=32).warnings
    assert sum(len(n) for n in notes) < 2000, notes
    assert any("the end of the negative prompt" in n for n in notes) and any("20,020 characters" in n for n in notes)


def test_image_modes_are_read_with_their_own_scale(tmp_path):
    from loaders.images import read_init_image, read_mask

    def saved(name: str, image: Image.Image) -> Path:
        image.save(tmp_path / name)
        return tmp_path / name

    mid16 = saved("mid16.png", Image.fromarray(np.full((32, 32), 32768, np.uint16)))  # 16-bit mid grey
    assert read_init_image(mid16, 16, 16).abs().max() < 1e-3  # mid grey is 0 in [-1, 1] (was solid white)
    quarter = saved("quarter.tif", Image.fromarray(np.full((32, 32), 0.25, np.float32)))  # float TIFF
    assert torch.allclose(read_init_image(quarter, 16, 16), torch.tensor(-0.5))  # (was black)
    half16 = np.zeros((32, 32), np.uint16)
    half16[:, 16:] = 65535
    mask = read_mask(saved("half16.png", Image.fromarray(half16)), 32, 32)
    assert mask[0, 0, :, :16].sum() == 0 and mask[0, 0, :, 16:].all()
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = read_init_image(Image.fromarray(rgb), 32, 32)
    for mode in ("RGBA", "CMYK", "P"):  # 8-bit modes go through PIL's conversion to RGB
        got = read_init_image(saved(f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}",
                                    Image.fromarray(rgb).convert(mode)), 32, 32)
        assert got.shape == want.shape and (mode != "RGBA" or torch.equal(got, want))


def test_weights_follow_the_file(tmp_path, capsys):
    """A float8 file stays float8 unless asked otherwise, and the run says which it chose."""
    state = load_file(MODEL_DIR / FILE_NAME)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and k.endswith("qkv.weight") else v
           for k, v in state.items()}
    (tmp_path / "m").mkdir()
    save_file(fp8, str(tmp_path / "m" / "tiny_fp8.safetensors"))
    link_text_side(tmp_path / "m")
    path = tmp_path / "m" / "tiny_fp8.safetensors"
    assert Pipeline.load(path).weights == "fp8"
    assert Pipeline.load(path, weights="full").weights == "full"
    assert Pipeline.load().weights == "full"
    assert generate(["--model", str(path), "--prompt", PROMPT, "--steps", "1", "--height", "128", "--width", "128",
                     "--max-sequence-length", "16", "--out", str(tmp_path / "x.png")]) == 0
    assert "weights fp8 (the file stores float8; --weights full dequantises it)" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "m")
