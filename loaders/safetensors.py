"""Reading safetensors files and loading them, strictly, into modules built on the meta device.

Only safetensors: a checkpoint never runs code on load, so nothing here ever unpickles. Every problem is a
`CheckpointError` that names the file or the key and says what was expected.

The loading recipe (as in black-forest-labs/flux's `load_flow_model`): build the module under
`torch.device("meta")` (no memory, no random init), read the tensors, cast each one once to the requested
dtype and device, and hand them to `load_state_dict(strict=True, assign=True)` so the module's parameters
*are* those tensors: no second copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor, nn

from mmdit.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(InputError):
    """A weight file is missing, unreadable, of the wrong kind, or does not fit the model."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one component in a diffusers/transformers folder.

    A sharded component ships `*.safetensors.index.json` whose `weight_map` names the shards; otherwise the
    folder holds one `*.safetensors` file (a variant such as `model.fp16.safetensors` is only used when it is
    the sole file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > 1:
        plain = [f for f in files if f.name.count(".") == 1]
        files = plain if len(plain) == 1 else files
    if len(files) == 1:
        return files
    if files:
        raise CheckpointError(
            f"{folder} holds several safetensors files and no index: {[f.name for f in files]}; "
            "keep one, or add the *.safetensors.index.json that names the shards"
        )
    pickled = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
    hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"{folder}: no .safetensors file{hint}")


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled checkpoints are never loaded (they can run code); use the .safetensors release"
        )
    return path


def _open(path: Path, device: str | torch.device = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt, download it again"
        ) from None


