"""GGUF weights: the dequantisers against the format's own reference, the GGUF MM-DiT against diffusers' GGUF
loader, `--transformer` end to end, LoRA on GGUF layers, and every bad file refused in one line.

The reference dequantiser is `gguf.quants.dequantize` (numpy, float32); diffusers' `SD3Transformer2DModel.
from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` is the reference model. diffusers
dequantises in float16 arithmetic (a float16 scale times the quantised integers, rounded to float16), so on an
ordinary file its weights differ from the reference's by float16 rounding; the files compared tightly here have
scales of 3 significant bits, which makes every product exact in float16 too, so both engines hold the same
weights and must agree to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loaders.gguf import GGUFError, load_gguf_transformer, quantized_type, read_gguf, write_gguf
from loaders.pipeline import Pipeline
from loaders.safetensors import CheckpointError
from loaders.transformer_keys import diffusers_sources, transformer_from_diffusers, transformer_to_diffusers
from mmdit.errors import InputError
from mmdit.attention import linear_rows
from mmdit.fp8 import FP8Linear, compute_dtype
from mmdit.gguf import BLOCK_TYPES, GGUFLinear, Workspace, dequantize
from mmdit.model import MMDiT, NotSD3Error
from mmdit.quantized import QuantizedLinear
from tests._fixtures import diffusers_transformer, diffusers_vae, write_single_file
from tests.test_transformer import inputs, run_ref

gguf = pytest.importorskip("gguf")
G = gguf.GGMLQuantizationType
# Byte offsets of each block type's float16 scales (d, and dmin / m where there is one).
SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
QUANTIZED = list(SCALES)


def random_blocks(name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes in `name`'s layout, (rows, bytes a row), with finite float16 scales: every bit pattern of the
    quantised values, including the types `gguf` cannot quantise."""
    t = BLOCK_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks, t.type_size), dtype=np.uint8)
    for off in SCALES[name]:
        raw[:, :, off : off + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * t.type_size)


def exact_scales(raw: np.ndarray, name: str) -> np.ndarray:
    """`raw` with every block's scale rounded to 3 significant bits, so that each scale · quantised value is exact
    in float16 as well (see the module docstring)."""
    t = BLOCK_TYPES[name]
    blocks = raw.copy().reshape(raw.shape[0], -1, t.type_size)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    m, e = np.frexp(d)
    blocks[:, :, :2] = np.ldexp(np.round(m * 8) / 8, e).astype(np.float16).view(np.uint8)
    return blocks.reshape(raw.shape)


# ------------------------------------------------------------------------------------------- dequantisers


def test_block_types_are_ggufs():
    for name, t in BLOCK_TYPES.items():
        assert G[name].value == t.ggml_type and gguf.GGML_QUANT_SIZES[G[name]] == (t.block_size, t.type_size)


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantisers_equal_the_reference_bit_for_bit(name):
    t = BLOCK_TYPES[name]
    raw = random_blocks(name, 6, 3)
    samples = [raw]
    if name in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"):  # and as gguf's own quantiser writes them
        w = np.random.default_rng(1).standard_normal((6, 3 * t.block_size)).astype(np.float32)
        samples.append(gguf.quants.quantize(w, G[name]))
    for data in samples:
        ref = gguf.quants.dequantize(data, G[name])
        for chunk in (None, 1, 4):
            ours = dequantize(torch.from_numpy(data), t, chunk=chunk)
            assert np.array_equal(ours.numpy().view(np.int32), ref.view(np.int32))
        for dtype in (torch.bfloat16, torch.float16):  # one rounding from the reference's float32
            ours = dequantize(torch.from_numpy(data), t, dtype, chunk=2)
            assert torch.equal(ours.view(torch.int16), torch.from_numpy(ref).to(dtype).view(torch.int16))


