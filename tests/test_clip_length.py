"""The CLIP part of the joint text sequence follows the CLIP tokenizers' model_max_length, as in diffusers.

diffusers' `StableDiffusion3Pipeline` pads both CLIP prompts to `tokenizer.model_max_length` (77 in every
released model). A tiny pipeline whose tokenizers say 16 gets 16 + L_t5 text tokens, equal to diffusers'
`encode_prompt` on the same files, and DenseDiffusion finds the T5 part at 16.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dense import PhraseEncoding, PhraseMatch, match_phrase, parse_layout, replace_phrase_embeddings, text_classes
from loaders import Pipeline
from loaders.layout import match_layout, plan_layout
from loaders.text import clip_length, encode_prompts, find_text_files
from loaders.tokenizers import ClipTokenizer
from mmdit.conditioning import CLIP_TOKENS
from mmdit.errors import InputError
from tests._fixtures import tiny_text_pipeline

CLIP = 16
T5_LEN = 12
PROMPTS = ["a red fox and a blue house", "a small green boat by the sea and a yellow cat wearing a tiny hat"]
NEGATIVES = ["", "dark"]
LAYOUT = {"prompt": "a red fox and a blue house",
          "regions": [{"phrase": "a red fox", "box": [0.0, 0.0, 0.5, 1.0]},
                      {"phrase": "a blue house", "box": [0.5, 0.0, 1.0, 1.0]}]}


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip16")
    return root, tiny_text_pipeline(root, clip_length=CLIP)


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_context_has_the_tokenizers_clip_length_and_equals_diffusers(tiny16, layout):
    root, pipe = tiny16
    assert pipe.tokenizer_max_length == CLIP  # diffusers reads it from the same files
    with torch.no_grad():
        ref_pos, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device=torch.device("cpu"), num_images_per_prompt=2,
            do_classifier_free_guidance=True, negative_prompt=NEGATIVES, max_sequence_length=T5_LEN,
        )
    model = root / "diffusers" if layout == "diffusers" else root / "single" / "model.safetensors"
    files = find_text_files(model)
    e = encode_prompts(files, PROMPTS, NEGATIVES, num_images=2, max_sequence_length=T5_LEN, context_dim=256)
    assert e.positive.context.shape == (4, CLIP + T5_LEN, 256)
    assert len(e.tokens.clip) == CLIP and e.encoders[0].clip_g.penultimate.shape[1] == CLIP
    assert torch.equal(e.positive.context, ref_pos) and torch.equal(e.positive.pooled, ref_pooled)
    assert torch.equal(e.negative.context, ref_neg) and torch.equal(e.negative.pooled, ref_neg_pooled)
    # the second prompt is longer than 16 CLIP tokens: cut there, and said so
    assert any(note.startswith("CLIP-L keeps 16 tokens") and "was cut" in note for note in e.truncated)


def test_a_16_token_model_generates_as_diffusers_does(tiny16):
    """The MM-DiT sees 16 + L_t5 text tokens in the whole pipeline; the latents are diffusers'."""
    root, pipe = tiny16
    kwargs = dict(prompt=PROMPTS[0], negative_prompt="dark", guidance_scale=3.0, num_inference_steps=2,
                  height=64, width=64, max_sequence_length=T5_LEN)
    with torch.no_grad():
        want = pipe(**kwargs, output_type="latent", generator=torch.Generator("cpu").manual_seed(3))[0]
    ours = Pipeline.load(root / "single" / "model.safetensors", device="cpu")
    got = ours(PROMPTS[0], negative_prompt="dark", cfg=3.0, steps=2, height=64, width=64, seed=3, shift=3.0,
               max_sequence_length=T5_LEN, slg_layers=())
    assert got.latents.shape == want.shape
    assert (got.latents - want).abs().max() <= 1e-5 * want.abs().max()