def read_shapes(files: Path | Sequence[Path], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key -> shape for every tensor under `prefix` (stripped), read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in [files] if isinstance(files, (str, Path)) else files:
        path = _check_file(path)
        with _open(path) as f:
            for key in f.keys():
                if key.startswith(prefix):
                    shapes[key[len(prefix) :]] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_meta(files: Path | Sequence[Path], prefix: str = "") -> dict[str, Tensor]:
    """Like `read_shapes`, as shape-only tensors on the meta device: key maps and config inference run on them
    before (or without) reading any data."""
    return {k: torch.empty(shape, device="meta") for k, shape in read_shapes(files, prefix).items()}


def read_tensors(
    files: Path | Sequence[Path], prefix: str = "", *, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Every tensor whose key starts with `prefix`, with the prefix stripped, from one file or a set of shards."""
    tensors: dict[str, Tensor] = {}
    for path in [files] if isinstance(files, (str, Path)) else files:
        path = _check_file(path)
        with _open(path, device) as f:
            for key in f.keys():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
                try:
                    tensors[name] = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(
                        f"{path}: cannot read tensor {key!r} ({e}); the file may be truncated or corrupt"
                    ) from None
    return tensors


# safetensors dtype names (the header's "dtype") of the tensors these models hold
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorReader:
    """One component's tensors (from one file or its shards), read one at a time when asked for, so that a loader
    can convert each tensor before it reads the next and the checkpoint is never in memory whole.

    Keys are those under `prefix`, with the prefix stripped; `metadata` is the files' `__metadata__` merged.
    Use it as a context manager: the files are open inside the `with` block. safetensors (`safe_open`) checks
    each header; the data is then read with plain file reads into memory of our own, not through safetensors'
    memory map: pages of a mapped file count as this process's resident memory once touched, and stay mapped
    while any tensor points into the map, so quantising every weight through the map would put the whole file
    into the peak resident size (tests/test_fp8.py measures this).
    """

    def __init__(self, files: Path | Sequence[Path], prefix: str = "", *, device: str | torch.device = "cpu"):
        self.paths = [_check_file(p) for p in ([files] if isinstance(files, (str, Path)) else files)]
        self.prefix, self.device = prefix, torch.device(device)
        self.metadata: dict[str, str] = {}
        self._where: dict[str, tuple[BinaryIO, int, int, tuple[int, ...], str]] = {}  # file, start, end, shape, dtype
        self._files = ExitStack()

    def __enter__(self) -> TensorReader:
        try:
            for path in self.paths:
                self._index(path)
        except BaseException:
            self._files.close()
            raise
        return self

    def _index(self, path: Path) -> None:
        with _open(path) as f:  # validates the header (offsets, dtypes, sizes) or says the file is corrupt
            self.metadata.update(f.metadata() or {})
        handle = self._files.enter_context(open(path, "rb"))
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        for key, entry in header.items():
            if key == "__metadata__" or not key.startswith(self.prefix):
                continue
            name = key[len(self.prefix) :]
            if name in self._where:
                raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
            begin, end = entry["data_offsets"]
            self._where[name] = (handle, 8 + size + begin, 8 + size + end, tuple(entry["shape"]), entry["dtype"])

    def __exit__(self, *exc) -> None:
        self._files.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][3]

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype (None for a kind torch has no name for here)."""
        return DTYPES.get(self._where[key][4])

    def read(self, key: str) -> Tensor:
        handle, begin, end, shape, dtype = self._where[key]
        if dtype not in DTYPES:
            raise CheckpointError(f"{handle.name}: tensor {key!r} has dtype {dtype}, which is not read here")
        data = torch.empty(end - begin, dtype=torch.uint8)
        handle.seek(begin)
        if handle.readinto(memoryview(data.numpy())) != end - begin:
            raise CheckpointError(f"{handle.name}: tensor {key!r} is cut short; the file is truncated, "
                                  "download it again")
        t = data.view(DTYPES[dtype]).reshape(shape)
        return t if self.device.type == "cpu" else t.to(self.device)


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fits(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, what: str) -> None:
    """A CheckpointError naming every missing, unexpected and wrongly shaped tensor, if `shapes` (key -> shape
    of the tensors about to be loaded) does not match `module`'s state dict exactly."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = expected.keys() - shapes.keys()
    unexpected = shapes.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
    wrong = [
        f"{k} (expected {list(expected[k])}, found {list(shapes[k])})"
        for k in sorted(expected.keys() & shapes.keys())
        if tuple(shapes[k]) != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{what}: the weights do not fit the model: " + " | ".join(problems))


def total(t: Tensor) -> Tensor:
    """The float64 sum of a floating tensor, not yet read back: finite exactly when every element is (NaN and
    infinity propagate through a sum, and float64 cannot overflow on weights), one cheap op per tensor."""
    return (t.to(torch.float16) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t).sum(dtype=torch.float64)


def check_finite(totals: Mapping[str, Tensor], what: str) -> None:
    """A CheckpointError naming the first tensor whose `total` is NaN or infinite: a damaged file, or values too
    large for the dtype they were cast to. All totals are read back at once (one device sync)."""
    if not totals:
        return
    device = next(iter(totals.values())).device
    finite = torch.isfinite(torch.stack([t.to(device) for t in totals.values()])).cpu()
    if bool(finite.all()):
        return
    key = next(k for k, ok in zip(totals, finite.tolist()) if not ok)
    raise CheckpointError(f"{what}: tensor {key!r} holds NaN or infinite values: the file is damaged (download it "
                          "again, or ask whoever made it), or its values are too large for the dtype asked for "
                          "(then use bfloat16 or float32)")


def load_weights(
    module: nn.Module,
    state: dict[str, Tensor],
    *,
    what: str,
    dtype: torch.dtype,
    device: str | torch.device,
    fp32_keys: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Load `state` into `module` (built on the meta device) strictly, in `dtype` on `device`.

    Floating tensors (float8 included, which is upcast) become `dtype`, except keys for which `fp32_keys`
    says True; integer tensors keep their dtype. `state` is consumed: each entry is replaced by its cast copy
    as we go, so peak memory is the checkpoint plus one tensor. Returns the module in eval mode, without grads.
    """
    check_fits(module, {k: tuple(t.shape) for k, t in state.items()}, what=what)
    totals: dict[str, Tensor] = {}
    for key in list(state):
        t = state[key]
        if t.is_floating_point():
            target = torch.float32 if fp32_keys is not None and fp32_keys(key) else dtype
            state[key] = t.to(device=device, dtype=target)
            totals[key] = total(state[key])  # NaN weights would give black images, silently
        else:
            state[key] = t.to(device=device)
    check_finite(totals, what)
    module.load_state_dict(state, strict=True, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:  # a buffer the checkpoint does not carry: the module must create it itself
        raise CheckpointError(f"{what}: tensors left without data after loading: {_listing(still_meta)}")
    return module.requires_grad_(False).eval()
