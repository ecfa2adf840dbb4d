"""Memory per stage of a text-to-image call: the bytes of the weights each stage used, and its peak memory.

The stages are the ones the pipeline loads one component for: CLIP-L, CLIP-G and T5 (`loaders.text.encode_texts`),
sampling (the MM-DiT) and VAE (`loaders.pipeline`). Give a `MemoryLog` to `Pipeline.__call__(memory=...)` and it
gets one `StageMemory` per stage; `memory_table` lays them out (the CLI's --report-memory prints it). Nothing
is measured without a log.

What the peaks mean:
* CUDA: `torch.cuda.max_memory_allocated`, reset as the stage starts. It is the most the tensors on the device
  held at one moment of the stage: its weights and activations plus whatever earlier stages left there (their
  outputs, models kept loaded). The allocator's cache on top of that (`torch.cuda.memory_reserved`) is not
  counted.
* CPU: the process's peak resident memory, `resource.getrusage(RUSAGE_SELF).ru_maxrss`. That is a maximum over
  the process's whole life and cannot be reset, so each stage reports the peak so far and how much the stage
  raised it. A stage that stays below an earlier stage's peak shows a rise of 0, however much it used.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import ContextManager

import torch
from torch import nn


@dataclass(frozen=True)
class StageMemory:
    stage: str  # "CLIP-L", "CLIP-G", "T5", "sampling", "VAE"
    weight_bytes: Mapping[str, int]  # the stage's weights (parameters and buffers), bytes per device they are on
    device: str  # the device the pipeline runs on, whose peak `device_peak` is
    device_peak: int | None  # CUDA: peak bytes allocated during the stage; None on a CPU
    rss_peak: int | None  # peak resident memory of the process so far, bytes (None: no getrusage here)
    rss_rise: int | None  # how much this stage raised `rss_peak`
    seconds: float  # wall time of the stage, loading included

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())


@dataclass
class Stage:
    """What a running stage has been told: the weights it uses (`weights(module)`, once per module)."""

    weight_bytes: dict[str, int] = field(default_factory=dict)

    def weights(self, module: nn.Module) -> None:
        for t in [*module.parameters(), *module.buffers()]:
            where = str(t.device)
            self.weight_bytes[where] = self.weight_bytes.get(where, 0) + t.nbytes


def release_memory() -> None:
    """Return freed memory now: call it after the last reference to a module is gone (before the next loads)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_rss() -> int | None:
    """The process's peak resident set size so far, in bytes; None where `resource` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


class MemoryLog:
    """Collects one `StageMemory` per stage, in order, over as many calls as it is given to."""

    def __init__(self) -> None:
        self.stages: list[StageMemory] = []

    @contextmanager
    def stage(self, name: str, device: str | torch.device) -> Iterator[Stage]:
        """Measure the `with` body as stage `name` of a pipeline running on `device`."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)  # so the time is this stage's, not the queue's before it
            torch.cuda.reset_peak_memory_stats(device)
        rss_before, started, stage = peak_rss(), time.perf_counter(), Stage()
        yield stage
        if cuda:
            torch.cuda.synchronize(device)
        rss = peak_rss()
        self.stages.append(StageMemory(
            name, dict(stage.weight_bytes), str(device),
            torch.cuda.max_memory_allocated(device) if cuda else None,
            rss, None if rss is None or rss_before is None else rss - rss_before,
            time.perf_counter() - started,
        ))


def measure(log: MemoryLog | None, name: str, device: str | torch.device) -> ContextManager[Stage]:
    """`log.stage(name, device)`, or a stage that measures nothing when there is no log."""
    return log.stage(name, device) if log is not None else nullcontext(Stage())


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def memory_table(stages: list[StageMemory]) -> str:
    """The stages as a Markdown table (sizes in decimal units: 1 GB = 10⁹ bytes)."""
    device = stages[0].device if stages and stages[0].device.startswith("cuda") else "GPU"
    rows = [f"| stage | weights | peak {device} allocated | peak RSS so far | RSS rise | seconds |",
            "|---|---|---:|---:|---:|---:|"]
    for s in stages:
        weights = " + ".join(f"{_size(n)} on {where}" for where, n in s.weight_bytes.items()) or "–"
        rise = "–" if s.rss_rise is None else "+" + _size(s.rss_rise)
        rows.append(f"| {s.stage} | {weights} | {_size(s.device_peak)} | {_size(s.rss_peak)} | {rise} | "
                    f"{s.seconds:.2f} |")
    return "\n".join(rows)