def test_layout_matches_put_t5_positions_after_16_clip_tokens(tiny16):
    root, _ = tiny16
    files = find_text_files(root / "single" / "model.safetensors")
    layout = parse_layout(LAYOUT)
    match = match_layout(layout, LAYOUT["prompt"], files, height=64, width=64, max_sequence_length=T5_LEN)
    for m in match.matches:
        assert m.clip_length == CLIP and m.clip and m.t5
        assert m.positions == tuple(m.clip) + tuple(CLIP + j for j in m.t5)
        assert max(m.clip) < CLIP <= min(m.positions[len(m.clip):]) < CLIP + T5_LEN
    encoded = encode_prompts(files, [LAYOUT["prompt"]], [""], max_sequence_length=T5_LEN, context_dim=256,
                             extra_texts=match.texts_to_encode)
    positive, plan = plan_layout(match, encoded, steps=4, shift=3.0, strength=1.0, preset="faithful",
                                 record_maps=True, max_sequence_length=T5_LEN, device="cpu")
    assert positive.context.shape == (1, CLIP + T5_LEN, 256)
    for k, m in enumerate(match.matches):  # the phrase's own T5 rows were pasted at 16 + j
        j, w = m.t5.start, len(m.t5)
        assert torch.equal(positive.context[0, CLIP + j:CLIP + j + w], encoded.phrases.t5[k, :w])
        assert not torch.equal(encoded.positive.context[0, CLIP + j:CLIP + j + w], encoded.phrases.t5[k, :w])
        columns = plan.maps.phrase_columns[:, k]
        assert columns.shape == (CLIP + T5_LEN,) and torch.nonzero(columns).flatten().tolist() == list(m.positions)


def test_phrase_map_with_a_16_token_clip():
    """The pure pieces: a 16-id prompt gives matches whose T5 part starts at 16, and the replacement uses it."""
    bos, eos = 98, 99
    prompt_clip = [bos, 10, 11, 12, 13, eos] + [eos] * (CLIP - 6)
    prompt_t5 = [20, 21, 22, 23, 1] + [0] * (T5_LEN - 5)
    m = match_phrase(prompt_clip, [12, 13], prompt_t5, [22, 23])
    assert m.clip_length == CLIP and m.positions == (3, 4, CLIP + 2, CLIP + 3)
    assert match_phrase(prompt_clip, [], prompt_t5, []).clip_length == CLIP  # an empty phrase too
    classes = text_classes([m], CLIP + T5_LEN)
    assert torch.nonzero(classes == 0).flatten().tolist() == [3, 4, CLIP + 2, CLIP + 3]
    assert PhraseMatch(range(1, 2), range(0, 1)).positions == (1, CLIP_TOKENS)  # the released models' default

    g = torch.Generator().manual_seed(0)
    d_l, d_g, D = 4, 6, 16
    context = torch.randn(1, CLIP + T5_LEN, D, generator=g)
    enc = PhraseEncoding(torch.randn(1, CLIP, d_l, generator=g), torch.randn(1, CLIP, d_g, generator=g),
                         torch.randn(1, T5_LEN, D, generator=g))
    out = replace_phrase_embeddings(context, [enc], [m])
    assert torch.equal(out[:, CLIP + 2:CLIP + 4], enc.t5[:, :2])  # T5 rows at 16 + j
    assert torch.equal(out[:, 3:5, :d_l], enc.clip_l[:, 1:3])
    changed = (out != context).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [3, 4, CLIP + 2, CLIP + 3]
    with pytest.raises(ValueError, match="16 tokens"):  # CLIP encodings of another length
        replace_phrase_embeddings(context, [PhraseEncoding(enc.clip_l[:, :8], enc.clip_g[:, :8], enc.t5)], [m])


def _set_max_length(folder, value) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if value is None:
        del config["model_max_length"]
    else:
        config["model_max_length"] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_clip_lengths_that_disagree_are_an_input_error(tiny16, tmp_path):
    root, _ = tiny16
    model = tmp_path / "model"
    shutil.copytree(root / "diffusers", model)
    _set_max_length(model / "tokenizer_2", 20)
    files = find_text_files(model)
    with pytest.raises(InputError, match="disagree on the CLIP length: model_max_length 16 .* 20 in"):
        encode_prompts(files, ["a red fox"], None, max_sequence_length=T5_LEN, context_dim=256)
    # a layout finds it before any encoder is loaded
    with pytest.raises(InputError, match="disagree on the CLIP length"):
        match_layout(parse_layout(LAYOUT), LAYOUT["prompt"], files, height=64, width=64, max_sequence_length=T5_LEN)


