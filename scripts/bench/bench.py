"""Our MM-DiT's step time next to diffusers' SD3Transformer2DModel: same weights, same inputs, one run.

    python -m scripts.bench.bench                      # SD3.5-Large and -Medium widths, 2 blocks, 512x512, batch 2,
                                                       # fp32 and bf16, eager and compiled
    python -m scripts.bench.bench --tiny --repeats 1   # seconds: a tiny config, to check the script works

Per `--widths` one random diffusers transformer is built: SD3.5-Large's (D = 2432 = 38 heads x 64, RMS QK-norm)
or SD3.5-Medium's (D = 1536 = 24 heads x 64, RMS QK-norm, the MMDiT-X dual attention in the first of the
`--blocks` blocks, as in 13 of Medium's 24), `--blocks` deep, and its weights are mapped into our MMDiT
through the production key map and loader, sharing
every tensor the map does not have to rebuild. Per dtype both models are cast, each engine runs once on the
same inputs (that output is the correctness check: max |ours - diffusers| / max |diffusers|), warms up, then
the two are timed in interleaved repetitions under `torch.inference_mode()`. The first call of each engine is
reported on its own (the "first call" columns): for compiled engines it is the compilation. The order alternates
(ours, diffusers, diffusers, ours, ...) so that drift in machine load and "who ran first" cancel. The ratio is
median(ours) / median(diffusers): below 1.00 means our step is faster. The paired ratio (median over back-to-back
pairs of ours / diffusers) is the one to trust on a busy machine; every pair also records how much CPU other
processes took meanwhile (Linux /proc), and `--wait-idle S` waits for quiet and redoes disturbed pairs.

Compiled (`--compile`, on by default; `--no-compile` skips it): ours as `Pipeline.load(compile=True)` runs it
(`torch.compile` of each joint block) against diffusers' documented recipe, `torch.compile(transformer)` of the
whole model, both with inductor's default mode.

DenseDiffusion (issue 4): the same run also times a modulated step (a three-box layout, `--dense-preset`, at
the schedule's first and strongest step) against our plain step, and measures the extra peak memory of one
modulated attention call at `--memory-size` (1024x1024) for several query chunk sizes, each call in a fresh
process. `--dense-preset none` skips both, `--memory-size 0` the memory part.

Regional Prompting (issue 29): `--regional` also times a step under it (the same three boxes, each a prompt of its
own, so the text is 4x as long; an inject step with the mask in every block, the positive half) against our plain
step.

Prints Markdown tables (docs/performance.md); `--json FILE` writes every timing.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from dense import PRESETS, DensePlan, RegionalAttention, ScoreEdit
from loaders.pipeline import DTYPES
from tests.random_weights import randomize_



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
    dual_blocks: tuple[int, ...] = ()  # blocks with MMDiT-X's second image self-attention
    width_name: str = "large"

    @property
    def latent(self) -> int:
        return self.size // 8

    @property
    def image_tokens(self) -> int:
        return (self.latent // 2) ** 2


# SD3.5-Large: 38 heads x 64, QK RMS norm, a 192 x 192 position table (docs/numerics.md §9.1). SD3.5-Medium: 24 heads
# x 64, a 384 x 384 table, dual attention (MMDiT-X) in blocks 0-12 of 24: here in the first block of the few.
WIDTHS = {
    "large": dict(num_heads=38, head_dim=64, context_dim=4096, pooled_dim=2048, pos_embed_max_size=192,
                  text_tokens=333, dual_blocks=()),
    "medium": dict(num_heads=24, head_dim=64, context_dim=4096, pooled_dim=2048, pos_embed_max_size=384,
                   text_tokens=333, dual_blocks=(0,)),
}
TINY = dict(num_heads=2, head_dim=16, context_dim=64, pooled_dim=48, pos_embed_max_size=16, text_tokens=9,
            dual_blocks=(0,))


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
    width: str
    case: str
    dtype: str
    ours: Timing
    reference: Timing
    reference_name: str
    max_diff: float | None  # max |ours - reference| / max |reference|; None where they are meant to differ
    others_load: list[float]  # per timed pair: fraction of the CPUs other processes used meanwhile
    first: tuple[float, float]  # seconds of each engine's first call (for a compiled engine: its compilation)

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
            "width": self.width, "case": self.case, "dtype": self.dtype, "first_call": list(self.first),
            "ours": timing(self.ours), "reference": timing(self.reference),
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
    same_output: bool = True  # False when the two are meant to differ (a modulated step vs a plain one)


@dataclass(frozen=True)
class Engines:
    """Both transformers in one dtype, and the inputs they share."""

    ours: nn.Module
    theirs: nn.Module
    x: Tensor  # (B, 16, h, w) latents
    t: Tensor  # (B,) sigma * 1000
    context: Tensor  # (B, S, context_dim)
    pooled: Tensor  # (B, pooled_dim)
    dense: ScoreEdit | None  # a layout's score edit of the positive half at step 0, if benchmarked
    regional: tuple[Tensor, RegionalAttention] | None  # Regional Prompting's context and attention, if benchmarked
    ours_compiled: nn.Module | None = None  # as Pipeline.load(compile=True): each joint block compiled
    theirs_compiled: nn.Module | None = None  # torch.compile(transformer)


def make_cases(e: Engines) -> list[Case]:
    """Everything timed for one dtype.

    To benchmark another kind of step, append a `Case` here: the warm-up, the interleaved timing, the output
    check, the table and the JSON all pick it up.
    """
    plain = lambda: e.ours(e.x, e.t, e.context, e.pooled)  # noqa: E731
    diffusers_step = lambda model: lambda: model(  # noqa: E731
        hidden_states=e.x, timestep=e.t, encoder_hidden_states=e.context, pooled_projections=e.pooled,
        return_dict=False)[0]
    cases = [Case("step", plain, diffusers_step(e.theirs))]
    if e.ours_compiled is not None and e.theirs_compiled is not None:
        cases.append(Case("compiled step", lambda: e.ours_compiled(e.x, e.t, e.context, e.pooled),
                          diffusers_step(e.theirs_compiled), reference_name="diffusers compiled"))
    if e.dense is not None:
        cases.append(Case("DenseDiffusion step", lambda: e.ours(e.x, e.t, e.context, e.pooled, dense=e.dense),
                          plain, reference_name="our plain step", same_output=False))
    if e.regional is not None:
        context, regional = e.regional
        cases.append(Case("Regional Prompting step", lambda: e.ours(e.x, e.t, context, e.pooled, dense=regional),
                          plain, reference_name="our plain step", same_output=False))
    return cases


# ---------------------------------------------------------------------------------------------- models


def diffusers_model(shape: Shape, seed: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    width = shape.num_heads * shape.head_dim
    model = SD3Transformer2DModel(
        sample_size=shape.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=shape.blocks,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.num_heads,
        joint_attention_dim=shape.context_dim, caption_projection_dim=width, pooled_projection_dim=shape.pooled_dim,
        pos_embed_max_size=shape.pos_embed_max_size, qk_norm="rms_norm", dual_attention_layers=shape.dual_blocks,
    )
    randomize_(model, torch.Generator().manual_seed(seed))  # norm weights around 1, non-zero biases
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


# ---------------------------------------------------------------------------------------------- DenseDiffusion

# Three regions tiling the image (left half, top right, bottom right): every image token is in a region.
BOXES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 0.5), (0.5, 0.5, 1.0, 1.0))
DENSE_STEPS, DENSE_SHIFT = 28, 3.0  # SD3.5-Large's preset schedule


def dense_plan(size: int, text_tokens: int, preset: str, chunk_size: int | None = None) -> DensePlan:
    """A DensePlan as `generate.py --layout` builds it, for three boxes, each phrase 2 CLIP tokens and (if the
    text is long enough to have a T5 part) 3 T5 tokens; `chunk_size` None keeps the library's default.
    Its step 0 has the largest λ of the schedule."""
    from dense import PhraseMatch, assign_tokens, box_mask
    from samplers.schedule import sigmas

    phrases = [f"thing {n}" for n in range(len(BOXES))]
    regions = assign_tokens(torch.stack([box_mask(b, size, size) for b in BOXES]), phrases)
    t5 = text_tokens > 77 + 3 * len(BOXES)
    matches = [PhraseMatch(clip=range(1 + 2 * n, 3 + 2 * n), t5=range(3 * n, 3 * n + 3) if t5 else range(0))
               for n in range(len(BOXES))]
    plan = DensePlan.build(regions, matches, phrases, n_txt=text_tokens,
                           sigmas=sigmas(DENSE_STEPS, DENSE_SHIFT).tolist(), num_steps=DENSE_STEPS,
                           shift=DENSE_SHIFT, config=PRESETS[preset])
    return plan if chunk_size is None else replace(plan, chunk_size=chunk_size)


def regional_step(shape: Shape, context: Tensor, seed: int) -> tuple[Tensor, RegionalAttention]:
    """Regional Prompting at an inject step for the three boxes (each phrase its own prompt, random encodings of
    the base context's length), the mask in every block, the positive half of the batch: (context, attention)."""
    from dense import RegionalConfig, RegionalPlan, assign_tokens, box_mask, regional_prompts

    phrases = [f"thing {n}" for n in range(len(BOXES))]
    regions = assign_tokens(torch.stack([box_mask(b, shape.size, shape.size) for b in BOXES]), phrases)
    encodings = torch.randn(len(BOXES), *context.shape[1:], generator=torch.Generator().manual_seed(seed))
    plan = RegionalPlan.build(regional_prompts(regions.seg, phrases, ""), encodings, RegionalConfig())
    positive = slice(shape.batch // 2, shape.batch)
    return plan.context(context, positive), plan.for_call(0, positive)


@dataclass(frozen=True)
class MemoryRow:
    chunk: int | None  # query rows per explicit chunk; None: the plain attention (no layout)
    extra_bytes: int  # peak resident memory during the call minus resident memory before it
    chunk_scores_bytes: int  # one chunk's fp32 scores (b, H, chunk, L); 0 for the plain call
    seconds: float


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    raise OSError(f"/proc/self/status has no {field}")


def _map_every_large_block() -> None:
    """Ask glibc to give every allocation of 64 KiB or more its own mapping, returned to the system when freed.

    By default glibc keeps freed blocks of up to 32 MiB for reuse, so a second call could reuse the first one's
    memory and its peak would not show in the resident size. Elsewhere (no glibc) this does nothing.
    """
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD = -3  # <malloc.h>; setting it also turns off glibc's dynamic threshold
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):
        pass


def _attention_memory(shape: Shape, chunk: int | None, preset: str) -> MemoryRow:
    """One attention call at `shape`, batch `shape.batch` with the last row modulated, in this (fresh) process.
    `chunk` 0 means every query in one chunk; None the plain call.

    Peak memory comes from Linux: writing 5 to /proc/self/clear_refs resets the peak resident size (VmHWM) to
    the current one (VmRSS), so VmHWM after the call minus VmRSS before it is what the call added at its worst,
    whatever allocated it (see `_map_every_large_block` for why freed memory cannot hide a peak).
    """
    from mmdit.attention import attention

    _map_every_large_block()
    g = torch.Generator().manual_seed(0)
    b, H, L, Dh = shape.batch, shape.num_heads, shape.image_tokens + shape.text_tokens, shape.head_dim
    chunk = L if chunk == 0 else chunk
    q, k, v = (torch.randn(b, H, L, Dh, generator=g) for _ in range(3))
    dense = None
    if chunk is not None:
        plan = dense_plan(shape.size, shape.text_tokens, preset, chunk_size=chunk)
        dense = plan.for_call(0, slice(b - 1, b))
    with torch.inference_mode():
        attention(q, k, v, dense)  # warm-up: one-time allocations of the kernels are not the call's
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
        start = time.perf_counter()
        out = attention(q, k, v, dense)
        seconds = time.perf_counter() - start
        extra = _status_bytes("VmHWM") - before
    del out
    scores = 0 if chunk is None else H * min(chunk, L) * L * 4  # one modulated row's chunk, fp32
    return MemoryRow(chunk, extra, scores, seconds)


def attention_memory(shape: Shape, chunks: list[int], preset: str, say: Callable[[str], None]) -> list[MemoryRow]:
    """The plain call, then the modulated call per chunk size, each in a new process (see `_attention_memory`)."""
    import multiprocessing

    if not os.access("/proc/self/clear_refs", os.W_OK):
        say("  peak memory needs Linux's /proc/self/clear_refs, which is not writable here: skipped")
        return []
    rows = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for chunk in [None, *chunks]:
            say(f"  attention memory, chunk {'plain' if chunk is None else chunk or 'all'} ...")
            rows.append(pool.apply(_attention_memory, (shape, chunk, preset)))
    return rows


def memory_markdown(shape: Shape, rows: list[MemoryRow]) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    L = shape.image_tokens + shape.text_tokens
    full = shape.num_heads * L * L * 4
    lines = [
        f"One attention call at {shape.size}x{shape.size} ({shape.image_tokens} + {shape.text_tokens} tokens, "
        f"{shape.num_heads} heads x {shape.head_dim}, batch {shape.batch}, the last row modulated, float32). "
        f"The full L x L fp32 scores of one row's heads would be {mib(full)} MiB.",
        "",
        "| attention | extra peak MiB | one chunk's scores MiB | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        name = "plain (SDPA, no layout)" if r.chunk is None else f"modulated, chunk {r.chunk}"
        lines.append(f"| {name} | {mib(r.extra_bytes)} | {mib(r.chunk_scores_bytes) if r.chunk else '-'} "
                     f"| {r.seconds:.2f} |")
    return "\n".join(lines)


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


def run_case(case: Case, width: str, dtype: str, repeats: int, warmup: int, wait_idle: float,
             say: Callable[[str], None]) -> Result:
    start = time.perf_counter()
    a = case.ours().float()  # also the first warm-up call
    middle = time.perf_counter()
    b = case.reference().float()
    first = (middle - start, time.perf_counter() - middle)
    max_diff = ((a - b).abs().max() / b.abs().max()).item() if case.same_output else None
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
            say(f"  {width} {case.name} {dtype}: pair discarded {note}")
            continue
        for (_, times), t in zip(pair, spent):
            times.append(t)
        loads.append(load)
        say(f"  {width} {case.name} {dtype} {len(ours)}/{repeats}: ours {ours[-1]:.3f} s, "
            f"{case.reference_name} {ref[-1]:.3f} s {note}")
    return Result(width, case.name, dtype, Timing(ours), Timing(ref), case.reference_name, max_diff, loads, first)


def run(
    shape: Shape, dtypes: list[str], repeats: int, warmup: int, wait_idle: float, seed: int,
    dense_preset: str | None, compile: bool, say: Callable[[str], None], regional: bool = False,
) -> list[Result]:
    from diffusers.utils import logging

    say(f"building the diffusers transformer ({shape.width_name} width) ...")
    theirs = diffusers_model(shape, seed)
    x, t, context, pooled = make_inputs(shape, seed + 1)
    # classifier-free guidance puts the positive prompt in the second half of the batch
    dense = None if dense_preset is None else dense_plan(shape.size, shape.text_tokens, dense_preset).for_call(
        0, slice(shape.batch // 2, shape.batch))
    results: list[Result] = []
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its `.to(dtype)` warns about modules to keep in fp32; this model has none
    try:
        # Widest first, casting in place: every cast rounds the float32 weights directly, never re-widens.
        for name in sorted(dtypes, key=lambda n: -DTYPES[n].itemsize):
            dtype = DTYPES[name]
            theirs = theirs.to(dtype)
            ours = ours_from(theirs, dtype)
            ours_compiled = theirs_compiled = None
            if compile:
                # Fresh compiled code per model: dynamo caches it on the shared forward functions, and would fall
                # back to eager once the models of every width and dtype filled that cache.
                torch._dynamo.reset()
                ours_compiled = ours_from(theirs, dtype)
                for block in ours_compiled.joint_blocks:
                    block.compile()  # what Pipeline.load(compile=True) does
                theirs_compiled = torch.compile(theirs)
            steered = None
            if regional:
                ctx, attention = regional_step(shape, context, seed + 2)
                steered = ctx.to(dtype), attention
            engines = Engines(ours, theirs, x.to(dtype), t, context.to(dtype), pooled.to(dtype), dense, steered,
                              ours_compiled, theirs_compiled)
            with torch.inference_mode():
                for case in make_cases(engines):
                    results.append(run_case(case, shape.width_name, name, repeats, warmup, wait_idle, say))
            del engines, ours, ours_compiled, theirs_compiled
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
        "| width | case | dtype | ours s/step | reference s/step | ratio ours/ref | paired ratio | ours min | ref min "
        "| first call s, ours / ref | max diff / scale | contended pairs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.width} | {r.case} vs {r.reference_name} | {r.dtype} | {r.ours.median:.3f} | {r.reference.median:.3f} "
            f"| **{r.ratio:.3f}** | {r.paired_ratio:.3f} | {r.ours.min:.3f} | {r.reference.min:.3f} "
            f"| {r.first[0]:.1f} / {r.first[1]:.1f} "
            f"| {'(meant to differ)' if r.max_diff is None else f'{r.max_diff:.1e}'} "
            f"| {r.contended}/{len(r.others_load)} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default: float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per engine (default 20)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per engine before timing, at least 1: its output is the check (default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--blocks", type=int, default=2, help="joint blocks (default 2; SD3.5-Large has 38)")
    p.add_argument("--size", type=int, help="image pixels per side, a multiple of 16 (default 512; 64 with --tiny)")
    p.add_argument("--text-tokens", type=int, help="text tokens (default 333 = 77 CLIP + 256 T5; 9 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: one prompt with CFG)")
    p.add_argument("--widths", default="large,medium",
                   help="comma-separated SD3.5 widths: large (38 heads x 64), medium (24 x 64, dual attention in "
                        "block 0) (default: both)")
    p.add_argument("--tiny", action="store_true", help="a tiny width (2 heads x 16) instead of --widths")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time both engines under torch.compile (default; --no-compile skips it)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each timed pair wait up to S s for other processes to go idle, and redo pairs they "
                        "disturbed (default 0: time at once, keep every pair, report the disturbance)")
    p.add_argument("--dense-preset", default="faithful", choices=[*PRESETS, "none"],
                   help="also time a DenseDiffusion-modulated step against our plain one, with this preset "
                        "(default faithful; none: skip)")
    p.add_argument("--regional", action="store_true",
                   help="also time a Regional Prompting step against our plain one")
    p.add_argument("--memory-size", type=int,
                   help="image size of the modulated attention call whose peak memory is measured "
                        "(default 1024; 128 with --tiny; 0: skip the memory measurement)")
    p.add_argument("--memory-chunks", default=None,
                   help="comma-separated query chunk sizes for the memory measurement, 'all' for every query at "
                        "once (default 64,256,1024,all; 16,64 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the environment, shape and every timing here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes: unknown {bad or 'empty list'}; choose from {', '.join(DTYPES)}")
    args.widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    bad = [w for w in args.widths if w not in WIDTHS]
    if bad or not args.widths:
        p.error(f"--widths: unknown {bad or 'empty list'}; choose from {', '.join(WIDTHS)}")
    if args.repeats < 1 or args.warmup < 1 or args.blocks < 1 or args.batch < 1 or args.wait_idle < 0:
        p.error("--repeats, --warmup, --blocks and --batch must be at least 1, --wait-idle not negative")
    args.dense_preset = None if args.dense_preset == "none" else args.dense_preset
    if args.memory_size is None:
        args.memory_size = 128 if args.tiny else 1024
    try:
        chunks = args.memory_chunks or ("16,64" if args.tiny else "64,256,1024,all")
        args.memory_chunks = [0 if c.strip() == "all" else int(c) for c in chunks.split(",")]
    except ValueError:
        p.error(f"--memory-chunks: expected comma-separated integers or 'all', got {args.memory_chunks!r}")
    if args.memory_size < 0 or any(c < 0 for c in args.memory_chunks):
        p.error("--memory-size must be 0 (skip) or more and every --memory-chunks size at least 1 (or all)")
    return args


def shape_from(args: argparse.Namespace, width: str) -> Shape:
    base = TINY if args.tiny else WIDTHS[width]
    size = args.size or (64 if args.tiny else 512)
    if size % 16:
        raise ValueError(f"--size {size} is not a multiple of 16 (8 for the VAE x 2 for the patches)")
    shape = Shape(blocks=args.blocks, size=size, batch=args.batch, width_name="tiny" if args.tiny else width,
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
        shapes = [shape_from(args, w) for w in (["tiny"] if args.tiny else args.widths)]
        shape = shapes[0]  # the memory measurement's heads
        memory_shape = None
        if args.memory_size and args.dense_preset:  # the attention alone: no position table to fit
            if args.memory_size % 16:
                raise ValueError(f"--memory-size {args.memory_size} is not a multiple of 16")
            memory_shape = replace(shape, size=args.memory_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = environment()
    print(f"# MM-DiT step: ours vs diffusers {env['diffusers']}")
    print(f"torch {env['torch']} | {env['threads']} threads | {env['cpu']} ({env['cpu_capability']})")
    for s in shapes:
        print(f"{s.width_name}: D = {s.num_heads} x {s.head_dim} = {s.num_heads * s.head_dim}, {s.blocks} blocks "
              f"(dual attention in {list(s.dual_blocks) or 'none'}), {s.size}x{s.size} ({s.image_tokens} image + "
              f"{s.text_tokens} text tokens), batch {s.batch}")
    print(f"{args.repeats} interleaved repeats after {args.warmup} warm-up{', eager and compiled' * args.compile}\n")
    results = [r for s in shapes for r in run(s, args.dtypes, args.repeats, args.warmup, args.wait_idle, args.seed,
                                              args.dense_preset, args.compile, say, args.regional)]
    print(markdown(results))
    memory = attention_memory(memory_shape, args.memory_chunks, args.dense_preset, say) if memory_shape else []
    if memory:
        print(f"\n## Peak memory of one DenseDiffusion attention call ({args.dense_preset})\n")
        print(memory_markdown(memory_shape, memory))
    if any(r.contended for r in results):
        print(f"\nOther processes used more than {BUSY:.0%} of the CPUs during some timed pairs: those times are "
              "inflated. Trust the paired ratio most, or run again with --wait-idle 120.")
    if args.json:
        report = {"environment": env, "shapes": [asdict(s) for s in shapes], "repeats": args.repeats,
                  "warmup": args.warmup,
                  "wait_idle": args.wait_idle, "dense_preset": args.dense_preset,
                  "results": [r.to_json() for r in results],
                  "memory": {"shape": asdict(memory_shape), "calls": [asdict(m) for m in memory]} if memory else None}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
