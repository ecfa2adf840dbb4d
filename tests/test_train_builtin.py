"""`scripts/builtin/train.py`'s trainable text side and `scripts/builtin/tokenizers.py` (training the models
itself is not part of the suite)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from loaders import builtin


def test_text_tower_starts_as_the_frozen_encoders_and_exports_their_layout(tmp_path):
    """TextTower (the encoders trained with the MM-DiT) gives, at its first weights, exactly the conditioning
    generation computes from the same files; every encoder gets a gradient except CLIP-L's projection (which
    Stability's clip_l file does not carry), and export writes the files with the keys they had."""
    from mmdit.model import MMDiT
    from mmdit.vae import VAE
    from scripts.builtin.train import TextTower, all_captions, encode_captions, export, write_text_side

    folder = tmp_path / "text"
    write_text_side(folder, 0, 16)
    captions = all_captions()[::211] + [""]
    context, pooled = encode_captions(folder, captions)
    tower = TextTower(folder, captions, 16, builtin.PRESET.max_sequence_length, builtin.TRANSFORMER.context_dim)
    with torch.no_grad():
        c, p = tower(torch.arange(len(captions)))
    assert torch.equal(c, context) and torch.equal(p, pooled)

    c, p = tower(torch.tensor([0, 1]))
    (c.square().mean() + p.square().mean()).backward()
    for name, param in tower.named_parameters():
        if name == "clip_l.text_projection.weight":
            assert not param.requires_grad
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name

    with torch.no_grad():
        tower.t5.shared.weight.add_(1.0)  # a "trained" T5
    dest = tmp_path / "out"
    export(MMDiT(builtin.TRANSFORMER), VAE(builtin.VAE_CONFIG), folder, dest, tower)
    for name in ("clip_l", "clip_g", "t5xxl_fp16"):
        before = load_file(str(folder / "text_encoders" / f"{name}.safetensors"))
        after = load_file(str(dest / "text_encoders" / f"{name}.safetensors"))
        assert before.keys() == after.keys(), name
    t5 = load_file(str(dest / "text_encoders" / "t5xxl_fp16.safetensors"))["shared.weight"]
    assert torch.equal(t5, tower.t5.shared.weight.detach().to(torch.float16))


def test_dit_stopped_and_resumed_is_the_same_run(tmp_path):
    """`--dit-stop-at` then the same command without it gives the weights of one uninterrupted run: every random
    draw comes from a saved generator, and the schedule spans --dit-steps either way."""
    from scripts.builtin.train import Log, parse_args, train_dit

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 16, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    contexts = torch.randn(4, 32, builtin.TRANSFORMER.context_dim, generator=g)
    pooled = torch.randn(4, builtin.TRANSFORMER.pooled_dim, generator=g)

    def run(work, *extra):
        args = parse_args(["--work", str(work), "--dit-steps", "3", "--dit-batch", "2", "--no-bf16", *extra])
        work.mkdir(exist_ok=True)
        return train_dit(args, Log(work / "train.log"), latents, labels, contexts, pooled, empty=3)

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", "--dit-stop-at", "1") is None
    resumed = run(tmp_path / "b")
    assert "resumed at step 1" in (tmp_path / "b" / "train.log").read_text()
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["final_layer.linear.weight"], torch.zeros_like(a["final_layer.linear.weight"]))


def test_text_frozen_at_text_steps_across_a_resume(tmp_path):
    """With --train-text the encoders train for --text-steps steps, then stay as they were (what ships is their
    weights at the freeze, which the MM-DiT trained on from there); a run stopped before the freeze, stopped
    again after it and resumed gives exactly the weights of one uninterrupted run."""
    from scripts.builtin.train import Log, TextTower, all_captions, parse_args, train_dit, write_text_side

    folder = tmp_path / "text"
    write_text_side(folder, 0, 16)
    captions = all_captions()[:3] + [""]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 16, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def new_tower():
        return TextTower(folder, captions, 16, builtin.PRESET.max_sequence_length, builtin.TRANSFORMER.context_dim)

    def run(work, *extra):
        args = parse_args(["--work", str(work), "--dit-steps", "6", "--text-steps", "4", "--dit-batch", "2",
                           "--no-bf16", *extra])
        work.mkdir(exist_ok=True)
        tower = new_tower()
        model = train_dit(args, Log(work / "train.log"), latents, labels, None, None, empty=3, text=tower)
        return model, tower

    first = new_tower().state_dict()
    model_a, tower_a = run(tmp_path / "a")
    assert run(tmp_path / "b", "--dit-stop-at", "1")[0] is None
    assert run(tmp_path / "b", "--dit-stop-at", "5")[0] is None  # resumed at 1, frozen at 4, stopped at 5
    after_freeze = torch.load(tmp_path / "b" / "dit.pt", weights_only=False)["model"]
    model_b, tower_b = run(tmp_path / "b")
    log = (tmp_path / "b" / "train.log").read_text()
    assert "frozen from step 4" in log and "resumed at step 5" in log
    for a, b in ((model_a, model_b), (tower_a, tower_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    text = tower_b.state_dict()
    assert all(torch.equal(text[k], after_freeze[f"text.{k}"]) for k in text)  # unchanged after step 4
    # but trained before it (from step 2: at step 0 adaLN-Zero's gates and the final layer, zero, pass no
    # gradient back to the text)
    assert not torch.equal(text["t5.shared.weight"], first["t5.shared.weight"])


def test_bf16_defaults_to_what_the_cpu_computes_natively(monkeypatch, tmp_path):
    """Without --bf16 / --no-bf16 the autocast follows the CPU: emulated bfloat16 (an AVX2-only CPU) made a step
    about 15x slower than float32 (docs/builtin-model.md), so it is on only where it is native."""
    from scripts.builtin.train import parse_args

    work = ["--work", str(tmp_path)]
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert parse_args(work).bf16 is native
        assert parse_args([*work, "--bf16"]).bf16 is True
        assert parse_args([*work, "--no-bf16"]).bf16 is False


def test_builtin_tokenizer_files_are_deterministic_and_silent(tmp_path, capfd):
    """The tokenizer trainer writes the shipped tokenizer files byte for byte (at the CLIP length 77 that
    `tests._fixtures.builtin_tokenizers` gives them), printing nothing, and trains the same merges every time."""
    from scripts.builtin.tokenizers import train_clip_bpe, write_builtin_tokenizers
    from tests._fixtures import builtin_tokenizers

    shipped, trained = builtin_tokenizers(tmp_path / "shipped"), tmp_path / "trained"
    capfd.readouterr()
    write_builtin_tokenizers(trained)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # sentencepiece logs at C++ level unless silenced
    for sub in ["tokenizer", "tokenizer_2", "tokenizer_3"]:
        for file in (shipped / sub).iterdir():
            assert (trained / sub / file.name).read_bytes() == file.read_bytes(), f"{sub}/{file.name} differs"
    assert train_clip_bpe()[1] == train_clip_bpe()[1]
