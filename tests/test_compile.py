"""`compile=True` / `--compile`: torch.compile of the MM-DiT's blocks, its numerics, and what it refuses."""

from __future__ import annotations

import shutil

import pytest
import torch

from loaders import Pipeline
from mmdit.conditioning import Conditioning
from mmdit.errors import InputError
from tests._fixtures import diffusers_transformer, diffusers_vae, write_single_file


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "model.safetensors"
    transformer = diffusers_transformer("sd3-medium")  # 2 blocks: one joint, one pre-only (two graphs)
    write_single_file(path, transformer.state_dict(), diffusers_vae().state_dict())
    return path


def embeds(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 12, 64, generator=g), torch.randn(1, 48, generator=g))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_blocks_equal_eager_ones_up_to_rounding(tiny_file):
    settings = dict(prompt_embeds=embeds(1), negative_embeds=embeds(2), steps=2, cfg=3.0, height=32, width=32,
                    slg_layers=())
    eager = Pipeline.load(tiny_file, device="cpu")(**settings)
    pipe = Pipeline.load(tiny_file, device="cpu", compile=True, keep_loaded=True)
    compiled = pipe(**settings)
    scale = eager.latents.abs().max()
    assert (compiled.latents - eager.latents).abs().max() <= 1e-5 * scale  # float32 tolerance of the parity tests
    assert compiled.record["compile"] is True and "compile" not in eager.record
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in pipe.transformer().joint_blocks)


def test_compile_refusals_say_what_to_do(tiny_file, monkeypatch):
    with pytest.raises(InputError, match="--compile and --offload blocks"):
        Pipeline.load(tiny_file, device="cpu", compile=True, offload="blocks")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(InputError, match="needs a C.. compiler"):
        Pipeline.load(tiny_file, device="cpu", compile=True)
