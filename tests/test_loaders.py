"""Loading the official layouts strictly: every kind of bad file is an error that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loaders.checkpoint import load_transformer, load_vae, locate, transformer_config, vae_config, variant
from loaders.hub import ModelSource, _patterns, download, resolve_model
from loaders.safetensors import CheckpointError, read_tensors, weight_files
from mmdit.model import NotSD3Error
from tests._fixtures import diffusers_transformer, diffusers_vae, write_single_file


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    path = root / "sd3.5_tiny.safetensors"
    write_single_file(path, diffusers_transformer("sd3.5-large").state_dict(), diffusers_vae().state_dict())
    return path


def edited(single, tmp_path, change) -> Path:
    tensors = load_file(str(single))
    change(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path))
    return path


def test_single_file_loads_in_requested_dtype(single):
    model = load_transformer(locate(single), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    vae = load_vae(locate(single))
    assert vae.config.latent_channels == 16
    assert vae_config(locate(single)) == vae.config  # the headers alone give the same configuration


def test_vae_config_from_a_diffusers_folder(tmp_path):
    """vae/config.json's group count and latent constants, and the shapes, as `load_vae` sees them."""
    ref = diffusers_vae()
    ref.register_to_config(scaling_factor=1.25, shift_factor=0.5)  # not SD3's defaults: must come from the json
    (tmp_path / "transformer").mkdir()
    ref.save_pretrained(tmp_path / "vae")
    checkpoint = locate(tmp_path)
    config = vae_config(checkpoint)
    assert (config.scaling_factor, config.shift_factor, config.norm_groups) == (1.25, 0.5, 32)
    assert config == load_vae(checkpoint).config


def test_missing_key_is_named(single, tmp_path):
    path = edited(single, tmp_path, lambda t: t.pop("model.diffusion_model.joint_blocks.0.x_block.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): joint_blocks\.0\.x_block\.mlp\.fc2\.bias"):
        load_transformer(locate(path))


def test_unexpected_key_is_named(single, tmp_path):
    path = edited(single, tmp_path, lambda t: t.update({"model.diffusion_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): extra\.weight"):
        load_transformer(locate(path))


def test_wrong_shape_names_key_and_both_shapes(single, tmp_path):
    key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.bias"
    path = edited(single, tmp_path, lambda t: t.update({key: torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"joint_blocks\.1\.x_block\.mlp\.fc1\.bias \(expected \[128\], found \[7\]\)"):
        load_transformer(locate(path))


def test_vae_missing_key_is_named(single, tmp_path):
    path = edited(single, tmp_path, lambda t: t.pop("first_stage_model.decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias"):
        load_vae(locate(path))


def test_sdxl_like_file_is_recognised(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))
    with pytest.raises(NotSD3Error, match=r"not an SD3 / SD3.5 MM-DiT checkpoint.*looks like a UNet"):
        transformer_config(locate(path))


def test_truncated_file_says_so(single, tmp_path):
    data = single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(locate(cut))


def test_garbage_file_says_so(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_tensors(bad)


def test_pickles_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="pickled"):
        locate(ckpt)
    folder = tmp_path / "pipe" / "transformer"
    folder.mkdir(parents=True)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"never loaded; convert them to safetensors"):
        weight_files(folder)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        locate(tmp_path)


def test_sharded_diffusers_folder(tmp_path):
    """A transformer saved in shards with an index, as the large Hub repos are."""
    ref = diffusers_transformer("sd3.5-large")
    pipe_dir = tmp_path / "pipe"
    ref.save_pretrained(pipe_dir / "transformer", max_shard_size="20KB")
    assert len(list((pipe_dir / "transformer").glob("*.safetensors"))) > 1
    model = load_transformer(locate(pipe_dir))
    ours = {k: v for k, v in model.state_dict().items()}
    from loaders.transformer_keys import transformer_from_diffusers

    expected = transformer_from_diffusers(ref.state_dict())
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


def test_turbo_is_told_by_name(single, tmp_path):
    turbo = tmp_path / "sd3.5_large_turbo.safetensors"
    turbo.symlink_to(single)
    assert variant(locate(turbo), transformer_config(locate(turbo))) == "sd3.5-large-turbo"
    assert variant(locate(single), transformer_config(locate(single))) == "sd3.5-large"


# --- Hub resolution, with huggingface_hub's network calls replaced (no network here) ---------------------

def test_local_path_and_bad_names(single):
    assert resolve_model(str(single)) == ModelSource(single, str(single))
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        resolve_model("./no/such/thing.safetensors")


def test_download_fetches_only_needed_files(monkeypatch, tmp_path):
    import huggingface_hub

    files = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "vae/config.json", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
             "text_encoder_3/model-00001-of-00002.safetensors", "tokenizer/vocab.json", "tokenizer_2/vocab.json",
             "tokenizer_3/spiece.model", "sd3.5_medium.safetensors", "text_encoders/clip_l.safetensors"]
    seen = {}
    (tmp_path / "transformer").mkdir()
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: files)

    def fake_snapshot(repo_id, allow_patterns, ignore_patterns):
        seen.update(repo=repo_id, allow=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert download("stabilityai/stable-diffusion-3.5-medium", need_t5=False) == tmp_path
    assert "sd3.5_medium.safetensors" not in seen["allow"] and "text_encoders/*" not in seen["allow"]
    assert "transformer/*" in seen["allow"] and "text_encoder_3/*" not in seen["allow"]
    assert "text_encoder_3/*" in _patterns(files, need_t5=True)
    singles = _patterns(["sd3_medium.safetensors", "sd3_medium_incl_clips.safetensors",
                         "text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                         "text_encoders/t5xxl_fp16.safetensors"], need_t5=True)
    assert singles[0] == "sd3_medium.safetensors" and "text_encoders/t5xxl_fp16.safetensors" in singles


def test_gated_repo_says_how_to_get_access(monkeypatch):
    from unittest.mock import MagicMock

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(self, repo):
        raise GatedRepoError("403 gated", response=MagicMock(headers={}))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", gated)
    with pytest.raises(PermissionError, match=r"accept the license.*HF_TOKEN"):
        download("stabilityai/stable-diffusion-3.5-large")


def test_offline_without_cache_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(FileNotFoundError, match="not in the local cache"):
            download("stabilityai/stable-diffusion-3.5-medium")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
