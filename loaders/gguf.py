"""GGUF files of the MM-DiT: reading them, checking what they hold, loading them with the linear layers kept in
their blocks (`mmdit.gguf.GGUFLinear`), and writing them (`write_gguf`, for the converter and the tests).

The files read are those of the SD3.5 GGUF releases and of stable-diffusion.cpp:
* city96's (`sd3.5_large-Q4_0.gguf`, made with ComfyUI-GGUF's `tools/convert.py` and its patched llama.cpp
  quantiser): `general.architecture` = "sd3"; tensor names are the Stability single file's without
  `model.diffusion_model.`; `pos_embed`, the `x_/t_/y_/context_embedder`, the `final_layer` and every tensor
  that is not 2-D stay F16 / F32; `pos_embed` may be stored 2-D, (N, D), and is restored to (1, N, D);
* stable-diffusion.cpp's: no architecture field, names with the prefix (next to a VAE and text encoders, which
  are skipped here);
* either name style of the MM-DiT, Stability's or diffusers' (`transformer_blocks.*`, whose q, k, v rows are
  joined as for safetensors; loaders/transformer_keys.py).
Shapes are stored in ggml's order (innermost first); `GGUFReader` gives them reversed, as torch orders them.
SD3.5-Large's width, 2432, is not a multiple of 256, so its files use the 32-value types (Q4_0 ... Q8_0) for
most layers. The architecture is read from the tensor shapes, as for safetensors (`MMDiTConfig.from_state_dict`).

The file is memory-mapped (`GGUFReader`, copy-on-write, so that nothing can write to it) and never read whole:
on a CPU the stored blocks are used where they lie in the map, on a GPU each tensor is copied over. Only the
small float tensors that are not linear weights (norms, biases, the position table, the patch convolution)
are cast to the run's dtype.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmdit.errors import InputError, MissingInputError
from mmdit.gguf import BLOCK_TYPES, BlockType, GGUFLinear, Workspace, dequantize
from mmdit.model import MMDiT, MMDiTConfig, NotSD3Error
from mmdit.streaming import offload_blocks

from .checkpoint import _transformer_source, _what_is_it, locate
from .fp8 import is_quantized
from .safetensors import CheckpointError, TensorReader, check_fits
from .transformer_keys import diffusers_sources, is_diffusers_layout, swap_halves

MAGIC = b"GGUF"
ARCH = "sd3"  # city96's `general.architecture` for SD3 / SD3.5
PREFIX = "model.diffusion_model."
# What other architectures are, to say what a wrong file holds (`general.architecture` values).
OTHER_ARCHS = {
    "flux": "a FLUX transformer", "sdxl": "an SDXL UNet", "sd1": "a Stable Diffusion 1.x UNet",
    "aura": "an AuraFlow transformer", "hidream": "a HiDream transformer", "wan": "a Wan video transformer",
    "hyvid": "a HunyuanVideo transformer", "ltxv": "an LTX-Video transformer", "lumina2": "a Lumina 2 transformer",
    "qwen_image": "a Qwen-Image transformer", "cosmos": "a Cosmos transformer", "t5": "a T5 text encoder",
    "t5encoder": "a T5 text encoder",
}
# Kept in 16 or 32 bits by the converters (ComfyUI-GGUF's llama.cpp patch): small, or read by every token.
UNQUANTIZED = ("pos_embed", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "final_layer.")
SMALL = 1024  # tensors of at most this many values stay F32 (ComfyUI-GGUF's QUANTIZATION_THRESHOLD)
WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")  # what `gguf.quants.quantize` makes


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read, or holds something this engine does not run."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the file: its logical shape (torch order), its block type, and its bytes where they lie in
    the memory map (uint8 rows for a block type, the float array for F32 / F16, uint8 for BF16)."""

    name: str  # as the file spells it
    shape: tuple[int, ...]
    block: BlockType
    data: np.ndarray

    def stored(self) -> Tensor:
        """The bytes as a torch tensor without a copy: uint8 (..., bytes a row), or the floats (..., values)."""
        t = torch.from_numpy(self.data)
        if self.block.name == "BF16":
            t = t.view(torch.bfloat16)
        return t if self.block.float_dtype is None else t.reshape(self.shape)


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A GGUF file's MM-DiT: its tensors under our (Stability) names, from the header; no data read yet."""

    path: Path
    architecture: str | None
    tensors: Mapping[str, tuple[tuple[StoredTensor, ...], bool]]  # our key -> (its file tensors, swap halves?)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: _joined_shape(parts, k) for k, (parts, _) in self.tensors.items()}

    def config(self) -> MMDiTConfig:
        meta = {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}
        try:
            return MMDiTConfig.from_state_dict(meta)
        except NotSD3Error as e:
            raise NotSD3Error(f"{self.path}: {e}{_what_is_it(meta)}") from None

    def block(self, key: str) -> BlockType:
        """The block type of one of our tensors (its parts share one)."""
        return self.tensors[key][0][0].block

    def stored(self, key: str) -> Tensor:
        """One of our tensors as stored (uint8 rows or floats), its parts joined along dim 0 and halves swapped as
        the key map says; the shape is logical for floats, (rows, bytes a row) for blocks."""
        parts, swap = self.tensors[key]
        pieces = [p.stored() for p in parts]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return swap_halves(t) if swap else t


