"""Seconds per step and per-stage peak memory of each memory mode, on random SD3.5-Large-shaped weights.

`bash scripts/bench/gpu_check.sh` runs this (`python -m scripts.bench.gpu_check` from the repository root). It
writes random weights with SD3.5-Large's shapes (MM-DiT 8.1 B parameters, T5-XXL, CLIP-L, CLIP-G, the VAE; about
28 GB in bfloat16, once, into --work), then generates one 1024x1024 image per (mode, dtype) — modes none, fp8, blocks
(--offload blocks), both (fp8 + blocks); dtypes bfloat16 and float16 — each in a fresh process (`--child`), so no
run inherits another's memory, and prints one table: the median seconds per step (step 1, which pays for one-time
set-up, left out) and each stage's peak device memory (`loaders.memory`). Random weights make no picture; they cost
what the real ones cost.

`--device cpu` is the fallback that keeps this script working where there is no GPU (the test suite runs it):
tiny widths, a 32x32 image, 2 steps, every row in this one process, and the peak resident memory so far in
place of device memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmdit.clip import CLIPConfig, CLIPTextModel
from mmdit.model import MMDiT, MMDiTConfig
from mmdit.t5 import T5Config, T5Encoder
from mmdit.vae import VAE, VAEConfig

# name -> (--weights, --offload)
MODES = {"none": ("full", "none"), "fp8": ("fp8", "none"), "blocks": ("full", "blocks"), "both": ("fp8", "blocks")}
DTYPES = ("bfloat16", "float16")
STAGES = ("CLIP-L", "CLIP-G", "T5", "sampling", "VAE")
PROMPT = "a red fox in the snow"
MODEL_FILE = "sd3.5_large_random.safetensors"
REPO = Path(__file__).resolve().parents[2]  # the children run as `python -m scripts.bench.gpu_check` from here


@dataclass(frozen=True)
class Shapes:
    transformer: MMDiTConfig
    clip_l: CLIPConfig
    clip_g: CLIPConfig
    t5: T5Config
    vae: VAEConfig


# The released shapes (docs/numerics.md §8, §9.1, §10).
LARGE = Shapes(
    MMDiTConfig(depth=38, num_heads=38, head_dim=64, pos_embed_max_size=192, qk_norm=True),
    CLIPConfig(vocab_size=49408, width=768, num_layers=12, num_heads=12, mlp_width=3072, max_positions=77,
               projection_dim=768, activation="quick_gelu"),
    CLIPConfig(vocab_size=49408, width=1280, num_layers=32, num_heads=20, mlp_width=5120, max_positions=77,
               projection_dim=1280, activation="gelu"),
    T5Config(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, num_buckets=32),
    VAEConfig(),
)
# The same architecture at widths two CPU cores run in seconds (heads stay 64 wide, as in every release).
TINY = Shapes(
    MMDiTConfig(depth=3, num_heads=2, head_dim=64, pos_embed_max_size=16, context_dim=64, pooled_dim=64 + 128),
    CLIPConfig(vocab_size=1024, width=64, num_layers=2, num_heads=1, mlp_width=128, max_positions=77,
               projection_dim=64, activation="quick_gelu"),
    CLIPConfig(vocab_size=1024, width=128, num_layers=2, num_heads=2, mlp_width=256, max_positions=77,
               projection_dim=128, activation="gelu"),
    T5Config(vocab_size=1024, d_model=64, d_ff=128, num_layers=2, num_heads=1, d_kv=64, num_buckets=32),
    VAEConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), num_res_blocks=1),
)


def random_state(module_type, config, seed: int, device: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """bfloat16 random tensors (on the CPU) with the module's names and shapes, drawn as memory_bench.py draws
    its SD3.5-Large-shaped MM-DiT (`tests.random_weights.random_tensor`), on `device`: a GPU draws SD3.5-Large's
    13.7 B values in seconds, a CPU core needs minutes. memory_bench's writer makes the MM-DiT file alone; this
    check also needs the VAE inside that file and the text encoders beside it, so the files are assembled here."""
    from tests.random_weights import random_tensor

    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in module_type(config).state_dict().items()}
    g = torch.Generator(device).manual_seed(seed)
    with torch.device(device):  # random_tensor's torch.randn draws on the default device
        return {prefix + k: random_tensor(k, shape, g).cpu().contiguous() for k, shape in shapes.items()}


def write_weights(folder: Path, shapes: Shapes, device: str) -> Path:
    """The Stability layout (single file + text_encoders/ + tokenizer folders); reused when already complete."""
    from safetensors.torch import save_file

    from scripts.builtin.tokenizers import write_builtin_tokenizers

    model, done = folder / MODEL_FILE, folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"shapes": repr(shapes)}:
        return model
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    clip_l = random_state(CLIPTextModel, shapes.clip_l, 1, device)
    del clip_l["text_projection.weight"]  # as Stability ships CLIP-L (docs/numerics.md §8.1)
    encoders = folder / "text_encoders"
    save_file(clip_l, str(encoders / "clip_l.safetensors"))
    save_file(random_state(CLIPTextModel, shapes.clip_g, 2, device), str(encoders / "clip_g.safetensors"))
    save_file(random_state(T5Encoder, shapes.t5, 3, device), str(encoders / "t5xxl_fp16.safetensors"))
    state = random_state(MMDiT, shapes.transformer, 4, device, "model.diffusion_model.")
    state.update(random_state(VAE, shapes.vae, 5, device, "first_stage_model."))
    save_file(state, str(model))
    del state
    write_builtin_tokenizers(folder)  # small vocabularies: their ids index the first rows of the embeddings
    done.write_text(json.dumps({"shapes": repr(shapes)}))
    return model


def run_one(model: Path, mode: str, dtype: str, device: str, steps: int, size: int) -> dict:
    """One image in this process: seconds per step and every stage's memory, as a JSON-able dict."""
    from loaders import Pipeline
    from loaders.memory import MemoryLog
    from loaders.pipeline import DTYPES as TORCH_DTYPES
    from mmdit.errors import InputError

    weights, offload = MODES[mode]
    options = dict(dtype=TORCH_DTYPES[dtype], device=device, offload=offload, weights=weights)
    cuda = torch.device(device).type == "cuda"
    ticks: list[float] = []

    def tick(step: int, latents: torch.Tensor) -> None:
        if cuda:
            torch.cuda.synchronize(device)  # kernels are asynchronous: time what has run, not what was queued
        ticks.append(time.perf_counter())

    log, error = MemoryLog(), None
    try:
        Pipeline.load(model, **options)(PROMPT, steps=steps, height=size, width=size, callback=tick, memory=log)
    except InputError as e:  # float16 overflow ends in this, before decoding
        error = str(e)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    return {"s_per_step": statistics.median(gaps) if gaps else None, "error": error,
            "stages": [asdict(s) for s in log.stages]}


