#!/usr/bin/env python
"""Our GGUF MM-DiT step next to diffusers' GGUF step and next to our own full-precision step, on the same random
weights quantised to Q8_0 and Q4_0, all engines in one run; and the peak resident memory of each.

    python -m scripts.bench.gguf_bench                       # SD3.5-Large width, 2 blocks, 512x512, CFG (batch 2)
    python -m scripts.bench.gguf_bench --dtype float32       # on CPUs without bfloat16 matrix units
    python -m scripts.bench.gguf_bench --tiny --repeats 1    # seconds: a tiny config, to check the script works

One random diffusers `SD3Transformer2DModel` (SD3.5-Large's width: 38 heads x 64 = 2432, RMS QK-norm, a 192 x 192
position table; `--blocks` deep) is written as GGUF files by the converter's rules (`loaders.gguf.write_gguf`:
the joint blocks' matrices in the type, the rest in 16 or 32 bits). Per type, our `load_gguf_transformer` and
diffusers' `SD3Transformer2DModel.from_single_file(..., GGUFQuantizationConfig(compute_dtype))` load the same
file; our plain MMDiT holds the unquantised weights in `--dtype` (the "full" step). Every engine computes in
`--dtype` on the same inputs (the first call is the output check), then all are timed in rounds under
`torch.inference_mode()`, the order reversed every other round so that drift in the machine's load cancels.
Ratios are medians over rounds of the per-round ratio (ours / diffusers, ours / full): each round's steps ran
within seconds of each other. The same ratios of CPU seconds (this process, all threads) are printed beside
them: on a machine that other jobs share they say how much work each step did, while the wall clock also
says how long it waited.

Memory (`--no-memory` skips it): each engine in a fresh process (Linux /proc): the peak resident size while it
loads and runs two steps, over the resident size before loading (`clear_refs` resets the peak there), next to
the bytes of its weights. The full step's activations are its peak over its resident size just before the step.
The goal for our GGUF engine: peak <= 1.15 x (its weight bytes + the full step's activations).

Prints Markdown tables (docs/gguf.md); `--json FILE` writes every timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from loaders.pipeline import DTYPES
from scripts.bench.bench import Shape  # the same benchmarked shape as the step benchmark

TYPES = ("Q8_0", "Q4_0")
MEMORY_GOAL = 1.15  # peak <= this x (weight bytes + activations)


LARGE = Shape(blocks=2, num_heads=38, head_dim=64, context_dim=4096, pooled_dim=2048, pos_embed_max_size=192,
              size=512, text_tokens=333, batch=2)
TINY = Shape(blocks=2, num_heads=2, head_dim=32, context_dim=64, pooled_dim=48, pos_embed_max_size=16, size=64,
             text_tokens=9, batch=2)


# ---------------------------------------------------------------------------------------------- engines


def diffusers_model(shape: Shape, seed: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    from tests._fixtures import randomize_

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=shape.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=shape.blocks,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.num_heads, joint_attention_dim=shape.context_dim,
        caption_projection_dim=shape.num_heads * shape.head_dim, pooled_projection_dim=shape.pooled_dim,
        pos_embed_max_size=shape.pos_embed_max_size, qk_norm="rms_norm",
    )
    return randomize_(model, seed).requires_grad_(False)


def write_files(shape: Shape, types: list[str], folder: Path, seed: int) -> dict[str, Path]:
    """The random model as one GGUF file per type, a float32 safetensors file and its diffusers config."""
    from safetensors.torch import save_file

    from loaders.gguf import write_gguf
    from loaders.transformer_keys import transformer_from_diffusers

    model = diffusers_model(shape, seed)
    model.save_config(folder / "config")
    state = transformer_from_diffusers(model.state_dict())
    del model
    files = {"full": folder / "full.safetensors"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["full"]))
    for t in types:
        files[t] = write_gguf(folder / f"model-{t}.gguf", state.items(), t)
    return files


def load_engine(kind: str, files: dict[str, Path], dtype: torch.dtype) -> nn.Module:
    """`full` (our MMDiT, unquantised, in `dtype`), `ours Q8_0`, `diffusers Q8_0`, ..."""
    from loaders.checkpoint import Checkpoint, load_transformer

    if kind == "full":
        return load_transformer(Checkpoint(files["full"], single_file=True), dtype=dtype)
    engine, qtype = kind.split()
    if engine == "ours":
        from loaders.gguf import load_gguf_transformer, read_gguf

        return load_gguf_transformer(read_gguf(files[qtype]), dtype=dtype)
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    return SD3Transformer2DModel.from_single_file(
        str(files[qtype]), config=str(files["full"].parent / "config"), torch_dtype=dtype,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype)).eval()


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, 16, shape.latent, shape.latent, generator=g)
    context = torch.randn(shape.batch, shape.text_tokens, shape.context_dim, generator=g)
    pooled = torch.randn(shape.batch, shape.pooled_dim, generator=g)
    t = torch.linspace(1000.0, 387.5, shape.batch)
    return x.to(dtype), t, context.to(dtype), pooled.to(dtype)


def step_fn(kind: str, model: nn.Module, inputs) -> Callable[[], Tensor]:
    x, t, context, pooled = inputs
    if kind.startswith("diffusers"):
        return lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                             return_dict=False)[0]
    return lambda: model(x, t, context, pooled)


def weight_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------------------------- timing


def timed_rounds(steps: dict[str, Callable[[], Tensor]], repeats: int, warmup: int,
                 say: Callable[[str], None]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each engine once per round; the order reversed every other round (a, b, c, c, b, a, ...). Returns the wall
    seconds and the CPU seconds (this process, all threads) of every step."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        say(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in names))
    return wall, cpu


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# ---------------------------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _probe(kind: str, files: dict[str, Path], dtype_name: str, shape: Shape, threads: int | None) -> dict:
    """In a fresh process: the peak resident size of loading `kind` and running two steps, over the resident size
    before loading; and, for the last step alone, its peak over the resident size before it (the activations)."""
    if threads:
        torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype)
    import diffusers  # noqa: F401  (imported before the base, as the timing process has it)

    import loaders.gguf  # noqa: F401

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    model = load_engine(kind, files, dtype)
    step = step_fn(kind, model, inputs)
    with torch.inference_mode():
        step()
        gc.collect()
        before_step = _status("VmRSS")
        peak_load_and_steps = _status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        step_peak = _status("VmHWM")
    return {"kind": kind, "weight_bytes": weight_bytes(model), "base": base,
            "peak_rise": max(peak_load_and_steps, step_peak) - base, "step_rise": step_peak - before_step}


def memory(kinds: list[str], files: dict[str, Path], dtype_name: str, shape: Shape, threads: int | None,
           say: Callable[[str], None]) -> list[dict]:
    import multiprocessing

    if not os.access("/proc/self/clear_refs", os.W_OK):
        say("  peak memory needs Linux's /proc/self/clear_refs, which is not writable here: skipped")
        return []
    rows = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for kind in kinds:
            say(f"  memory: {kind} ...")
            rows.append(pool.apply(_probe, (kind, files, dtype_name, shape, threads)))
    return rows


# ---------------------------------------------------------------------------------------------- report


def environment() -> dict:
    import platform
    from importlib.metadata import version

    import diffusers

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "gguf": version("gguf"),
            "threads": torch.get_num_threads(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def markdown(wall: dict[str, list[float]], cpu: dict[str, list[float]], types: list[str], diffs: dict[str, float],
             dtype: str) -> str:
    """Wall-clock medians and per-round ratios; the same ratios of CPU seconds (work done, whoever else runs)."""
    med = {k: statistics.median(v) for k, v in wall.items()}
    rows = [f"| type | ours s/step | diffusers s/step | full ({dtype}) s/step | ours / diffusers (goal <= 0.80) "
            "| ours / full (goal <= 1.25) | CPU s: ours / diffusers | CPU s: ours / full "
            "| max diff ours vs diffusers / scale | ours vs full / scale |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in types:
        o, d = f"ours {t}", f"diffusers {t}"
        rows.append(f"| {t} | {med[o]:.2f} | {med[d]:.2f} | {med['full']:.2f} | **{paired(wall, o, d):.3f}** "
                    f"| **{paired(wall, o, 'full'):.3f}** | {paired(cpu, o, d):.3f} | {paired(cpu, o, 'full'):.3f} "
                    f"| {diffs[d]:.1e} | {diffs['full ' + t]:.1e} |")
    return "\n".join(rows)


def memory_markdown(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    full = next((r for r in rows if r["kind"] == "full"), None)
    activations = full["step_rise"] if full else 0
    lines = ["| engine | weight MiB | peak MiB (load + 2 steps) | one step's peak MiB | peak / (weights + "
             "activations) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        bound = r["weight_bytes"] + activations
        lines.append(f"| {r['kind']} | {mib(r['weight_bytes'])} | {mib(r['peak_rise'])} | {mib(r['step_rise'])} "
                     f"| {r['peak_rise'] / bound:.2f} |")
    lines.append(f"\nActivations: the full step's peak over its resident size before the step, {mib(activations)} "
                 f"MiB. Goal for ours: <= {MEMORY_GOAL}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny config (seconds), to check the script works")
    p.add_argument("--blocks", type=int, help="joint blocks (default 2)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="compute dtype of every engine")
    p.add_argument("--types", default=",".join(TYPES), help="GGUF types, comma-separated (default Q8_0,Q4_0)")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first calls")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-engine peak memory")
    p.add_argument("--workdir", type=Path, help="where the model files go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the environment, shape and every timing here")
    p.add_argument("--quiet", action="store_true", help="no progress messages (stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = TINY if args.tiny else LARGE
    if args.blocks:
        shape = Shape(**{**asdict(shape), "blocks": args.blocks})
    types = [t for t in args.types.split(",") if t]
    dtype = DTYPES[args.dtype]
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        say(f"writing the random model ({shape.num_heads * shape.head_dim} wide, {shape.blocks} blocks) as "
            f"{', '.join(types)} ...")
        files = write_files(shape, types, folder, seed=0)
        inputs = make_inputs(shape, dtype)
        kinds = ["full", *[f"{e} {t}" for t in types for e in ("ours", "diffusers")]]
        steps, outputs, first = {}, {}, {}
        with torch.inference_mode():
            for kind in kinds:
                say(f"loading {kind} ...")
                model = load_engine(kind, files, dtype)
                steps[kind] = step_fn(kind, model, inputs)
                start = time.perf_counter()
                outputs[kind] = steps[kind]().float()
                first[kind] = time.perf_counter() - start
            diffs = {}
            for t in types:
                ours, theirs, full = outputs[f"ours {t}"], outputs[f"diffusers {t}"], outputs["full"]
                diffs[f"diffusers {t}"] = ((ours - theirs).abs().max() / theirs.abs().max()).item()
                diffs[f"full {t}"] = ((ours - full).abs().max() / full.abs().max()).item()
            say(f"timing {args.repeats} rounds of {len(kinds)} steps ...")
            times, cpu_times = timed_rounds(steps, args.repeats, args.warmup, say)
        del steps, outputs
        gc.collect()
        rows = [] if args.no_memory else memory(["full", *[f"ours {t}" for t in types],
                                                 *[f"diffusers {t}" for t in types]],
                                                files, args.dtype, shape, args.threads, say)
        file_bytes = {t: files[t].stat().st_size for t in types}
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, gguf {env['gguf']}, {env['threads']} threads, "
          f"{env['cpu']} ({env['cpu_capability']}); load average {env['load_average']} -> "
          f"{env['load_average_end']}")
    print(f"\n## One step, {shape.num_heads * shape.head_dim} wide, {shape.blocks} blocks, {shape.size}x{shape.size}, "
          f"batch {shape.batch}, {args.dtype}\n")
    print(markdown(times, cpu_times, types, diffs, args.dtype))
    if rows:
        print("\n## Peak resident memory\n")
        print(memory_markdown(rows))
    if args.json:
        report = {"environment": env, "shape": asdict(shape), "dtype": args.dtype, "types": types,
                  "repeats": args.repeats, "warmup": args.warmup, "first_call": first, "times": times,
                  "cpu_times": cpu_times, "max_diff": diffs, "memory": rows, "file_bytes": file_bytes}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