def _joined_shape(parts: tuple[StoredTensor, ...], key: str) -> tuple[int, ...]:
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    if key == "pos_embed" and len(shape) == 2:  # stored (N, D) by some quantisers: the model's table is (1, N, D)
        shape = (1, *shape)
    return shape


def _header(path: Path) -> tuple[int, int, int]:
    """(version, tensor count, metadata count) from the first 24 bytes, or a GGUFError saying what the file is."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != MAGIC:
        what = "empty" if not head else f"it starts with {head[:8]!r}"
        if len(head) >= 9 and head[8:9] == b"{":
            what += ", like a safetensors file: give it as a .safetensors file"
        elif head[:2] == b"PK":
            what += ", like a zipped PyTorch checkpoint (pickles are never loaded)"
        raise GGUFError(f"{path}: not a GGUF file ({what}); a GGUF file starts with the bytes 'GGUF'")
    if len(head) < 24:
        raise GGUFError(f"{path}: a GGUF file cut short inside its header ({len(head)} bytes); download it again")
    return struct.unpack("<IQQ", head[4:24])


def read_gguf(path: str | Path) -> GGUFFile:
    """Read a GGUF file's header (the data stays in the memory map) and check that it holds an SD3-family MM-DiT
    in block types this engine decodes; every problem is a one-line GGUFError saying what the file holds."""
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file")
    version, count, _ = _header(path)
    size = path.stat().st_size
    try:
        reader = GGUFReader(path, "c")  # copy-on-write: tensors are writable views that never reach the file
    except Exception as e:  # a short or corrupt file fails in numpy or in the reader's own checks
        if isinstance(e, ValueError) and "GGMLQuantizationType" in str(e):  # a type number `gguf` has no name for
            raise GGUFError(f"{path}: a tensor is stored in a block type unknown to the gguf package "
                            f"({_reason(e)}); supported: {', '.join(BLOCK_TYPES)}") from None
        raise GGUFError(f"{path}: a GGUF v{version} file of {count} tensors that cannot be read ({size} bytes; "
                        f"{_reason(e)}): it is truncated or corrupt, download it again") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path}: a GGUF file cut short: {size} bytes, its tensors need {end}; download it again")
    architecture = _string_field(reader, "general.architecture")
    if architecture is not None and architecture != ARCH:
        what = OTHER_ARCHS.get(architecture, f"a {architecture!r} model (a language model, or another family)")
        raise NotSD3Error(f"{path} holds {what} (general.architecture = {architecture!r}), not an SD3 / SD3.5 "
                          "MM-DiT; give an SD3-family GGUF file (e.g. sd3.5_large-Q4_0.gguf)")
    names = [t.name for t in reader.tensors]
    prefixed = any(n.startswith(PREFIX) for n in names)
    stored: dict[str, StoredTensor] = {}
    for t in reader.tensors:
        if prefixed and not t.name.startswith(PREFIX):
            continue  # stable-diffusion.cpp's files also hold the VAE and the text encoders
        block = BLOCK_TYPES.get(t.tensor_type.name)
        if block is None:
            supported = ", ".join(BLOCK_TYPES)
            raise GGUFError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which this engine does not "
                            f"decode (supported: {supported}); use a file quantised to one of those")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        stored[t.name.removeprefix(PREFIX) if prefixed else t.name] = StoredTensor(t.name, shape, block, t.data)
    if not stored:
        raise NotSD3Error(f"{path}: a GGUF file with no MM-DiT tensors (its tensors: {', '.join(names[:5]) or 'none'})")
    keys = list(stored)
    sources = diffusers_sources(keys) if is_diffusers_layout(keys) else {k: ((k,), False) for k in keys}
    tensors = {}
    for key, (parts, swap) in sources.items():
        found = tuple(stored[p] for p in parts)
        if len({p.block for p in found}) > 1:
            raise GGUFError(f"{path}: {', '.join(p.name for p in found)} make up our {key} but are stored in "
                            f"different types ({', '.join(p.block.name for p in found)}), which cannot be joined")
        tensors[key] = (found, swap)
    return GGUFFile(path, architecture, tensors)


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError, TypeError):
        raise GGUFError(f"{reader.data.filename}: its {key} field is not a string") from None


def is_gguf(path: str | Path) -> bool:
    """Whether a path names a GGUF file (by its suffix, which is what the converters write)."""
    return Path(path).suffix.lower() == ".gguf"


def load_gguf_transformer(file: GGUFFile, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          offload: str = "none") -> MMDiT:
    """The MM-DiT of a GGUF file, computing in `dtype` on `device`.

    Every linear layer becomes a `GGUFLinear` holding its weight as the file stores it (any type, F16 included),
    dequantised at each call; the other tensors (a quantised one too) are decoded once to `dtype`. On a CPU the
    stored weights are views into the memory map. offload="blocks" keeps the joint blocks in CPU memory and
    streams them to `device` (mmdit/streaming.py), as for safetensors. Returns the model in eval mode.
    """
    what = f"MM-DiT from {file.path}"
    config = file.config()
    with torch.device("meta"):
        model = MMDiT(config)
    check_fits(model, file.shapes, what=what)
    home = torch.device("cpu" if offload == "blocks" else device)
    workspace = Workspace()
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        new = GGUFLinear(layer.in_features, layer.out_features, layer.bias is not None,
                         block=file.block(f"{name}.weight"), compute_dtype=dtype, device="meta")
        new.workspace = workspace
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    state: dict[str, Tensor] = {}
    for key, shape in file.shapes.items():
        t = file.stored(key)
        if key not in linears:  # decoded once: norms, biases, the position table, the patch convolution
            t = dequantize(t, file.block(key), dtype).reshape(shape)
        state[key] = t.to(home)
        if not any(state[key].data_ptr() == p.data.ctypes.data for p in file.tensors[key][0]):
            _release(file.tensors[key][0])  # copied or converted: the mapped bytes are not needed again
    model.load_state_dict(state, strict=True, assign=True)
    model = model.requires_grad_(False).eval()
    return offload_blocks(model, device) if offload == "blocks" else model


def _release(parts: tuple[StoredTensor, ...]) -> None:
    """Drop the pages these tensors occupy in the memory map from this process's resident memory: a mapped page
    once read stays resident while the map lives, though a copy is what is used. The file's bytes are read again
    if they are ever touched. Whole pages only; where `madvise` does not exist (Windows), nothing."""
    import ctypes
    import mmap

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    for p in parts:
        start = -(-p.data.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (p.data.ctypes.data + p.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED (Linux, macOS)


# ------------------------------------------------------------------------------------------------ writing


def quantized_type(key: str, shape: tuple[int, ...], qtype: str, source: torch.dtype) -> str:
    """The type a converter gives one MM-DiT tensor (ComfyUI-GGUF's rules): `qtype` for the 2-D weights of the
    joint blocks whose rows split into its blocks; F32 for vectors and tiny tensors; 16 bits (BF16 for a
    bfloat16 source, else F16) for the rest: the embedders, the final layer, the position table, convolutions."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    numel = int(np.prod(shape))
    if len(shape) <= 1 or numel <= SMALL:
        return "F32"
    half = "BF16" if source == torch.bfloat16 else "F16"
    if len(shape) != 2 or key.startswith(UNQUANTIZED) or qtype in ("F16", "BF16", "F32"):
        return qtype if qtype == "F32" else half
    if shape[1] % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]:
        return half
    return qtype


