"""The whole command, end to end, per dtype: `python -m scripts.bench.e2e_bench`.

Writes (once, under `--work`) a random SD3.5-Large-width single file, `--blocks` joint blocks and the full-size
16-channel VAE, and a `--prompt-embeds` file of the right shapes (333 text tokens, CFG), then times
`scripts/generate.py` from the embeddings at 512x512 with 2 steps, in a fresh process per run, the settings
alternating (float32, bfloat16, ..., then float32, ... back) so that drift in machine load cancels. Each run's
wall time includes Python start-up, loading, sampling, the VAE decode and writing the PNG; each also reports
the time the run spent in the VAE (the stage's seconds from `--report-memory`).

`--compile` instead measures `Pipeline.load(compile=True)` against eager in one process per dtype, weights kept
loaded: the sampling stage's seconds (2 steps with CFG; the VAE is not compiled) of the first call, which
compiles the blocks, and the median of the later calls, and how far the compiled latents are from the eager ones.

Settings: `float32`; `bfloat16, VAE float32` (`--vae-dtype float32`); and `bfloat16` (the default: the VAE in
bfloat16 too, as diffusers runs it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmdit.model import MMDiT, MMDiTConfig
from mmdit.vae import VAE, VAEConfig
from tests.random_weights import randomize_

GENERATE = Path(__file__).resolve().parents[1] / "generate.py"  # the user's command, as a user runs it
SETTINGS = {"float32": ["--dtype", "float32"], "bfloat16, VAE float32": ["--dtype", "bfloat16", "--vae-dtype", "float32"],
            "bfloat16": ["--dtype", "bfloat16"]}


def write_inputs(work: Path, blocks: int) -> tuple[Path, Path]:
    model, embeds = work / f"sd3.5_large_width_{blocks}blocks.safetensors", work / "embeds.safetensors"
    if not model.is_file():
        work.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            mmdit = randomize_(MMDiT(MMDiTConfig(depth=blocks, num_heads=38, head_dim=64)), g)
            vae = randomize_(VAE(VAEConfig()), g)
        tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in mmdit.state_dict().items()}
        tensors.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()})
        save_file(tensors, str(model.with_suffix(".partial")))
        model.with_suffix(".partial").replace(model)
        g = torch.Generator().manual_seed(1)
        save_file({"prompt_embeds": torch.randn(1, 333, 4096, generator=g),
                   "pooled_prompt_embeds": torch.randn(1, 2048, generator=g),
                   "negative_prompt_embeds": torch.randn(1, 333, 4096, generator=g),
                   "negative_pooled_prompt_embeds": torch.randn(1, 2048, generator=g)}, str(embeds))
    return model, embeds


def run_once(model: Path, embeds: Path, extra: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds of its VAE stage)."""
    command = [sys.executable, str(GENERATE), "--model", str(model), "--prompt-embeds",
               str(embeds), "--steps", "2", "--cfg", "4.5", "--height", "512", "--width", "512", "--slg-layers", "",
               "--device", "cpu", "--out", str(out), "--overwrite", "--quiet", "--report-memory", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    vae = next(line for line in done.stdout.splitlines() if line.startswith("| VAE"))
    return wall, float(vae.strip(" |").split("|")[-1])


def compile_table(model: Path, embeds: Path, repeats: int) -> str:
    from loaders import Pipeline
    from loaders.memory import MemoryLog
    from loaders.text import conditioning_from_embeds
    from safetensors.torch import load_file

    positive, negative = conditioning_from_embeds(load_file(str(embeds)), cfg_on=True)
    rows = ["| dtype | eager s (2 steps) | compiled: first call s | compiled s | compiled / eager | max diff / scale |",
            "|---|---:|---:|---:|---:|---:|"]
    for dtype in (torch.float32, torch.bfloat16):
        call = dict(prompt_embeds=positive, negative_embeds=negative, steps=2, cfg=4.5, height=512, width=512,
                    slg_layers=())
        runs = {}
        for compiled in (False, True):
            pipe = Pipeline.load(model, dtype=dtype, device="cpu", keep_loaded=True, compile=compiled)
            times, latents = [], None
            for _ in range(repeats + 1):
                log = MemoryLog()  # for the sampling stage's seconds: the VAE decode is not compiled
                latents = pipe(**call, memory=log).latents
                times.append(next(s.seconds for s in log.stages if s.stage == "sampling"))
            runs[compiled] = (times[0], statistics.median(times[1:]), latents.float())
        eager, comp = runs[False], runs[True]
        diff = ((comp[2] - eager[2]).abs().max() / eager[2].abs().max()).item()
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {eager[1]:.1f} | {comp[0]:.1f} | {comp[1]:.1f} | "
                    f"{comp[1] / eager[1]:.2f} | {diff:.1e} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("out/e2e_bench"))
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (default 3)")
    p.add_argument("--compile", action="store_true", help="compiled against eager instead (see above)")
    args = p.parse_args(argv)
    model, embeds = write_inputs(args.work, args.blocks)
    if args.compile:
        print(compile_table(model, embeds, args.repeats))
        return 0
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    for r in range(args.repeats):
        for name in (list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))):
            times[name].append(run_once(model, embeds, SETTINGS[name], args.work / "image.png"))
            print(f"  {name}: {times[name][-1][0]:.1f} s", file=sys.stderr, flush=True)
    base = statistics.median(t for t, _ in times["float32"])
    print(f"| setting (SD3.5-Large width, {args.blocks} blocks, 512x512, 2 steps, CFG) | whole command, s | of which "
          "VAE, s | vs float32 |\n|---|---:|---:|---:|")
    for name, runs in times.items():
        wall, vae = statistics.median(t for t, _ in runs), statistics.median(v for _, v in runs)
        print(f"| {name} | {wall:.1f} | {vae:.1f} | {wall / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
