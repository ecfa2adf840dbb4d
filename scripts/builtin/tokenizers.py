"""Train and write the project's own tokenizer folders for the built-in tiny model (no network).

The built-in model needs tokenizers whose files have exactly the layout of the official SD3 / SD3.5
repositories, so that the same loading code (`loaders.tokenizers`) serves both:

* ``tokenizer/``   CLIP-L stand-in: ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` +
  ``special_tokens_map.json``, pad token ``<|endoftext|>`` (= EOS, the highest id).
* ``tokenizer_2/`` CLIP-G stand-in: the same vocabulary and merges, pad token ``"!"`` (id 0), as SD3's CLIP-G.
* ``tokenizer_3/`` T5 stand-in: a SentencePiece unigram ``spiece.model`` + ``tokenizer_config.json``
  (pad 0 ``<pad>``, eos 1 ``</s>``, unk 2 ``<unk>``, no bos, 100 ``<extra_id_k>`` added on load).

Both models are trained here, deterministically, on `TRAINING_TEXT`, a few paragraphs of image-prompt English.
The recipes follow docs/numerics.md §6.3:

* CLIP vocabulary order = real CLIP's: the 256 byte-level symbols in GPT-2 byte order, the same 256 symbols
  with ``</w>`` appended, one token per merge (in merge order), then ``<|startoftext|>`` and ``<|endoftext|>``
  as the two highest ids, so EOS is the maximum id (the legacy argmax pooling of CLIP relies on that).
* The BPE merges come from `tokenizers`' ``BpeTrainer`` run with CLIP's own normalizer and pre-tokenizer.
  The trainer breaks ties between equally frequent pairs by internal symbol id, and it numbers the
  end-of-word symbols in hash-map order, which differs from run to run. Registering all 512 base symbols as
  trainer "special tokens" pins their ids in our fixed order, which makes the merges identical on every run.
* SentencePiece training is deterministic when run on one thread; the ``spiece.model`` bytes are identical
  between runs. Its default ``nmt_nfkc`` rule gives the file a precompiled character map, like T5's.

Sizes (checked by tests/test_tokenizers.py): CLIP ``len(vocab.json)`` = `CLIP_VOCAB_SIZE` = 1000 (ids 0..999,
EOS = 999, BOS = 998, CLIP-G pad "!" = 0); T5 = `T5_PIECES` = 512 SentencePiece pieces + 100 extra ids =
`T5_VOCAB_SIZE` = 612 (ids 0..611). The two vocabulary sizes are `loaders.builtin`'s, which builds the built-in
text encoders with them; the training targets here follow from them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokenizers import Tokenizer, trainers
from tokenizers.models import BPE

from loaders.builtin import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE
from loaders.tokenizers import clip_normalizer, clip_pre_tokenizer
from mmdit.conditioning import CLIP_TOKENS

CLIP_MERGES = CLIP_VOCAB_SIZE - 512 - 2  # 512 byte symbols + 486 merges + 2 specials = 1000 tokens
T5_EXTRA_IDS = 100
# 512 SentencePiece pieces incl. <pad>, </s>, <unk> (this text supports at most 618)
T5_PIECES = T5_VOCAB_SIZE - T5_EXTRA_IDS

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Original text, written for this project: typical image prompts and the words around them (colours,
# objects, animals, scenes, lighting, camera and art styles), with some punctuation, digits and apostrophes.
TRAINING_TEXT = """\
A photograph of a red fox sitting in a snowy forest at dawn, soft golden light, shallow depth of field.
A watercolor painting of a small blue house by the sea, white clouds, green hills and a yellow boat.
An oil painting of an old man reading a book next to a window, warm candle light, dark brown background.
A cute orange cat wearing a tiny hat, studio portrait, pastel pink backdrop, highly detailed fur.
A futuristic city at night with neon signs in purple, cyan and magenta, rain on the street, reflections.
A bowl of fresh fruit on a wooden table: apples, pears, grapes, lemons and a single ripe banana.
A mountain lake surrounded by tall pine trees, mist over the water, early morning, photorealistic.
A knight in shining silver armor riding a black horse through a burning village, epic fantasy art.
A steaming cup of coffee and a croissant on a marble counter, cozy cafe, morning sunlight, 35mm film.
An astronaut floating above the earth, stars in the background, the moon on the left, cinematic lighting.

