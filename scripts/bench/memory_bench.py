"""Peak memory and speed of one MM-DiT step with float8 weights against bfloat16:
`python -m scripts.bench.memory_bench`.

1. Writes random weights shaped like SD3.5-Large (38 blocks, width 2432; `--blocks`, `--width` make it smaller)
   as one bfloat16 Stability-layout file (`model.diffusion_model.*`) under `--work` (default out/memory_bench),
   one tensor at a time so that writing needs no more memory than the largest tensor; an existing complete file
   is reused. Full size it is 16.3 GB on disk.
2. For each mode, in a fresh process so that each peak is its own: load the file (`--weights full` in bfloat16,
   or `--weights fp8` computing in bfloat16) and run one transformer step at 512x512 with batch 2 (CFG's two
   rows), 333 text tokens. The parent reads the child's peak resident size from the kernel (`os.wait4`'s
   ru_maxrss).
3. Prints a table: weight bytes as loaded, an estimate of the activations, peak RSS and its ratio to weights +
   activations, the peak while loading (before the step), seconds to load and per step, and how far the float8
   step's output is from the bfloat16 one.

The activation estimate counts the largest set of tensors alive together inside one joint block: the residual
streams, the normalised and modulated input, q, k, v, the attention output and the MLP's two 4D-wide tensors,
(8·L + 8·N)·B·D values for L = N + 333 tokens (N image tokens), batch B, width D, in the compute dtype; with fp8
also the largest layer's weight dequantised to bfloat16 (`mmdit.fp8.dequantize`, which on the CPU makes no
float32 copy). The import of torch itself (a few hundred MB) is in the peak and shown apart as "baseline";
"above baseline" divides the peak minus it by the same estimate. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmdit.model import MMDiT, MMDiTConfig
from tests.random_weights import random_tensor

PREFIX = "model.diffusion_model."
MODES = {"bf16": "full", "fp8": "fp8"}  # table name -> --weights
TEXT_TOKENS = 333  # 77 CLIP + 256 T5
REPO = Path(__file__).resolve().parents[2]  # the children run as `python -m scripts.bench.memory_bench` from here


def config_for(blocks: int, width: int) -> MMDiTConfig:
    """SD3.5-Large's architecture (64-wide heads, QK-norm, 192x192 position table) at the given depth and width."""
    if width % 64:
        raise SystemExit(f"--width {width}: must be a multiple of 64 (the heads are 64 wide)")
    return MMDiTConfig(depth=blocks, num_heads=width // 64, head_dim=64)


def checkpoint_path(work: Path, cfg: MMDiTConfig) -> Path:
    return work / f"sd3.5_large_shaped_{cfg.depth}x{cfg.dim}_bf16.safetensors"


def write_checkpoint(path: Path, cfg: MMDiTConfig, say) -> None:
    """The safetensors file written by hand (8-byte header length, JSON header, then the raw tensors in order),
    so that one tensor is in memory at a time; written to a temporary name and renamed when complete."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMDiT(cfg).state_dict().items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[PREFIX + name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors writer pads it
    tmp = path.with_suffix(".partial")
    say(f"writing {path} ({offset / 2**30:.1f} GiB, {len(shapes)} tensors)")
    g = torch.Generator().manual_seed(0)
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in shapes.items():
            f.write(random_tensor(name, shape, g).view(torch.int16).numpy().tobytes())
    tmp.rename(path)


def is_complete(path: Path, cfg: MMDiTConfig) -> bool:
    """The file exists and holds exactly the tensors this configuration needs."""
    if not path.is_file():
        return False
    from loaders.safetensors import CheckpointError, read_shapes

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MMDiT(cfg).state_dict().items()}
    try:
        return read_shapes(path, PREFIX) == expected
    except CheckpointError:
        return False


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def activations_bytes(cfg: MMDiTConfig, size: int, batch: int, fp8: bool) -> int:
    """The estimate described in the module docstring."""
    n = (size // 8 // cfg.patch_size) ** 2
    tokens = n + TEXT_TOKENS
    b = 2 * (8 * tokens + 8 * n) * batch * cfg.dim  # bfloat16
    if fp8:  # the largest linear layer, the image stream's adaLN (D -> 6D), dequantised to bfloat16
        b += 2 * 6 * cfg.dim * cfg.dim
    return b


def child(args: argparse.Namespace) -> int:
    """One mode in this process: load, one step, save the output and the figures."""
    from safetensors.torch import save_file

    from loaders.checkpoint import load_transformer, locate

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_for(args.blocks, args.width)
    baseline_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    model = load_transformer(locate(checkpoint_path(args.work, cfg)), dtype=torch.bfloat16,
                             weights=MODES[args.child])
    load_s = time.perf_counter() - t0
    load_peak_kb = status_kb("VmHWM")  # the peak so far: loading's
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    g = torch.Generator().manual_seed(1)
    latent = args.size // 8
    x = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g).to(torch.bfloat16)
    context = torch.randn(args.batch, TEXT_TOKENS, cfg.context_dim, generator=g).to(torch.bfloat16)
    pooled = torch.randn(args.batch, cfg.pooled_dim, generator=g).to(torch.bfloat16)
    t = torch.full((args.batch,), 500.0)
    times = []
    with torch.inference_mode():
        for _ in range(args.warmup):  # bf16 weights are read from the file lazily, during the first step
            model(x, t, context, pooled)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = model(x, t, context, pooled)
            times.append(time.perf_counter() - t0)
    save_file({"out": out.float().contiguous()}, str(args.work / f"out_{args.child}.safetensors"))
    result = {"mode": args.child, "weights": MODES[args.child], "weight_bytes": weight_bytes, "load_s": load_s,
              "step_s": statistics.median(times), "times": times, "baseline_kb": baseline_kb,
              "load_peak_kb": load_peak_kb,
              "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "activations_bytes": activations_bytes(cfg, args.size, args.batch, args.child == "fp8")}
    (args.work / f"result_{args.child}.json").write_text(json.dumps(result))
    return 0


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """The child for `mode`, and its peak resident size as the kernel accounted it."""
    cmd = [sys.executable, "-m", "scripts.bench.memory_bench", "--child", mode, "--work", str(args.work.resolve()),
           "--blocks", str(args.blocks), "--width", str(args.width), "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run failed (exit status {proc.returncode}): {' '.join(cmd)}")
    result = json.loads((args.work / f"result_{mode}.json").read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    return result


def compare(work: Path) -> dict:
    """The fp8 step's output against the bf16 one."""
    from safetensors.torch import load_file

    ref, out = (load_file(str(work / f"out_{m}.safetensors"))["out"] for m in ("bf16", "fp8"))
    d = out - ref
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    return {"max_abs_over_std": (d.abs().max() / ref.std()).item(), "rms_diff_over_rms": rms(d) / rms(ref),
            "rms_ratio": rms(out) / rms(ref)}


def table(results: dict[str, dict], diff: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| mode | weights MiB | activations MiB (est.) | baseline MiB | peak RSS MiB | peak / (weights + act.) "
             "| above baseline | peak while loading MiB | load s | s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        floor = r["weight_bytes"] + r["activations_bytes"]
        above = r["peak_rss_bytes"] - r["baseline_kb"] * 1024
        lines.append(f"| {mode} | {mib(r['weight_bytes'])} | {mib(r['activations_bytes'])} | "
                     f"{mib(r['baseline_kb'] * 1024)} | {mib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / floor:.2f} | {above / floor:.2f} | {mib(r['load_peak_kb'] * 1024)} | "
                     f"{r['load_s']:.1f} | {r['step_s']:.2f} |")
    b, f = results["bf16"], results["fp8"]
    lines += ["", f"fp8 / bf16: peak RSS {f['peak_rss_bytes'] / b['peak_rss_bytes']:.3f}, weights "
              f"{f['weight_bytes'] / b['weight_bytes']:.3f}, time per step {f['step_s'] / b['step_s']:.3f}",
              f"fp8 output vs bf16: max|diff| / std {diff['max_abs_over_std']:.3e}, rms(diff) / rms "
              f"{diff['rms_diff_over_rms']:.3e}, rms(fp8) / rms(bf16) {diff['rms_ratio']:.4f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("out/memory_bench"), help="where the weights file and results go")
    p.add_argument("--blocks", type=int, default=38, help="joint blocks (SD3.5-Large: 38)")
    p.add_argument("--width", type=int, default=2432, help="model width, a multiple of 64 (SD3.5-Large: 2432)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 16")
    p.add_argument("--batch", type=int, default=2, help="rows per step (2: CFG)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (bf16 weights are paged in during "
                                                           "the first one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)  # internal: one mode's run
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.size % 16 or args.blocks < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--size must be a multiple of 16, --blocks and --steps at least 1, --warmup at least 0")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    cfg = config_for(args.blocks, args.width)
    args.work.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(args.work, cfg)
    if is_complete(path, cfg):
        say(f"reusing {path}")
    else:
        write_checkpoint(path, cfg, say)
    results = {}
    for mode in MODES:
        say(f"{mode}: loading and one step at {args.size}x{args.size}, batch {args.batch} ...")
        results[mode] = run_mode(mode, args)
    diff = compare(args.work)
    print(f"## One MM-DiT step, {cfg.depth} blocks, width {cfg.dim}, {args.size}x{args.size}, batch {args.batch}, "
          f"bfloat16 compute; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads\n")
    print(table(results, diff))
    if args.json:
        args.json.write_text(json.dumps({"blocks": cfg.depth, "width": cfg.dim, "size": args.size,
                                         "batch": args.batch, "file": str(path), "file_bytes": path.stat().st_size,
                                         "results": results, "fp8_vs_bf16": diff, "torch": torch.__version__},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
