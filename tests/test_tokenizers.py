"""Tokenizer parity with transformers 5 (docs/numerics.md §6.1, §6.2, §6.3): our ids must equal those of
``CLIPTokenizer.from_pretrained`` / ``T5TokenizerFast.from_pretrained`` called the way diffusers' SD3 pipeline
calls them, for the built-in folders and for the other official file layouts derived from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loaders.builtin import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE
from loaders.tokenizers import ClipTokenizer, T5Tokenizer, TokenizerError, read_spiece_model
from tests._fixtures import builtin_tokenizers

transformers = pytest.importorskip("transformers")
T5_PIECES = 512  # in the built-in spiece.model; transformers adds the 100 <extra_id_k> on load

PROMPTS = [
    "",
    "A painting of a squirrel eating a burger",
    "a photo of a red fox, in the snow; at dawn (35mm) -- f/1.8 & more...",
    "Wow! What a view!! Really!!!?",
    "!",
    "!!",
    "café crème, naïve Ångström, ﬁne ① Ｆｕｌｌ ｗｉｄｔｈ",
    "decomposed: cafe\u0301 A\u030angstro\u0308m",  # NFC matters
    "東京の夜景 and 山 🐱🎨 emoji 👩‍🚀 mixed",
    "a  cat\t\tand\na   dog\r\n\n  with   spaces  ",
    "   leading and trailing   ",
    "UPPERCASE Words AND MiXeD CaSe",
    "12345 3.14159 1024x1024 2nd 100%",
    "it's, don't, I'M, we're, they'll, you've, I'd, the dog's bone",
    "<|startoftext|> literal <|endoftext|> tokens <|STARTOFTEXT|>",
    "</s> <pad> <unk> <extra_id_0>x<extra_id_99> y",
    "word</w>suffix",
    "tab\tonly",
    " ".join(f"word{i} red apple" for i in range(60)),  # long: truncated everywhere
]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _added(content: str, *, normalized: bool = False, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def _save_tokenizer_json_only(reference, folder: Path) -> Path:
    """transformers 5 `save_pretrained` writes tokenizer.json + tokenizer_config.json only."""
    reference.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return folder


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory) -> Path:
    return builtin_tokenizers(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def folders(builtin_root: Path, tmp_path_factory) -> dict[str, Path]:
    """name -> tokenizer folder, in every layout the official repositories (or transformers) produce."""
    base = tmp_path_factory.mktemp("layouts")
    out = {
        "clip_l_vocab_merges": builtin_root / "tokenizer",
        "clip_g_vocab_merges": builtin_root / "tokenizer_2",
        "t5_spiece": builtin_root / "tokenizer_3",
    }
    for name, sub in [("clip_l", "tokenizer"), ("clip_g", "tokenizer_2")]:
        reference = transformers.CLIPTokenizer.from_pretrained(builtin_root / sub)
        out[f"{name}_tokenizer_json"] = _save_tokenizer_json_only(reference, base / f"{name}_json")
    t5_reference = transformers.T5TokenizerFast.from_pretrained(builtin_root / "tokenizer_3")
    out["t5_tokenizer_json"] = _save_tokenizer_json_only(t5_reference, base / "t5_json")

    # CLIP-G as SDXL / SD3 ship it: added_tokens_decoder with per-token flags (here varied: <|startoftext|>
    # normalized, <|endoftext|> not flagged special, which transformers fixes because it is a named token).
    clip_g = base / "clip_g_official"
    shutil.copytree(builtin_root / "tokenizer_2", clip_g)
    (clip_g / "special_tokens_map.json").unlink()
    _write_json(clip_g / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {"0": _added("!"), str(CLIP_VOCAB_SIZE - 2): _added("<|startoftext|>", normalized=True),
                                 str(CLIP_VOCAB_SIZE - 1): _added("<|endoftext|>", special=False)},
        "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
    })
    out["clip_g_official"] = clip_g
    # CLIP-L in the older layout: no added_tokens_decoder, special_tokens_map.json with token objects.
    clip_l = base / "clip_l_legacy_map"
    shutil.copytree(builtin_root / "tokenizer", clip_l)
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _write_json(clip_l / "special_tokens_map.json", {
        "bos_token": {"content": "<|startoftext|>", **token}, "eos_token": {"content": "<|endoftext|>", **token},
        "pad_token": "<|endoftext|>", "unk_token": {"content": "<|endoftext|>", **token},
    })
    _write_json(clip_l / "tokenizer_config.json", {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    out["clip_l_legacy_map"] = clip_l
    # T5 as SD3 ships tokenizer_3: spiece.model AND tokenizer.json, v4-style config (tokenizer.json wins).
    t5 = base / "t5_official"
    shutil.copytree(out["t5_tokenizer_json"], t5)
    shutil.copy(builtin_root / "tokenizer_3" / "spiece.model", t5)
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    decoder = {"0": _added("<pad>"), "1": _added("</s>"), "2": _added("<unk>")}
    decoder |= {str(T5_VOCAB_SIZE - 1 - i): _added(s) for i, s in enumerate(sentinels)}
    _write_json(t5 / "tokenizer_config.json", {
        "additional_special_tokens": sentinels, "added_tokens_decoder": decoder, "clean_up_tokenization_spaces": True,
        "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    })
    out["t5_official"] = t5
    return out


CLIP_LAYOUTS = ["clip_l_vocab_merges", "clip_g_vocab_merges", "clip_l_tokenizer_json", "clip_g_tokenizer_json",
                "clip_g_official", "clip_l_legacy_map"]
T5_LAYOUTS = ["t5_spiece", "t5_tokenizer_json", "t5_official"]


@pytest.fixture(scope="module")
def pairs(folders: dict[str, Path]) -> dict[str, tuple]:
    """name -> (ours, transformers reference)."""
    out = {}
    for name in CLIP_LAYOUTS:
        reference = transformers.CLIPTokenizer.from_pretrained(folders[name])
        out[name] = (ClipTokenizer.from_folder(folders[name]), reference)
    for name in T5_LAYOUTS:
        reference = transformers.T5TokenizerFast.from_pretrained(folders[name])
        out[name] = (T5Tokenizer.from_folder(folders[name]), reference)
    return out


def _reference_ids(reference, texts: list[str], length: int) -> torch.Tensor:
    # Exactly diffusers' StableDiffusion3Pipeline._get_clip_prompt_embeds / _get_t5_prompt_embeds call.
    return reference(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_clip_ids_match_transformers(pairs, layout):
    ours, reference = pairs[layout]
    tokens = ours.encode(PROMPTS, 77)
    assert tokens.ids.dtype == torch.int64 and tokens.ids.shape == (len(PROMPTS), 77)
    assert torch.equal(tokens.ids, _reference_ids(reference, PROMPTS, 77))
    assert ours.pad_id == reference.pad_token_id and ours.eos_id == reference.eos_token_id
    assert ours.bos_id == reference.bos_token_id and ours.vocab_size == len(reference)
    assert ours.model_max_length == reference.model_max_length == 77


@pytest.mark.parametrize("layout", T5_LAYOUTS)
@pytest.mark.parametrize("length", [256, 512, 9])
def test_t5_ids_match_transformers(pairs, layout, length):
    ours, reference = pairs[layout]
    texts = [*PROMPTS, " ".join(["a painted red apple"] * 200)]  # > 512 tokens
    tokens = ours.encode(texts, length)
    assert tokens.ids.dtype == torch.int64 and tokens.ids.shape == (len(texts), length)
    assert torch.equal(tokens.ids, _reference_ids(reference, texts, length))
    assert (ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2) == (
        reference.pad_token_id, reference.eos_token_id, reference.unk_token_id)
    assert ours.vocab_size == len(reference) == T5_VOCAB_SIZE


@pytest.mark.parametrize("layout", CLIP_LAYOUTS + T5_LAYOUTS)
def test_registered_special_tokens_match_transformers(pairs, layout):
    # The added-token table decides which strings are matched verbatim in a prompt (e.g. "!" for CLIP-G).
    ours, reference = pairs[layout]

    def table(backend):
        return {i: (t.content, t.lstrip, t.rstrip, t.normalized, t.single_word, t.special)
                for i, t in backend.get_added_tokens_decoder().items()}

    assert table(ours.backend) == table(reference.backend_tokenizer)


@pytest.mark.parametrize("layout", ["clip_l_vocab_merges", "clip_g_official", "t5_spiece", "t5_official"])
def test_bare_ids_tokens_and_decode_match_transformers(pairs, layout):
    ours, reference = pairs[layout]
    for text in PROMPTS[:-1] + ["red apple", "a red fox!"]:
        ids = ours.encode_ids(text)
        assert ids == reference(text, add_special_tokens=False).input_ids
        assert [ours.id_to_token(i) for i in ids] == reference.convert_ids_to_tokens(ids)
        padded = ours.encode([text], 24).ids[0]
        for skip in (False, True):
            assert ours.decode(padded, skip_special_tokens=skip) == reference.decode(padded.tolist(),
                                                                                   skip_special_tokens=skip)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.id_to_token(ours.vocab_size + 5)


def test_clip_g_pads_with_bang_and_splits_every_bang(pairs):
    clip_l, _ = pairs["clip_l_vocab_merges"]
    clip_g, reference = pairs["clip_g_vocab_merges"]
    assert clip_g.pad_id == 0 and clip_g.id_to_token(0) == "!"
    assert clip_l.pad_id == clip_l.eos_id == CLIP_VOCAB_SIZE - 1  # EOS is the highest id
    # "!" is a registered special token for CLIP-G: each one is id 0, never merged with its neighbours.
    ids = clip_g.encode_ids("wow!! yes!")
    assert ids.count(0) == 3 and ids == reference("wow!! yes!", add_special_tokens=False).input_ids
    assert ids[-1] == 0 and clip_l.encode_ids("yes!")[-1] == clip_l.backend.token_to_id("!</w>") == 256
    row = clip_g.encode(["a cat"], 77).ids[0]
    assert row[:4].tolist() == [clip_g.bos_id, *clip_g.encode_ids("a cat"), clip_g.eos_id]
    assert (row[4:] == 0).all()


def test_truncated_text_is_reported(pairs):
    clip, _ = pairs["clip_l_vocab_merges"]
    t5, _ = pairs["t5_spiece"]
    assert len(clip.encode_ids("a")) == 1 and len(t5.encode_ids("a")) == 1
    texts = ["a " * 75, "a " * 76, "a " * 80 + "red cat", "short"]
    tokens = clip.encode(texts, 77)
    assert tokens.truncated == ["", "a ", "a a a a a red cat", ""]
    assert tokens.ids[0, 76] == clip.eos_id and tokens.ids[1, 76] == clip.eos_id
    # T5 keeps room for </s>: 15 pieces + </s> in 16.
    tokens = t5.encode(["a " * 15, "a " * 20 + "red cat"], 16)
    assert tokens.truncated == ["", "a a a a a red cat"]
    assert tokens.ids[:, -1].tolist() == [t5.eos_id, t5.eos_id]
    # A character split into several byte tokens across the boundary is reported whole.
    assert clip.encode(["x " * 74 + "🐱🐶"], 77).truncated == ["🐱🐶"]
    # Every layout: the cut text is the prompt's own tail, present exactly when tokens were dropped.
    for ours, _ in pairs.values():
        room = 77 - ours.num_special_tokens
        for text, cut in zip(PROMPTS, ours.encode(PROMPTS, 77).truncated):
            assert text.endswith(cut)
            assert (cut != "") == (len(ours.encode_ids(text)) > room)


def test_builtin_vocab_layout_and_sizes(builtin_root, pairs):
    vocab = json.loads((builtin_root / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == CLIP_VOCAB_SIZE == 1000 and sorted(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == CLIP_VOCAB_SIZE - 2 and vocab["<|endoftext|>"] == CLIP_VOCAB_SIZE - 1
    merges = (builtin_root / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + CLIP_VOCAB_SIZE - 514
    assert all(len(m.split(" ")) == 2 and "</w>" != m.split(" ")[0] for m in merges[1:])
    t5, _ = pairs["t5_spiece"]
    assert T5_VOCAB_SIZE == T5_PIECES + 100 == t5.vocab_size
    assert t5.id_to_token(T5_VOCAB_SIZE - 1) == "<extra_id_0>" and t5.id_to_token(T5_PIECES) == "<extra_id_99>"
    # The built-in text would be split into real subwords, not bytes / unknowns.
    assert len(pairs["clip_l_vocab_merges"][0].encode_ids("a photo of a red cat")) == 6
    assert t5.unk_id not in t5.encode_ids("a photo of a red cat, oil painting")


def test_spiece_reader_matches_protobuf(builtin_root):
    from transformers.convert_slow_tokenizer import import_protobuf

    model_pb2 = import_protobuf()

    path = builtin_root / "tokenizer_3" / "spiece.model"
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    ours = read_spiece_model(path)
    assert [(p.piece, p.score, p.kind) for p in ours.pieces] == [(p.piece, p.score, p.type) for p in proto.pieces]
    assert ours.precompiled_charsmap == proto.normalizer_spec.precompiled_charsmap and ours.precompiled_charsmap
    assert ours.unk_id == proto.trainer_spec.unk_id == 2 and ours.model_type == 1
    assert len(ours.pieces) == T5_PIECES


def test_bad_input_raises_clear_errors(builtin_root, tmp_path, pairs):
    with pytest.raises(TokenizerError, match="expected tokenizer.json, or vocab.json and merges.txt"):
        ClipTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerError, match="expected tokenizer.json or spiece.model"):
        T5Tokenizer.from_folder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    whole = (builtin_root / "tokenizer_3" / "spiece.model").read_bytes()
    # A cut that falls exactly between two protobuf fields still parses (as a shorter model), so cut at
    # several places: each one inside a field must be reported as truncated.
    truncated = 0
    for cut in range(1000, 1008):
        (broken / "spiece.model").write_bytes(whole[:cut])
        try:
            T5Tokenizer.from_folder(broken)
        except TokenizerError as e:
            assert "truncated" in str(e)
            truncated += 1
    assert truncated >= 6
    bad_pad = tmp_path / "bad_pad"
    shutil.copytree(builtin_root / "tokenizer", bad_pad)
    _write_json(bad_pad / "tokenizer_config.json", {"pad_token": "<nope>"})
    (bad_pad / "special_tokens_map.json").unlink()
    # Like transformers, a special token missing from the vocabulary is appended as a new id.
    assert ClipTokenizer.from_folder(bad_pad).pad_id == CLIP_VOCAB_SIZE
    assert transformers.CLIPTokenizer.from_pretrained(bad_pad).pad_token_id == CLIP_VOCAB_SIZE
    clip, _ = pairs["clip_l_vocab_merges"]
    with pytest.raises(TypeError, match="list of strings"):
        clip.encode("a cat", 77)
    with pytest.raises(ValueError, match="at least 2"):
        clip.encode(["a cat"], 1)


def test_runtime_modules_do_not_import_transformers():
    code = ("import sys, loaders.tokenizers, loaders.builtin; "
            "assert not {'transformers', 'diffusers', 'sentencepiece'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