def _gb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def table(rows: list[dict], device: str) -> str:
    """One row per (mode, dtype); the stage columns are peak device memory (CPU: peak resident memory so far)."""
    peak = f"peak {device} allocated" if device.startswith("cuda") else "peak RSS of the process so far"
    lines = [f"Per stage: {peak}, GB (10^9 bytes).", "", f"| mode | dtype | s/step | {' | '.join(STAGES)} | note |",
             "|---|---|---:|" + "---:|" * len(STAGES) + "---|"]
    for r in rows:
        stages = {s["stage"]: s for s in r.get("stages", [])}
        peaks = [_gb(stages[n]["device_peak"] if stages[n]["device_peak"] is not None else stages[n]["rss_peak"])
                 if n in stages else "–" for n in STAGES]
        step = "–" if r.get("s_per_step") is None else f"{r['s_per_step']:.3f}"
        lines.append(f"| {r['mode']} | {r['dtype']} | {step} | {' | '.join(peaks)} | {r.get('error') or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny widths, 32x32, 2 steps)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sd3-gpu-check"), help="where the random weights go")
    p.add_argument("--steps", type=int, help="steps per image (default 4 on a GPU, 2 on the CPU)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {list(DTYPES)}")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = torch.device(args.device).type == "cpu"
    steps, size = args.steps or (2 if cpu else 4), 32 if cpu else 1024
    model = args.work / ("tiny" if cpu else "large") / MODEL_FILE
    if args.child:  # one measurement, in this fresh process; the parent reads the last line
        print(json.dumps(run_one(model, *args.child, args.device, steps, size)))
        return 0
    modes, dtypes = args.modes.split(","), args.dtypes.split(",")
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(dtypes) - set(DTYPES))
    if unknown:
        p.error(f"unknown mode(s) / dtype(s) {unknown}; modes are {list(MODES)}, dtypes {list(DTYPES)}")
    if not cpu and not torch.cuda.is_available():
        p.error("no CUDA device here; --device cpu runs the tiny fallback")
    write_weights(model.parent, TINY if cpu else LARGE, args.device)
    rows = []
    for dtype in dtypes:
        for mode in modes:
            if cpu:  # the smoke test: in this process (its resident-memory peaks then only ever grow)
                rows.append({"mode": mode, "dtype": dtype, **run_one(model, mode, dtype, args.device, steps, size)})
                continue
            cmd = [sys.executable, "-m", "scripts.bench.gpu_check", "--child", mode, dtype, "--device", args.device,
                   "--work", str(args.work.resolve()), "--steps", str(steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:  # a crash (out of memory, a bug): its last line says what
                rows.append({"mode": mode, "dtype": dtype, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append({"mode": mode, "dtype": dtype, **json.loads(done.stdout.strip().splitlines()[-1])})
    name = torch.cuda.get_device_name(args.device) if not cpu else "CPU"
    print(f"{name}, torch {torch.__version__}, {size}x{size}, {steps} steps, SD3.5-Large preset (CFG batch 2)"
          + ("" if not cpu else "; tiny widths"))
    print(table(rows, args.device))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": size, "steps": steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
