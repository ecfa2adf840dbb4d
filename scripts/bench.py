#!/usr/bin/env python
"""Our MM-DiT's step time next to diffusers' SD3Transformer2DModel: same weights, same inputs, one run.

    python scripts/bench.py                      # SD3.5-Large width, 2 blocks, 512x512, batch 2, fp32 and bf16
    python scripts/bench.py --tiny --repeats 1   # seconds: a tiny config, to check the script works

One random diffusers transformer is built at SD3.5-Large width (D = 2432 = 38 heads x 64, RMS QK-norm),
`--blocks` deep, and its weights are mapped into our MMDiT through the production key map and loader, sharing
every tensor the map does not have to rebuild. Per dtype both models are cast, each engine runs once on the
same inputs (that output is the correctness check: max |ours - diffusers| / max |diffusers|), warms up, then
the two are timed in interleaved repetitions under `torch.inference_mode()`. The order alternates
(ours, diffusers, diffusers, ours, ...) so that drift in machine load and "who ran first" cancel. The ratio is
median(ours) / median(diffusers): below 1.00 means our step is faster. The paired ratio (median over back-to-back
pairs of ours / diffusers) is the one to trust on a busy machine; every pair also records how much CPU other
processes took meanwhile (Linux /proc), and `--wait-idle S` waits for quiet and redoes disturbed pairs.

Prints a Markdown table for the README; `--json FILE` writes every timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """The benchmarked transformer and its inputs."""

    blocks: int
    num_heads: int
    head_dim: int
    context_dim: int  # T5-XXL width
    pooled_dim: int  # CLIP-L + CLIP-G
    pos_embed_max_size: int
    size: int  # image pixels per side; the latent is size / 8
    text_tokens: int  # 77 CLIP + 256 T5 in the pipelines
    batch: int  # 2 = one prompt with classifier-free guidance

    @property
    def latent(self) -> int:
        return self.size // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent // 2) ** 2


# SD3.5-Large: 38 heads x 64, QK RMS norm, a 192 x 192 position table (sd3-reference-and-comfyui.md §1.3).
LARGE = dict(num_heads=38, head_dim=64, context_dim=4096, pooled_dim=2048, pos_embed_max_size=192, text_tokens=333)
TINY = dict(num_heads=2, head_dim=16, context_dim=64, pooled_dim=48, pos_embed_max_size=16, text_tokens=9)


@dataclass(frozen=True)
class Timing:
    times: list[float]  # seconds per call, in the order measured

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


@dataclass(frozen=True)
class Result:
    case: str
    dtype: str
    ours: Timing
    reference: Timing
    reference_name: str
    max_diff: float  # max |ours - reference| / max |reference|
    others_load: list[float]  # per timed pair: fraction of the CPUs other processes used meanwhile

    @property
    def ratio(self) -> float:
        return self.ours.median / self.reference.median

    @property
    def ratio_min(self) -> float:
        return self.ours.min / self.reference.min

    @property
    def paired_ratio(self) -> float:
        """Median over pairs of ours / reference: each pair ran back to back, under nearly the same load."""
        return statistics.median(o / r for o, r in zip(self.ours.times, self.reference.times))

    @property
    def contended(self) -> int:
        return sum(load > BUSY for load in self.others_load)

    def to_json(self) -> dict:
        timing = lambda t: {"median": t.median, "min": t.min, "times": t.times}  # noqa: E731
        return {
            "case": self.case, "dtype": self.dtype, "ours": timing(self.ours), "reference": timing(self.reference),
            "reference_name": self.reference_name, "ratio": self.ratio, "ratio_min": self.ratio_min,
            "paired_ratio": self.paired_ratio, "max_diff": self.max_diff, "others_load": self.others_load,
        }


@dataclass(frozen=True)
class Case:
    """One timed comparison: two zero-argument callables on the same weights and inputs, each returning the
    output tensor. `reference` need not be diffusers (e.g. our plain step as the baseline of a modulated one)."""

    name: str
    ours: Callable[[], Tensor]
    reference: Callable[[], Tensor]
    reference_name: str = "diffusers"


@dataclass(frozen=True)
class Engines:
    """Both transformers in one dtype, and the inputs they share."""

    ours: nn.Module
    theirs: nn.Module
    x: Tensor  # (B, 16, h, w) latents
    t: Tensor  # (B,) sigma * 1000
    context: Tensor  # (B, S, context_dim)
    pooled: Tensor  # (B, pooled_dim)


def make_cases(e: Engines) -> list[Case]:
    """Everything timed for one dtype.

    To benchmark another kind of step (e.g. a DenseDiffusion-modulated one), append a `Case` here: the warm-up,
    the interleaved timing, the output check, the table and the JSON all pick it up.
    """
    return [
        Case(
            "step",
            lambda: e.ours(e.x, e.t, e.context, e.pooled),
            lambda: e.theirs(hidden_states=e.x, timestep=e.t, encoder_hidden_states=e.context,
                             pooled_projections=e.pooled, return_dict=False)[0],
        ),
    ]


# ---------------------------------------------------------------------------------------------- models


def randomize_(module: nn.Module, seed: int) -> None:
    """Redraw every parameter (norm weights around 1, non-zero biases) so the output check cannot pass on
    defaults, with fan-in scaling so activations stay O(1) at full width."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
            else:
                p.normal_(1, 0.3, generator=g)


