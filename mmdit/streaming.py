"""Block streaming: the MM-DiT's joint blocks stay in host memory and visit the device one at a time.

For a model larger than the GPU (`--offload blocks`): nearly all of the weights are the joint blocks, and a block
is only needed while it runs. `offload_blocks` keeps the blocks in pinned CPU memory and the rest on the device;
`MMDiT.forward` then runs its blocks through `BlockStreamer.stream`, which copies block n + 1 while block n
computes. On the CPU the "copy" is the tensor itself, so the output is bit for bit the unstreamed model's
(tests/test_memory.py), and the streaming code runs on machines without a GPU too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:
    from dense import RegionalAttention, ScoreEdit

    from .model import MMDiT


class StreamedBlock:
    """A joint block bound to a device copy of its weights for exactly one call.

    The call drops the copy as it returns, so the device memory of block n is free again before the streamer
    allocates block n + 2, whatever the caller's loop variable still holds.
    """

    def __init__(self, block: nn.Module, weights: dict[str, Tensor]):
        self.block = block
        self.weights: dict[str, Tensor] | None = weights

    def __call__(self, x: Tensor, context: Tensor, vec: Tensor, dense: ScoreEdit | RegionalAttention | None = None):
        weights, self.weights = self.weights, None
        if weights is None:
            raise RuntimeError("a streamed block runs once: its device weights were released after its first call")
        # The host module's code, with the device tensors in place of its parameters and buffers.
        return functional_call(self.block, weights, (x, context, vec, dense))


class BlockStreamer:
    """Runs host-resident blocks on `device`, prefetching the next block's weights on a side CUDA stream.

    Ordering (PyTorch docs, "CUDA semantics", "CUDA streams"), with C the compute stream and S the copy stream:
    * a block's device tensors are allocated while C is current, so the caching allocator hands their memory
      back only to later allocations on C, which are ordered after every kernel that read it;
    * S waits for C (`wait_stream`) before copying into them: the memory may have belonged, a moment ago on the
      host's clock, to the block C is still computing;
    * C waits for the copy's event (`wait_event`) before the block's kernels read the weights;
    * copies are `non_blocking` from pinned memory: DMA transfers that overlap the kernels.
    The host never waits, and the device holds about two blocks at a time.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def stream(self, blocks: Sequence[nn.Module]) -> Iterator[StreamedBlock]:
        """`blocks` (host modules, in the order they run), each bound to its device weights when it is yielded."""
        if not blocks:
            return
        pending = self._fetch(blocks[0])
        for n, block in enumerate(blocks):
            weights, copied = pending  # rebinding drops the previous block's copy held here
            # Queue the next block's copy before this block's kernels: the two then run side by side.
            pending = self._fetch(blocks[n + 1]) if n + 1 < len(blocks) else (None, None)
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)
            yield StreamedBlock(block, weights)

    def _fetch(self, block: nn.Module) -> tuple[dict[str, Tensor], torch.cuda.Event | None]:
        """Start copying `block`'s parameters and buffers to the device; returns them and the copy's event."""
        host = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        if self.copy_stream is None:  # not CUDA: a synchronous copy, or none at all on the CPU
            return {name: t.to(self.device) for name, t in host.items()}, None
        weights = {name: torch.empty_like(t, device=self.device) for name, t in host.items()}  # on C's pool
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for name, t in host.items():
                weights[name].copy_(t, non_blocking=True)
        return weights, self.copy_stream.record_event()


# The pinned allocator rounds each allocation up to a power of two (`CachingHostAllocator`), so blocks are packed
# into shared buffers of at most this many bytes rather than pinned tensor by tensor.
PACK_BYTES = 2**31
ALIGN = 64  # bytes: every tensor starts on a cache line, which also satisfies any dtype's alignment


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack_blocks(blocks: Sequence[nn.Module], *, pin: bool, pack_bytes: int = PACK_BYTES) -> int:
    """Move the blocks' parameters and buffers (on the CPU) into a few shared buffers, page-locked if `pin`;
    returns how many buffers. The values are copied exactly; each tensor becomes a view into its buffer."""
    groups: list[list[nn.Module]] = []
    size = pack_bytes  # forces a first group
    for block in blocks:
        n = sum(_aligned(t.nbytes) for t in block.state_dict().values())
        if size + n > pack_bytes:
            groups.append([])
            size = 0
        groups[-1].append(block)
        size += n
    for group in groups:
        states = [block.state_dict() for block in group]
        buffer = torch.empty(sum(_aligned(t.nbytes) for sd in states for t in sd.values()), dtype=torch.uint8,
                             pin_memory=pin)
        offset = 0
        for block, state in zip(group, states):
            packed = {}
            for name, t in state.items():
                view = buffer[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
                packed[name] = view.copy_(t)
                offset += _aligned(t.nbytes)
            block.load_state_dict(packed, assign=True)  # the block's tensors are now the views
    return len(groups)


def offload_blocks(model: MMDiT, device: str | torch.device) -> MMDiT:
    """Keep `model`'s joint blocks in CPU memory (packed into shared buffers, page-locked for CUDA: that is what
    lets the copies be asynchronous DMA) and everything else on `device`; from now on its forward streams the
    blocks (`BlockStreamer`). `model` must be on the CPU. Returns it."""
    device = torch.device(device)
    for name, child in model.named_children():
        if name != "joint_blocks":
            child.to(device)
    for name, buffer in model.named_buffers(recurse=False):  # the position table
        setattr(model, name, buffer.to(device))
    # Packed on the CPU too (unpinned), so the packing is exercised where there is no GPU.
    pack_blocks(model.joint_blocks, pin=device.type == "cuda")
    model.streamer = BlockStreamer(device)
    return model