def test_clip_length_fallback_and_encoder_positions(tiny16, tmp_path):
    root, _ = tiny16
    model = tmp_path / "model"
    shutil.copytree(root / "diffusers", model)
    files = find_text_files(model)
    # no model_max_length in either config: 77, diffusers' fallback (more than these encoders' 16 positions)
    for name in ("tokenizer", "tokenizer_2"):
        _set_max_length(model / name, None)
    tok_l, tok_g = ClipTokenizer.from_folder(files.tokenizer), ClipTokenizer.from_folder(files.tokenizer_2)
    assert tok_l.model_max_length is None and clip_length(files, tok_l, tok_g) == CLIP_TOKENS
    with pytest.raises(InputError, match="pad to 77 tokens .* has only 16 positions"):
        encode_prompts(files, ["a red fox"], None, max_sequence_length=T5_LEN, context_dim=256)
    for name in ("tokenizer", "tokenizer_2"):
        _set_max_length(model / name, 1)
    tok_l, tok_g = ClipTokenizer.from_folder(files.tokenizer), ClipTokenizer.from_folder(files.tokenizer_2)
    with pytest.raises(InputError, match="leaves no room"):
        clip_length(files, tok_l, tok_g)


def test_train_builtin_text_side_default_is_shipped_and_16_keeps_the_features(tmp_path):
    """`scripts/builtin/train.py`'s text stage: with --clip-length 16 (its default) the shipped tokenizers and the
    shipped encoders' layout (their weights are these, trained further with the MM-DiT: --train-text): CLIPs of
    16 positions whose features at a caption's positions are the 77-position ones."""
    from safetensors.torch import load_file

    from loaders.builtin import MODEL_DIR
    from scripts.builtin.train import all_captions, encode_captions, parse_args, write_text_side

    assert parse_args([]).clip_length == CLIP and parse_args([]).train_text
    write_text_side(tmp_path / "77", 0)
    write_text_side(tmp_path / "16", 0, CLIP)
    for file in sorted((MODEL_DIR / "text_encoders").glob("*.safetensors")):
        shipped, ours = load_file(str(file)), load_file(str(tmp_path / "16" / "text_encoders" / file.name))
        assert shipped.keys() == ours.keys(), file.name
        assert all(v.shape == ours[k].shape and v.dtype == torch.float16 for k, v in shipped.items()), file.name
        assert not all(torch.equal(v, ours[k].to(torch.float16)) for k, v in shipped.items()), f"{file.name}: untrained"
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for file in (MODEL_DIR / sub).iterdir():
            assert (tmp_path / "16" / sub / file.name).read_bytes() == file.read_bytes(), f"{sub}/{file.name}"

    for sub in ("tokenizer", "tokenizer_2"):
        assert json.loads((tmp_path / "16" / sub / "tokenizer_config.json").read_text())["model_max_length"] == CLIP
    clip_l = load_file(str(tmp_path / "16" / "text_encoders" / "clip_l.safetensors"))
    assert clip_l["text_model.embeddings.position_embedding.weight"].shape == (CLIP, 64)
    captions = all_captions()
    tok = ClipTokenizer.from_folder(tmp_path / "16" / "tokenizer")
    assert max(len(tok.encode_ids(c)) for c in captions) + 2 <= CLIP  # every caption fits, BOS and EOS included
    some = captions[::97] + [max(captions, key=len), ""]
    ctx77, pooled77 = encode_captions(tmp_path / "77", some)
    ctx16, pooled16 = encode_captions(tmp_path / "16", some)
    assert ctx77.shape == (len(some), CLIP_TOKENS + 16, 256) and ctx16.shape == (len(some), CLIP + 16, 256)
    torch.testing.assert_close(ctx16[:, :CLIP], ctx77[:, :CLIP], rtol=1e-5, atol=1e-6)  # CLIP is causal
    assert torch.equal(ctx16[:, CLIP:], ctx77[:, CLIP_TOKENS:])  # T5, the same weights
    torch.testing.assert_close(pooled16, pooled77, rtol=1e-5, atol=1e-6)
