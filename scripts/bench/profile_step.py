"""Where one MM-DiT step's time goes, ours and diffusers': `python -m scripts.bench.profile_step`.

The models and inputs of `scripts/bench/bench.py` (SD3.5-Large width or `--width medium`, `--blocks` 2, 512x512,
batch 2; the same random
weights in both engines), one warm-up call each, then `--calls` calls under `torch.profiler` (CPU). Each operator's
own time (not counting the operators it calls) goes to one of: GEMM (matrix products: addmm, mm, bmm, linear's
kernels), attention (the fused scaled-dot-product kernels), copies (copy_, clone, cat, contiguous, layout changes)
and element-wise (everything else: norms, modulation, GELU, residual adds and gates). The GEMM row also gives its
achieved GFLOP/s (the profiler's FLOP count of the matrix products over their time) against the machine's matmul
rate measured in the same run on the step's largest product alone (the MLP's, in the same dtype), the "roofline
share". The profiler slows every operator down, so the seconds here are not the step's: `scripts/bench/bench.py` times
it; this says where the time goes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from scripts.bench.bench import TINY, WIDTHS, Shape, diffusers_model, make_inputs, ours_from

CATEGORIES = (
    ("GEMM", ("addmm", "aten::mm", "bmm", "matmul", "linear", "mkldnn_", "_mm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("copies", ("copy_", "clone", "aten::cat", "contiguous", "_to_copy", "aten::to", "permute", "transpose",
                "reshape", "view", "expand", "split", "chunk", "select", "slice", "unbind", "unflatten")),
)


def category(name: str) -> str:
    return next((label for label, keys in CATEGORIES if any(k in name for k in keys)), "element-wise")


def matmul_peak(dtype: torch.dtype, rows: int, width: int) -> float:
    """GFLOP/s of the step's largest product, the MLP's (rows, D) x (D, 4D) `F.linear`, alone (best of 5)."""
    x, w = torch.randn(rows, width).to(dtype), torch.randn(4 * width, width).to(dtype)
    F.linear(x, w)
    best = min(_timed(lambda: F.linear(x, w)) for _ in range(5))
    return 2 * rows * width * 4 * width / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_call(fn, calls: int) -> dict[str, tuple[float, float]]:
    """Category -> (seconds per call, GFLOP per call) from the operators' self times."""
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(calls):
            fn()
    totals: dict[str, list[float]] = {}
    for event in prof.key_averages():
        seconds, flops = event.self_cpu_time_total / 1e6 / calls, (event.flops or 0) / calls / 1e9
        entry = totals.setdefault(category(event.key), [0.0, 0.0])
        entry[0] += seconds
        entry[1] += flops
    return {k: (v[0], v[1]) for k, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="profiled calls per engine (default 2)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--width", default="large", choices=sorted(WIDTHS),
                   help="SD3.5-Large's (38 heads x 64) or SD3.5-Medium's (24 x 64, dual attention in block 0)")
    p.add_argument("--tiny", action="store_true", help="a tiny width at 64x64, to check the script in seconds")
    args = p.parse_args(argv)
    width, size = ("tiny", 64) if args.tiny else (args.width, 512)
    shape = Shape(blocks=args.blocks, size=size, batch=2, width_name=width, **(TINY if args.tiny else WIDTHS[width]))
    theirs = diffusers_model(shape, seed=0)
    x, t, context, pooled = make_inputs(shape, seed=1)
    print("| width | engine | dtype | s/step | GEMM | attention | element-wise | copies | GEMM GFLOP/s | matmul peak | roofline share |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.dtypes.split(","):  # float32 first: each cast rounds the float32 weights once
        dtype = getattr(torch, name)
        peak = matmul_peak(dtype, shape.batch * (shape.image_tokens + shape.text_tokens), shape.num_heads * shape.head_dim)
        ref = theirs.to(dtype)
        ours = ours_from(ref, dtype)
        inputs = (x.to(dtype), t, context.to(dtype), pooled.to(dtype))  # t stays float32, as the samplers pass it
        engines = {
            "ours": lambda: ours(*inputs),
            "diffusers": lambda: ref(hidden_states=inputs[0], timestep=inputs[1], encoder_hidden_states=inputs[2],
                                     pooled_projections=inputs[3], return_dict=False)[0],
        }
        with torch.inference_mode():
            for engine, fn in engines.items():
                parts = profile_call(fn, args.calls)
                total = sum(s for s, _ in parts.values())
                share = {k: parts.get(k, (0.0, 0.0))[0] / total for k in ("GEMM", "attention", "element-wise", "copies")}
                gemm_s, gemm_gflop = parts.get("GEMM", (0.0, 0.0))
                rate = gemm_gflop / gemm_s if gemm_s else 0.0
                print(f"| {width} | {engine} | {name} | {total:.2f} | {share['GEMM']:.0%} | {share['attention']:.0%} | "
                      f"{share['element-wise']:.0%} | {share['copies']:.0%} | {rate:.0f} | {peak:.0f} | "
                      f"{rate / peak:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
