"""`--transformer FILE` / `Pipeline.load(transformer=FILE)`: the MM-DiT from a file of its own.

The file is a GGUF file (loaders/gguf.py) or a safetensors file holding the MM-DiT alone (Stability or
diffusers names, with or without `model.diffusion_model.`); its architecture is read from its tensor shapes.
Everything else (text encoders, VAE, tokenizers) comes from `--model`, so the file must fit them: the width of
the prompt embeddings (T5), of the pooled embedding (CLIP-L + CLIP-G) and the latent channels (VAE) are
compared with `--model`'s own MM-DiT, which was made for those parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.errors import MissingInputError
from mmdit.model import MMDiT, MMDiTConfig

from .checkpoint import Checkpoint, load_transformer, transformer_config
from .gguf import MAGIC, GGUFFile, is_gguf, load_gguf_transformer, read_gguf
from .safetensors import CheckpointError


@dataclass(frozen=True, eq=False)
class TransformerFile:
    """An MM-DiT file, opened (its header read) and its configuration inferred."""

    path: Path
    config: MMDiTConfig
    gguf: GGUFFile | None  # None: a safetensors file

    @classmethod
    def open(cls, path: str | Path) -> TransformerFile:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingInputError(f"--transformer {path}: no such file" + (" (a folder: give the .gguf or "
                                    ".safetensors file in it)" if path.is_dir() else ""))
        with open(path, "rb") as f:
            gguf_magic = f.read(4) == MAGIC
        if gguf_magic or is_gguf(path):
            file = read_gguf(path)
            return cls(path, file.config(), file)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"--transformer {path}: give a .gguf file or a .safetensors file holding the MM-DiT "
                                  "(pickled .ckpt/.pt/.bin files are never loaded)")
        return cls(path, transformer_config(Checkpoint(path, single_file=True)), None)

    @property
    def checkpoint(self) -> Checkpoint:
        """The file as a `Checkpoint`, for what is decided by the MM-DiT's file (its name, its variant)."""
        return Checkpoint(self.path, single_file=True)

    def check_fits(self, model: MMDiTConfig, label: str) -> None:
        """A CheckpointError unless this MM-DiT takes what `--model`'s parts give (`model`: --model's own MM-DiT)."""
        pairs = (("prompt embeddings (T5) of width", self.config.context_dim, model.context_dim),
                 ("a pooled embedding (CLIP-L + CLIP-G) of width", self.config.pooled_dim, model.pooled_dim),
                 ("latents (VAE) with channels", self.config.in_channels, model.in_channels))
        wrong = [f"{what} {ours}, where --model gives {theirs}" for what, ours, theirs in pairs if ours != theirs]
        if self.config.out_channels != model.out_channels:
            wrong.append(f"a velocity of {self.config.out_channels} channels, where --model's VAE decodes "
                         f"{model.out_channels}")
        if wrong:
            raise CheckpointError(f"--transformer {self.path} ({self.config.variant}, {self.config.depth} blocks) does "
                                  f"not fit --model {label}: it takes {'; '.join(wrong)}. Give the --model whose "
                                  "text encoders and VAE it was made for")

    def load(self, *, dtype: torch.dtype, device: str | torch.device, offload: str, weights: str) -> MMDiT:
        """The MM-DiT. A GGUF file keeps its own blocks (`weights` then applies to T5 only); a safetensors file
        loads as the MM-DiT of a `--model` does, `weights` included."""
        if self.gguf is not None:
            return load_gguf_transformer(self.gguf, dtype=dtype, device=device, offload=offload)
        return load_transformer(self.checkpoint, dtype=dtype, device=device, offload=offload, weights=weights)