Colours matter in a prompt. People ask for red, orange, yellow, green, blue, indigo and violet; for black,
white and grey; for brown, beige, gold, silver, bronze and copper; for pink, purple, teal, turquoise,
crimson, scarlet, navy, olive, lavender, amber and ivory. They write light blue, dark green, pale yellow,
deep red, bright orange, muted colours, vivid colours, a warm palette, a cool palette, monochrome, sepia,
black and white, high contrast, low saturation and soft pastel tones.

Objects and subjects are the heart of an image: a dog, a cat, a horse, a bird, an owl, an eagle, a lion,
a tiger, a bear, a wolf, a rabbit, a deer, a fish, a whale, a dolphin, a butterfly, a dragon and a robot;
a man, a woman, a child, a girl, a boy, an old woman, a young man, a family, a crowd of people; a car, a
bus, a train, a bicycle, a ship, a plane, a rocket; a chair, a table, a lamp, a vase of flowers, a clock,
a guitar, a piano, a violin, a camera, a phone, a laptop, a bottle, a glass, a cup, a plate and a spoon;
a castle, a tower, a bridge, a church, a temple, a cottage, a barn, a lighthouse, a skyscraper.

Scenes give them a place: a beach at sunset, a desert with sand dunes, a jungle after the rain, a field of
sunflowers, a meadow with wild flowers, a river in a canyon, a waterfall, a volcano, an island, a frozen
lake, a snowy mountain, a dense forest, a quiet village, a busy market, a city street, a subway station,
a library full of books, a kitchen, a bedroom, a garden, a park in autumn, an underwater reef with coral,
outer space with planets and galaxies. The weather can be sunny, cloudy, foggy, rainy, stormy or snowy;
the time can be dawn, morning, noon, afternoon, golden hour, dusk, twilight, night or midnight.

Styles and techniques: photorealistic, hyperrealistic, realistic photo, digital art, concept art, matte
painting, oil painting, acrylic, watercolor, gouache, ink drawing, pencil sketch, charcoal, pastel, line
art, pixel art, low poly, 3d render, isometric, vector illustration, flat design, anime, manga, cartoon,
comic book, children's book illustration, ukiyo-e woodblock print, impressionism, expressionism,
surrealism, cubism, art nouveau, art deco, baroque, renaissance, minimalism, pop art, street art, graffiti,
stained glass, mosaic, origami, claymation, studio ghibli style, cyberpunk, steampunk, vaporwave, fantasy,
science fiction, horror, noir, vintage, retro, futuristic, whimsical, dreamy, moody, ethereal, epic.

Photography words: portrait, close-up, macro, wide angle, telephoto, aerial view, bird's eye view, low
angle, from above, from below, full body shot, bokeh, depth of field, long exposure, motion blur, film
grain, 50mm lens, 85mm, f/1.8, ISO 100, soft light, hard light, rim light, backlight, studio lighting,
natural light, volumetric light, god rays, dramatic shadows, high key, low key, HDR, 4k, 8k, sharp focus,
award winning photo, trending on artstation, masterpiece, best quality, highly detailed, intricate.

Materials and textures: wood, stone, brick, marble, glass, metal, steel, iron, rusty chains, polished brass,
leather, silk, velvet, wool, cotton, lace, denim, fur, feathers, scales, paper, cardboard, plastic, rubber,
porcelain, ceramic, crystal, diamond, pearls, ice, smoke, fire, water droplets, bubbles, sparkles, glowing
embers, liquid chrome, iridescent surfaces, rough bark, smooth pebbles, cracked earth, wet asphalt, moss.
Clothing and details: a red scarf, a straw hat, a leather jacket, a wedding dress, a kimono, a hoodie, a
suit and tie, boots, sneakers, sunglasses, earrings, a crown, a cape, a backpack, an umbrella, a mask.

Food and still life: a slice of chocolate cake with strawberries, a pizza with basil and mozzarella, sushi
on a black plate, ramen with an egg, pancakes with maple syrup, a burger with fries, tacos, dumplings,
a loaf of bread, cheese and olives, a glass of red wine, lemonade with mint, ice cream in a waffle cone,
cupcakes with sprinkles, a basket of eggs, vegetables: tomatoes, carrots, onions, peppers and cucumbers.

Mood and composition: calm, peaceful, serene, joyful, playful, lonely, mysterious, eerie, nostalgic,
romantic, majestic, chaotic, symmetrical, centered composition, rule of thirds, negative space, leading
lines, silhouette against the sky, reflection in a puddle, seen through a window, framed by an arch,
in the foreground, in the background, on the horizon, next to, behind, between, under, inside, outside.