def diffusers_model(shape: Shape, seed: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    width = shape.num_heads * shape.head_dim
    model = SD3Transformer2DModel(
        sample_size=shape.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=shape.blocks,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.num_heads,
        joint_attention_dim=shape.context_dim, caption_projection_dim=width, pooled_projection_dim=shape.pooled_dim,
        pos_embed_max_size=shape.pos_embed_max_size, qk_norm="rms_norm", dual_attention_layers=(),
    )
    randomize_(model, seed)
    return model.requires_grad_(False).eval()


def ours_from(theirs: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Our MMDiT on `theirs`' weights: the production key map and loader. Tensors the map passes through are
    shared with `theirs`, not copied; only fused qkv and the shift/scale-swapped ones are new."""
    from loaders.safetensors import load_weights
    from loaders.transformer_keys import transformer_from_diffusers
    from mmdit.model import MMDiT, MMDiTConfig

    state = transformer_from_diffusers(theirs.state_dict())
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.from_state_dict(state))
    return load_weights(model, state, what="benchmark MM-DiT", dtype=dtype, device="cpu")


def make_inputs(shape: Shape, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, 16, shape.latent, shape.latent, generator=g)
    context = torch.randn(shape.batch, shape.text_tokens, shape.context_dim, generator=g)
    pooled = torch.randn(shape.batch, shape.pooled_dim, generator=g)
    t = torch.linspace(1000.0, 387.5, shape.batch)  # as float, like the samplers pass it
    return x, t, context, pooled


# ---------------------------------------------------------------------------------------------- timing

BUSY = 0.05  # other processes using more than this fraction of the machine during a pair: "contended"
MIN_WINDOW = 0.5  # seconds: shorter pairs are judged over this window, or the 10 ms CPU ticks dominate


def _others_cpu_seconds() -> float | None:
    """CPU seconds used so far by every process but this one (Linux /proc; None where it is unavailable).

    On a small shared machine another job can halve a step's speed; this is how a run sees that it happened.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])  # user nice system irq softirq steal
    return (busy - int(mine[11]) - int(mine[12])) / os.sysconf("SC_CLK_TCK")  # minus our utime + stime


def measure_others_load(seconds: float) -> float | None:
    """Fraction of the machine's CPUs other processes use over the next `seconds`."""
    before = _others_cpu_seconds()
    time.sleep(seconds)
    after = _others_cpu_seconds()
    return None if before is None or after is None else (after - before) / seconds / (os.cpu_count() or 1)


def wait_until_idle(limit_s: float, say: Callable[[str], None]) -> None:
    """Return once other processes leave the machine idle for half a second, or after `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    announced = False
    while time.monotonic() < deadline:
        load = measure_others_load(0.5)
        if load is None or load < BUSY:
            return
        if not announced:
            say(f"  waiting for other processes to finish (they use {load:.0%} of the CPUs) ...")
            announced = True


def _timed(fn: Callable[[], Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case: Case, dtype: str, repeats: int, warmup: int, wait_idle: float, say: Callable[[str], None]) -> Result:
    a, b = case.ours().float(), case.reference().float()  # also the first warm-up call
    max_diff = ((a - b).abs().max() / b.abs().max()).item()
    del a, b
    for _ in range(warmup - 1):
        case.ours(), case.reference()
    ours: list[float] = []
    ref: list[float] = []
    loads: list[float] = []
    attempts = 0
    while len(ours) < repeats:
        attempts += 1
        if wait_idle:
            wait_until_idle(wait_idle, say)
        # ABBA order: a constant advantage of running first, and linear drift, cancel over pairs of repetitions
        pair = ((case.ours, ours), (case.reference, ref))[:: 1 if len(ours) % 2 == 0 else -1]
        before, start = _others_cpu_seconds(), time.perf_counter()
        spent = [_timed(fn) for fn, _ in pair]
        time.sleep(max(0.0, MIN_WINDOW - (time.perf_counter() - start)))  # CPU accounting ticks at 10 ms
        after, window = _others_cpu_seconds(), time.perf_counter() - start
        load = 0.0 if before is None or after is None else (after - before) / window / (os.cpu_count() or 1)
        load = min(max(load, 0.0), 1.0)
        note = f"(others used {load:.0%} of the CPUs)"
        if wait_idle and load > BUSY and attempts < 3 * repeats:
            say(f"  {case.name} {dtype}: pair discarded {note}")
            continue
        for (_, times), t in zip(pair, spent):
            times.append(t)
        loads.append(load)
        say(f"  {case.name} {dtype} {len(ours)}/{repeats}: ours {ours[-1]:.3f} s, "
            f"{case.reference_name} {ref[-1]:.3f} s {note}")
    return Result(case.name, dtype, Timing(ours), Timing(ref), case.reference_name, max_diff, loads)


def run(
    shape: Shape, dtypes: list[str], repeats: int, warmup: int, wait_idle: float, seed: int, say: Callable[[str], None]
) -> list[Result]:
    from diffusers.utils import logging

    say("building the diffusers transformer ...")
    theirs = diffusers_model(shape, seed)
    x, t, context, pooled = make_inputs(shape, seed + 1)
    results: list[Result] = []
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its `.to(dtype)` warns about modules to keep in fp32; this model has none
    try:
        # Widest first, casting in place: every cast rounds the float32 weights directly, never re-widens.
        for name in sorted(dtypes, key=lambda n: -DTYPES[n].itemsize):
            dtype = DTYPES[name]
            theirs = theirs.to(dtype)
            ours = ours_from(theirs, dtype)
            engines = Engines(ours, theirs, x.to(dtype), t, context.to(dtype), pooled.to(dtype))
            with torch.inference_mode():
                for case in make_cases(engines):
                    results.append(run_case(case, name, repeats, warmup, wait_idle, say))
            del engines, ours
            gc.collect()
    finally:
        logging.set_verbosity(verbosity)
    return results


# ---------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import diffusers

    return {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def markdown(results: list[Result]) -> str:
    """Step times are medians over the timed repetitions; ratio = median(ours) / median(reference)."""
    rows = [
        "| case | dtype | ours s/step | reference s/step | ratio ours/ref | paired ratio | ours min | ref min "
        "| max diff / scale | contended pairs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.case} vs {r.reference_name} | {r.dtype} | {r.ours.median:.3f} | {r.reference.median:.3f} "
            f"| **{r.ratio:.3f}** | {r.paired_ratio:.3f} | {r.ours.min:.3f} | {r.reference.min:.3f} "
            f"| {r.max_diff:.1e} | {r.contended}/{len(r.others_load)} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default: float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per engine (default 10)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per engine before timing, at least 1: its output is the check (default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--blocks", type=int, default=2, help="joint blocks (default 2; SD3.5-Large has 38)")
    p.add_argument("--size", type=int, help="image pixels per side, a multiple of 16 (default 512; 64 with --tiny)")
    p.add_argument("--text-tokens", type=int, help="text tokens (default 333 = 77 CLIP + 256 T5; 9 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: one prompt with CFG)")
    p.add_argument("--tiny", action="store_true", help="a tiny width (2 heads x 16) instead of SD3.5-Large's")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each timed pair wait up to S s for other processes to go idle, and redo pairs they "
                        "disturbed (default 0: time at once, keep every pair, report the disturbance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the environment, shape and every timing here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes: unknown {bad or 'empty list'}; choose from {', '.join(DTYPES)}")
    if args.repeats < 1 or args.warmup < 1 or args.blocks < 1 or args.batch < 1 or args.wait_idle < 0:
        p.error("--repeats, --warmup, --blocks and --batch must be at least 1, --wait-idle not negative")
    return args


def shape_from(args: argparse.Namespace) -> Shape:
    base = TINY if args.tiny else LARGE
    size = args.size or (64 if args.tiny else 512)
    if size % 16:
        raise ValueError(f"--size {size} is not a multiple of 16 (8 for the VAE x 2 for the patches)")
    shape = Shape(blocks=args.blocks, size=size, batch=args.batch,
                  **{**base, "text_tokens": args.text_tokens or base["text_tokens"]})
    if shape.latent // 2 > shape.pos_embed_max_size:
        raise ValueError(f"--size {size} needs a {shape.latent // 2}-patch position table; this one has "
                         f"{shape.pos_embed_max_size}: use a smaller --size")
    return shape


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shape = shape_from(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = environment()
    print(f"# MM-DiT step: ours vs diffusers {env['diffusers']}")
    print(f"torch {env['torch']} | {env['threads']} threads | {env['cpu']} ({env['cpu_capability']})")
    print(f"D = {shape.num_heads} x {shape.head_dim} = {shape.num_heads * shape.head_dim}, {shape.blocks} blocks, "
          f"{shape.size}x{shape.size} ({shape.image_tokens} image + {shape.text_tokens} text tokens), "
          f"batch {shape.batch}; {args.repeats} interleaved repeats after {args.warmup} warm-up\n")
    results = run(shape, args.dtypes, args.repeats, args.warmup, args.wait_idle, args.seed, say)
    print(markdown(results))
    if any(r.contended for r in results):
        print(f"\nOther processes used more than {BUSY:.0%} of the CPUs during some timed pairs: those times are "
              "inflated. Trust the paired ratio most, or run again with --wait-idle 120.")
    if args.json:
        report = {"environment": env, "shape": asdict(shape), "repeats": args.repeats, "warmup": args.warmup,
                  "wait_idle": args.wait_idle, "results": [r.to_json() for r in results]}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