def test_float_types_equal_the_reference():
    w = torch.randn(5, 64)
    for name, data in (("F32", w.numpy()), ("F16", w.half().numpy()), ("BF16", None)):
        t = BLOCK_TYPES[name]
        if name == "BF16":
            stored = gguf.quants.quantize(w.numpy(), G.BF16)
            ref = gguf.quants.dequantize(stored, G.BF16)
            ours = dequantize(torch.from_numpy(stored).view(torch.bfloat16), t)
        else:
            ref, ours = gguf.quants.dequantize(data.view(np.uint8), G[name]), dequantize(torch.from_numpy(data), t)
        assert np.array_equal(ours.numpy().view(np.int32), ref.view(np.int32)), name


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K", "IQ4_XS", "F16", "BF16"])
def test_gguf_linear_is_a_linear_on_the_dequantised_weight(name):
    t = BLOCK_TYPES[name]
    out_f, in_f = 48, 512
    g = torch.Generator().manual_seed(2)
    if t.float_dtype is None:
        stored = torch.from_numpy(random_blocks(name, out_f, in_f // t.block_size, seed=3))
    else:
        stored = (torch.randn(out_f, in_f, generator=g) / 20).to(t.float_dtype)
    b, x = torch.randn(out_f, generator=g), torch.randn(2, 5, in_f, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        layer = GGUFLinear(in_f, out_f, block=t, compute_dtype=dtype)
        layer.weight.data, layer.bias.data = stored, b.to(dtype)
        assert isinstance(layer, QuantizedLinear) and compute_dtype(layer) == dtype
        plain = nn.Linear(in_f, out_f, dtype=dtype)
        plain.weight.data, plain.bias.data = dequantize(stored, t, torch.float32).to(dtype), b.to(dtype)
        xd = x.to(dtype)
        with torch.no_grad():
            expected = plain(xd)
            assert torch.equal(layer(xd), expected)
            layer.workspace = Workspace()  # decoding into reused memory changes no number
            assert torch.equal(layer(xd), expected) and torch.equal(layer(xd), expected)
            assert torch.equal(linear_rows(layer, xd, 16), linear_rows(plain, xd, 16))
    assert name in repr(layer)
    assert issubclass(FP8Linear, QuantizedLinear)  # one idea of a layer stored another way, two storages


# ------------------------------------------------------------------------------------------- model files


def stability_state(ref) -> dict[str, torch.Tensor]:
    return transformer_from_diffusers(ref.state_dict())


def write_exact(path: Path, state: dict, qtype: str = "Q8_0", **kw) -> Path:
    """`state` as a GGUF file in `qtype` whose scales have 3 significant bits (see `exact_scales`)."""
    raw = {}
    for k, v in state.items():
        kind = quantized_type(k, tuple(v.shape), qtype, v.dtype)
        if kind == qtype:
            raw[k] = (exact_scales(gguf.quants.quantize(v.float().numpy(), G[qtype]), qtype), qtype)
    return write_gguf(path, state.items(), qtype, raw=raw, **kw)


def diffusers_gguf(path: Path, ref, tmp: Path):
    """diffusers' GGUF-loaded SD3Transformer2DModel (its config from `ref`, offline)."""
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    config = tmp / "config"
    if not config.exists():
        ref.save_config(config)
    return SD3Transformer2DModel.from_single_file(
        str(path), config=str(config), torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()


def float_twin(file) -> MMDiT:
    """Our float32 MMDiT holding the file's weights dequantised by the reference dequantiser."""
    from loaders.safetensors import load_weights

    state = {}
    for key, shape in file.shapes.items():
        t = file.stored(key)
        b = file.block(key)
        data = t.numpy() if b.float_dtype is None else t.float().numpy()
        values = gguf.quants.dequantize(data, G[b.name] if b.float_dtype is None else G.F32)
        state[key] = torch.from_numpy(np.ascontiguousarray(values)).reshape(shape)
    with torch.device("meta"):
        model = MMDiT(file.config())
    return load_weights(model, state, what="twin", dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("variant,qtype", [("sd3.5-large", "Q8_0"), ("sd3.5-medium", "Q4_0"), ("sd3-medium", "Q5_0")])
def test_step_matches_diffusers_gguf_model(variant, qtype, tmp_path):
    ref = diffusers_transformer(variant)
    x, t, ctx, pooled = inputs()
    exact = write_exact(tmp_path / "exact.gguf", stability_state(ref), qtype)
    ours = load_gguf_transformer(read_gguf(exact))
    assert ours.config.variant == variant and isinstance(ours.joint_blocks[0].x_block.mlp.fc1, GGUFLinear)
    with torch.no_grad():
        a = ours(x, t, ctx, pooled)
        b = run_ref(diffusers_gguf(exact, ref, tmp_path), x, t, ctx, pooled)
        assert torch.equal(a, float_twin(read_gguf(exact))(x, t, ctx, pooled))  # the reference's weights exactly
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
        # An ordinary file: diffusers' float16 dequantisation now rounds its weights, ours does not.
        plain = write_gguf(tmp_path / "plain.gguf", stability_state(ref).items(), qtype)
        a = load_gguf_transformer(read_gguf(plain))(x, t, ctx, pooled)
        b = run_ref(diffusers_gguf(plain, ref, tmp_path), x, t, ctx, pooled)
        assert (a - b).abs().max() <= 2e-3 * b.abs().max(), (a - b).abs().max()


def test_name_styles_and_a_flat_position_table_load_alike(tmp_path):
    """city96's names; stable-diffusion.cpp's prefix with other components beside it and a 2-D position table;
    diffusers' names (q, k, v joined, (scale, shift) halves swapped): one model, bit for bit."""
    ref = diffusers_transformer("sd3.5-medium")
    state = stability_state(ref)
    city96 = write_gguf(tmp_path / "a.gguf", state.items(), "Q8_0")
    sdcpp = write_gguf(tmp_path / "b.gguf", [*((f"model.diffusion_model.{k}", v) for k, v in state.items()),
                                             ("first_stage_model.decoder.conv_in.weight", torch.randn(8, 4, 3, 3))],
                       "Q8_0", pos_embed_2d=True)
    theirs = transformer_to_diffusers(state)
    kinds = {k: quantized_type(k, tuple(v.shape), "Q8_0", v.dtype) for k, v in state.items()}
    types = {part: kinds[ours] for ours, (parts, _) in diffusers_sources(list(theirs)).items() for part in parts}
    named = write_gguf(tmp_path / "c.gguf", theirs.items(), "Q8_0", types=types)  # each part typed as its whole
    x, t, ctx, pooled = inputs()
    outs = []
    for path in (city96, sdcpp, named):
        file = read_gguf(path)
        assert file.shapes["pos_embed"] == (1, 256, 32)
        with torch.no_grad():
            outs.append(load_gguf_transformer(file)(x, t, ctx, pooled))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_weights_stay_in_the_memory_map_and_offload_streams_them(tmp_path):
    ref = diffusers_transformer("sd3.5-large")
    path = write_gguf(tmp_path / "m.gguf", stability_state(ref).items(), "Q4_0")
    file = read_gguf(path)
    model = load_gguf_transformer(file, dtype=torch.bfloat16)
    mapped = np.asarray(file.tensors["joint_blocks.0.x_block.mlp.fc1.weight"][0][0].data)
    assert model.joint_blocks[0].x_block.mlp.fc1.weight.data_ptr() == mapped.ctypes.data  # not a copy
    stored = sum(p.nbytes for n, p in model.named_parameters() if n.endswith(".weight") and p.dtype == torch.uint8)
    assert stored == sum(p.data.nbytes for k, (parts, _) in file.tensors.items() for p in parts
                         if k.startswith("joint_blocks") and p.block.name == "Q4_0")
    x, t, ctx, pooled = (v.bfloat16() for v in inputs())
    streamed = load_gguf_transformer(file, dtype=torch.bfloat16, offload="blocks")
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx, pooled), model(x, t, ctx, pooled))


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_on_gguf_layers_is_the_lora_on_the_float_weights(tmp_path):
    from tests.test_lora import peft_lora, write

    ref = diffusers_transformer("sd3.5-medium")
    model_file = tmp_path / "model.safetensors"
    write_single_file(model_file, ref.state_dict(), diffusers_vae().state_dict())
    path = write_gguf(tmp_path / "m.gguf", stability_state(ref).items(), "Q8_0")
    twin = float_twin(read_gguf(path))
    twin_file = tmp_path / "twin.safetensors"
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(twin_file))
    sd, _ = peft_lora(ref, 5)  # every layer: fused qkv row blocks, the swapped (scale, shift) layers, embedders
    sd["transformer.transformer_blocks.0.ff.net.2.lora_B.bias"] = torch.randn(32) * 0.1
    lora = write(tmp_path / "l.safetensors", sd)
    x, t, ctx, pooled = inputs()
    runs = {}
    for name, transformer, loras in (("gguf", path, [(lora, 0.7)]), ("float", twin_file, [(lora, 0.7)]),
                                     ("bare", path, [])):
        model = Pipeline.load(model_file, transformer=transformer, loras=loras, device="cpu").transformer()
        with torch.no_grad():
            runs[name] = model(x, t, ctx, pooled)
        if name == "gguf":
            layer = model.joint_blocks[0].x_block.attn.qkv
            assert isinstance(layer, GGUFLinear) and layer.low_rank  # kept beside the blocks, not dropped
    assert torch.equal(runs["gguf"], runs["float"])
    assert (runs["gguf"] - runs["bare"]).abs().max() > 0.05 * runs["bare"].abs().max()


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests._fixtures import tiny_text_pipeline

    root = tmp_path_factory.mktemp("gguf_t2i")
    pipe = tiny_text_pipeline(root)
    state = stability_state(pipe.transformer)
    exact = write_exact(root / "exact-Q8_0.gguf", state)
    return root, pipe, exact


def test_text_to_image_with_transformer_flag_matches_diffusers(tiny, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    from safetensors.torch import load_file

    from loaders.pngmeta import read_png_metadata
    from scripts.generate import main
    from tests.test_text_to_image import NEGATIVE, PROMPT, SIZE

    root, pipe, exact = tiny
    theirs = diffusers_gguf(exact, pipe.transformer, tmp_path)
    ref = StableDiffusion3Pipeline(**{**pipe.components, "transformer": theirs})
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_inference_steps=3, height=SIZE,
                  width=SIZE, max_sequence_length=32)
    with torch.no_grad():
        lat_ref = ref(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(5))[0]
        img_ref = ref(**kwargs, output_type="pil", generator=torch.Generator().manual_seed(5))[0][0]
    args = ["--model", str(root / "single" / "model.safetensors"), "--transformer", str(exact), "--prompt", PROMPT,
            "--negative-prompt", NEGATIVE, "--cfg", "4", "--steps", "3", "--seed", "5", "--height", str(SIZE),
            "--width", str(SIZE), "--max-sequence-length", "32", "--shift", "3.0", "--slg-layers", "",
            "--device", "cpu", "--out", str(tmp_path / "g.png"), "--save-latents", str(tmp_path / "l.safetensors"),
            "--quiet"]
    assert main(args) == 0
    lat = load_file(str(tmp_path / "l.safetensors"))["latents"]
    assert (lat - lat_ref).abs().max() <= 1e-5 * lat_ref.abs().max(), (lat - lat_ref).abs().max()
    image = np.asarray(Image.open(tmp_path / "g.png")).astype(int)
    assert np.abs(image - np.asarray(img_ref).astype(int)).max() <= 1
    assert read_png_metadata(tmp_path / "g.png")["transformer"] == str(exact)


def test_transformer_flag_takes_a_safetensors_mmdit(tiny, tmp_path):
    """The MM-DiT alone, in diffusers' names, gives what the model's own MM-DiT gives."""
    root, pipe, _ = tiny
    alone = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(alone))
    model = root / "single" / "model.safetensors"
    common = dict(prompt="a red fox", steps=2, cfg=2.0, height=32, width=32, max_sequence_length=16, seed=3)
    a = Pipeline.load(model, device="cpu")(**common).latents
    b = Pipeline.load(model, device="cpu", transformer=alone)(**common).latents
    assert torch.equal(a, b)


def test_a_transformer_that_does_not_fit_the_model(tiny, tmp_path):
    root, _, _ = tiny
    other = diffusers_transformer("sd3.5-large")  # 64-wide prompt embeddings; the tiny pipeline's T5 gives 256
    path = write_gguf(tmp_path / "large.gguf", stability_state(other).items(), "Q8_0")
    with pytest.raises(CheckpointError, match=r"does not fit --model .*prompt embeddings \(T5\) of width 64, where "
                                              r"--model gives 256"):
        Pipeline.load(root / "single" / "model.safetensors", transformer=path, device="cpu")


# ------------------------------------------------------------------------------------------- bad input


def write_plain(path: Path, arch: str | None, tensors: dict[str, np.ndarray], raw_types: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(path=None, arch=arch or "x")
    if arch is None:  # stable-diffusion.cpp writes no architecture
        writer.kv_data[0].pop("general.architecture")
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_are_one_line_errors(tmp_path, capsys):
    from scripts.generate import main

    ref = diffusers_transformer("sd3.5-large")
    good = write_gguf(tmp_path / "good.gguf", stability_state(ref).items(), "Q8_0")
    data = good.read_bytes()
    cases = {}
    cases["not GGUF"] = (tmp_path / "model.gguf", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}', "not a GGUF file .*"
                         "like a safetensors file")
    cases["text"] = (tmp_path / "notes.gguf", b"hello world", "not a GGUF file")
    cases["truncated data"] = (tmp_path / "cut.gguf", data[: len(data) - 1000], "GGUF v3 file of .* tensors that "
                               "cannot be read .* truncated or corrupt")
    cases["truncated header"] = (tmp_path / "cut2.gguf", data[:200], "cannot be read .* truncated")
    for what, (path, content, message) in cases.items():
        path.write_bytes(content)
        with pytest.raises(GGUFError, match=message):
            read_gguf(path)
    matrix = np.zeros((4, 32), dtype=np.float32)
    flux = write_plain(tmp_path / "flux.gguf", "flux", {"double_blocks.0.img_attn.proj.weight": matrix})
    llm = write_plain(tmp_path / "llm.gguf", "llama", {"blk.0.attn_q.weight": matrix})
    sdcpp_flux = write_plain(tmp_path / "sdcpp.gguf", None,
                             {"model.diffusion_model.double_blocks.0.img_attn.proj.weight": matrix})
    with pytest.raises(NotSD3Error, match="holds a FLUX transformer .*general.architecture = 'flux'"):
        read_gguf(flux)
    with pytest.raises(NotSD3Error, match="holds a 'llama' model"):
        read_gguf(llm)
    with pytest.raises(NotSD3Error, match="not an SD3 .* it looks like a FLUX transformer"):
        read_gguf(sdcpp_flux).config()
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    odd = write_plain(tmp_path / "iq2.gguf", "sd3", {qkv: np.zeros((4, 66), dtype=np.uint8)}, {qkv: G.IQ2_XXS})
    with pytest.raises(GGUFError, match="stored as IQ2_XXS, which this engine does not decode"):
        read_gguf(odd)
    for path in (tmp_path / "cut.gguf", flux, odd):  # the CLI: exit status 2, one line
        argv = ["--transformer", str(path), "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert isinstance(GGUFError("x"), InputError)


def test_tiny_bench_runs_and_reports(tmp_path, capsys):
    """scripts/bench/gguf_bench.py in its smallest mode: every engine runs, agrees, and is reported."""
    import json

    from scripts.bench.gguf_bench import main

    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert main(["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--dtype", "float32",
                     "--no-memory", "--workdir", str(tmp_path / "files"), "--json", str(out), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Q")]
    assert [line.split("|")[1].strip() for line in table] == ["Q8_0", "Q4_0"]
    report = json.loads(out.read_text())
    assert set(report["times"]) == {"full", "ours Q8_0", "diffusers Q8_0", "ours Q4_0", "diffusers Q4_0"}
    assert report["max_diff"]["diffusers Q8_0"] < 2e-3 and report["max_diff"]["diffusers Q4_0"] < 2e-3
    assert report["max_diff"]["full Q8_0"] < report["max_diff"]["full Q4_0"] < 0.2  # Q4_0 rounds more