def write_gguf(path: str | Path, tensors: Iterable[tuple[str, Tensor]], qtype: str = "Q8_0", *,
               pos_embed_2d: bool = False, types: Mapping[str, str] | None = None,
               raw: Mapping[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """Write an MM-DiT's tensors ((Stability name, tensor) pairs, e.g. `state_dict().items()`) as a GGUF file,
    quantised as `quantized_type` says. Each tensor is quantised as it comes; the file is written at the end.

    Names may carry stable-diffusion.cpp's "model.diffusion_model." (the types go by the name without it).
    `pos_embed_2d`: store the position table as (N, D); `types`: per-key overrides of the type; `raw`: per key,
    bytes already in a block type (uint8 (rows, bytes a row), type name), for the types `gguf` cannot quantise
    (tests)."""
    import gguf

    if qtype not in WRITABLE:
        raise InputError(f"GGUF type {qtype!r} cannot be written here; choose one of {', '.join(WRITABLE)} "
                         "(the `gguf` package quantises only these)")
    path = Path(path)
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    raw = raw or {}
    for name, t in tensors:
        key = name.removeprefix(PREFIX)
        if key in raw:
            data, kind = raw[key]
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
            continue
        shape = tuple(t.shape[1:]) if key == "pos_embed" and pos_embed_2d else tuple(t.shape)
        kind = (types or {}).get(key) or quantized_type(key, shape, qtype, t.dtype)
        values = t.detach().to(torch.float32).reshape(shape).numpy()
        data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_transformer(checkpoint_path: str | Path) -> Iterator[tuple[str, Tensor]]:
    """The MM-DiT tensors of a safetensors checkpoint (a Stability single file, a bare MM-DiT file or a diffusers
    folder), one at a time under Stability names, as stored: what `write_gguf` takes. A float8 file is refused
    (its scales would be lost: convert the 16-bit release)."""
    files, prefix, _ = _transformer_source(locate(checkpoint_path))
    with TensorReader(files, prefix) as reader:
        if is_quantized(reader):
            raise InputError(f"{checkpoint_path}: a float8 checkpoint; convert the 16- or 32-bit release instead")
        keys = reader.keys()
        sources = diffusers_sources(keys) if is_diffusers_layout(keys) else {k: ((k,), False) for k in keys}
        for key, (parts, swap) in sources.items():
            pieces = [reader.read(p) for p in parts]
            t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            yield key, swap_halves(t) if swap else t