Small sentences, as people really type them: "a cat on a mat". "Two dogs playing in the snow!" "It's a
beautiful day, isn't it?" "Don't forget the red umbrella." "There are 3 apples and 12 oranges." "What a
view!!" "The girl's dress is blue; the boy's shirt is green." "I'd like a house with a red door, a white
fence & a big tree." "We're at the top of the hill -- look at the city lights." "They'll paint it gold."
"You've never seen a purple cow (or have you?)." "I'm drawing a map: north, south, east and west."

Shapes, the built-in model's whole world: a red circle, a green square, a blue triangle, a yellow circle,
a red square and a green triangle; a blue circle and a yellow square; a red triangle, a green circle, a blue
square and a yellow triangle. Circles, squares and triangles; one circle, two squares, three triangles.
A circle is round, a square has four sides, a triangle has three. Draw a circle, a square and a triangle.
"""


def gpt2_byte_symbols() -> list[str]:
    """The 256 byte-level symbols in GPT-2/CLIP order (this order is CLIP's ids 0..255).

    Printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and come first in byte order; the
    other 68 bytes (controls, space, soft hyphen, ...) follow in byte order, mapped to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def _clip_training_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` with CLIP's normalizer and pre-tokenizer and an empty BPE model to train."""
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    tok.normalizer = clip_normalizer()
    tok.pre_tokenizer = clip_pre_tokenizer()
    return tok


def train_clip_bpe(text: str = TRAINING_TEXT, num_merges: int = CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """Train CLIP-style byte-level BPE merges on `text`; returns (vocab, merges as "a b" strings).

    The vocabulary is laid out like real CLIP's (see the module docstring), so ``<|endoftext|>`` has the
    largest id. Raises ValueError if the text is too small to yield `num_merges` merges.
    """
    base = gpt2_byte_symbols()
    base_with_suffix = [s + "</w>" for s in base]
    tok = _clip_training_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=len(base) * 2 + num_merges,
        min_frequency=0,
        show_progress=False,
        # Pinning all 512 base symbols (see module docstring) makes tie-breaking, hence the merges, deterministic.
        special_tokens=base + base_with_suffix,
        initial_alphabet=base,
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    trained = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]
    if len(pairs) < num_merges:
        raise ValueError(f"training text yields only {len(pairs)} BPE merges, {num_merges} were requested")
    vocab: dict[str, int] = {s: i for i, s in enumerate(base + base_with_suffix)}
    merges: list[str] = []
    for left, right in pairs[:num_merges]:
        merges.append(f"{left} {right}")
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def train_t5_unigram(text: str = TRAINING_TEXT, vocab_size: int = T5_PIECES) -> bytes:
    """Train a T5-style SentencePiece unigram model on `text`; returns the serialized ``spiece.model`` bytes.

    Ids: <pad> 0, </s> 1, <unk> 2, no <s>; nmt_nfkc normalisation (so the file carries a precompiled
    charsmap, as T5's does); every character of the text is covered.
    """
    import sentencepiece as spm  # only needed to train; loading spiece.model works without it

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=True,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,  # the library never prints
    )
    return model.getvalue()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: Path, pad_token: str, vocab: dict[str, int], merges: list[str],
                         model_max_length: int = CLIP_TOKENS) -> None:
    """Write one CLIP tokenizer folder in the official layout (vocab.json, merges.txt, two json configs).

    `model_max_length` is the CLIP length the pipeline pads to (`loaders.text.clip_length`); 77 as released.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **specials},
    )


def write_t5_tokenizer(folder: Path, spiece: bytes) -> None:
    """Write one T5 tokenizer folder (spiece.model + tokenizer_config.json + special_tokens_map.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece)
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": T5_EXTRA_IDS, **specials},
    )


def write_builtin_tokenizers(root: Path, clip_length: int = CLIP_TOKENS) -> None:
    """Write ``tokenizer/`` (CLIP-L), ``tokenizer_2/`` (CLIP-G, pad "!") and ``tokenizer_3/`` (T5) under `root`.

    `clip_length`: both CLIP tokenizers' model_max_length, the CLIP part of the joint text sequence. 77 by
    default, as every released model; the shipped built-in model uses 16, which its world's captions fit (with
    CLIP encoders of that many positions, `python -m scripts.builtin.train --clip-length`).
    """
    root = Path(root)
    vocab, merges = train_clip_bpe()
    write_clip_tokenizer(root / "tokenizer", EOS, vocab, merges, clip_length)
    write_clip_tokenizer(root / "tokenizer_2", "!", vocab, merges, clip_length)
    write_t5_tokenizer(root / "tokenizer_3", train_t5_unigram())
