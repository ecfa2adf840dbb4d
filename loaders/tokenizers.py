"""CLIP and T5 tokenizers with the same ids as the transformers 5 tokenizers that diffusers uses.

All tokenization runs in the `tokenizers` library (byte-level BPE for CLIP, Unigram for T5); this module
assembles it from the files the official repositories ship (``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``)
and, like transformers 5, takes only the vocabulary from them (with the merges, scores and T5's character map):
normalizer, pre-tokenizer, post-processor and decoder are the class definitions below, even when a
``tokenizer.json`` carries other ones. What they do, and how `encode_prompt` calls them: docs/numerics.md §6.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram
from torch import Tensor

from mmdit.errors import InputError

__all__ = [
    "ClipTokenizer",
    "T5Tokenizer",
    "TokenizerError",
    "Tokens",
    "SpieceModel",
    "SpiecePiece",
    "clip_normalizer",
    "clip_pre_tokenizer",
    "read_spiece_model",
]


class TokenizerError(InputError):
    """A tokenizer folder is missing files or holds files we cannot use."""


@dataclass(frozen=True)
class Tokens:
    """A tokenized batch: `ids` (B, length) int64, and per prompt the text cut off by truncation ("" if none)."""

    ids: Tensor
    truncated: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces

# The named special-token attributes of transformers tokenizers, in its order.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _added_token(value: str | dict, *, special: bool | None = None) -> AddedToken:
    """An AddedToken from a config value: a plain string (a special token) or a serialized token dict."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    raise TokenizerError(f"expected a token string or a token object with 'content', found {value!r}")


@dataclass(frozen=True)
class _TokenSettings:
    """What the json configs say about special tokens: named ones, tokens to register, model_max_length."""

    named: dict[str, AddedToken]
    added: list[AddedToken]
    extra: list[AddedToken]
    extra_ids: int | None
    model_max_length: int | None


def _token_settings(folder: Path, defaults: dict[str, str], tokenizer_json: dict | None) -> _TokenSettings:
    """Read tokenizer_config.json (+ special_tokens_map.json, tokenizer.json "added_tokens") like transformers 5.

    If tokenizer_config.json lists ``added_tokens_decoder``, that list is authoritative (with its per-token
    flags); otherwise special_tokens_map.json overrides the named tokens and tokenizer.json's added tokens are used.
    """
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    by_id: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        for index, value in config["added_tokens_decoder"].items():
            by_id[int(index)] = _added_token(value)
    else:
        map_path = folder / "special_tokens_map.json"
        if map_path.is_file():
            for key, value in _read_json(map_path).items():
                config[key] = _added_token(value, special=True) if isinstance(value, dict) else value
        for entry in (tokenizer_json or {}).get("added_tokens", []):
            by_id[int(entry["id"])] = _added_token(entry)
    by_content = {str(token): token for token in by_id.values()}

    named: dict[str, AddedToken] = {}
    for key in _NAMED_TOKENS:
        value = config.get(key, defaults.get(key))
        if value is None:
            continue
        token = value if isinstance(value, AddedToken) else _added_token(value)
        named[key] = by_content.get(str(token), token)

    extra_values = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra_values, dict):
        extra_values = list(extra_values.values())
    extra = [v if isinstance(v, AddedToken) else _added_token(v) for v in extra_values]

    max_length = config.get("model_max_length")
    extra_ids = config.get("extra_ids")
    return _TokenSettings(
        named=named,
        added=[by_id[i] for i in sorted(by_id)],
        extra=extra,
        extra_ids=int(extra_ids) if extra_ids is not None else None,
        model_max_length=int(max_length) if isinstance(max_length, (int, float)) and max_length < 1e12 else None,
    )


def _tokens_to_register(settings: _TokenSettings, extra: Sequence[AddedToken]) -> list[AddedToken]:
    """The added tokens in transformers 5's order: the config's listed tokens (by id), then each named and
    extra special token whose text is not listed and that is not an identical duplicate.

    The library keeps the flags of the LAST registration of a text: a plain-string pad token
    "<|endoftext|>" (normalized=False) overrides an earlier eos token object with normalized=True.
    """
    listed_texts = {str(t) for t in settings.added}
    tokens = list(settings.added)
    for token in [*settings.named.values(), *extra]:
        if str(token) not in listed_texts and token not in tokens:
            tokens.append(token)
    named_texts = {str(t) for t in settings.named.values()}
    return [_as_special(t) if str(t) in named_texts else t for t in tokens]


def _as_special(token: AddedToken) -> AddedToken:
    if token.special:
        return token
    return AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                      normalized=token.normalized, special=True)


def _register_added_tokens(backend: Tokenizer, tokens: Sequence[AddedToken], named: Sequence[str]) -> None:
    """Register the tokens the library must match verbatim in the text; named tokens are always included.

    The library cuts added tokens out of the prompt before anything else (in the raw text, unless a token says
    ``normalized: true``): SD3's CLIP-G pads with ``"!"``, so every ``!`` in a prompt becomes id 0.
    """
    texts = {str(t) for t in tokens}
    missing = [AddedToken(t, special=True) for t in dict.fromkeys(named) if t not in texts]
    backend.add_tokens([*tokens, *missing])


def _token_id(backend: Tokenizer, token: str, what: str, folder: Path) -> int:
    index = backend.token_to_id(token)
    if index is None:
        raise TokenizerError(f"{what} {token!r} of {folder} is not in its vocabulary; fix tokenizer_config.json")
    return index


class _Tokenizer:
    """The shared part: a `tokenizers.Tokenizer` with its special tokens registered and a post-processor that adds
    them (`single` / `pair` templates), plus pad-to-length batch encoding."""

    def __init__(self, backend: Tokenizer, *, single: list[str], pair: list[str], bos_token: str | None,
                 eos_token: str, unk_token: str, pad_token: str, added_tokens: Sequence[AddedToken],
                 model_max_length: int | None, source: Path) -> None:
        named = [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None]
        _register_added_tokens(backend, added_tokens, named)
        if bos_token is not None:  # T5 has none
            self.bos_id = _token_id(backend, bos_token, "bos token", source)
        self.eos_id = _token_id(backend, eos_token, "eos token", source)
        self.unk_id = _token_id(backend, unk_token, "unk token", source)
        self.pad_id = _token_id(backend, pad_token, "pad token", source)
        added = [(t, backend.token_to_id(t)) for t in (bos_token, eos_token) if t is not None]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=added)
        self.backend = backend
        self.pad_token = pad_token
        self.model_max_length = model_max_length
        # CLIP adds BOS + EOS, T5 adds </s>: truncation must leave room for them.
        self.num_special_tokens = backend.num_special_tokens_to_add(False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], length: int) -> Tokens:
        """Tokenize a batch with special tokens, truncated and right-padded to exactly `length` tokens.

        Equal to transformers' ``tokenizer(texts, padding="max_length", max_length=length, truncation=True,
        add_special_tokens=True).input_ids``. ``truncated[i]`` is the end of ``texts[i]`` (from the first dropped
        token on) that did not fit, "" if everything fit.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if length < self.num_special_tokens:
            raise ValueError(f"length must be at least {self.num_special_tokens} (the special tokens), got {length}")
        room = length - self.num_special_tokens
        rows: list[list[int]] = []
        truncated: list[str] = []
        for text in texts:
            # One call per prompt: encode_batch would switch on the library's thread pool, after which a
            # later fork() makes the library print a warning.
            encoding = self.backend.encode(text, add_special_tokens=False)
            cut = ""
            if len(encoding.ids) > room:
                # Offsets point into the original (un-normalised) text, so the user sees their own words.
                cut = text[encoding.offsets[room][0] :]
                encoding.truncate(room)
            encoding = self.backend.post_process(encoding, add_special_tokens=True)
            encoding.pad(length, direction="right", pad_id=self.pad_id, pad_token=self.pad_token)
            rows.append(encoding.ids)
            truncated.append(cut)
        ids = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)  # (B, length)
        return Tokens(ids=ids, truncated=truncated)

    def encode_ids(self, text: str) -> list[int]:
        """The bare ids of `text`: no special tokens, no padding, no truncation (e.g. for a prompt phrase)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def id_to_token(self, index: int) -> str:
        """The vocabulary string of one id (byte-level / "▁"-marked form, as stored in the files)."""
        token = self.backend.id_to_token(int(index))
        if token is None:
            raise ValueError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return token

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        """Ids back to text (lower-cased for CLIP); like transformers' ``decode``."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------------------------
# CLIP


def clip_normalizer() -> normalizers.Normalizer:
    """CLIP's text normalisation in transformers 5: NFC, each whitespace run -> one space, lower case."""
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CLIP's word split (the regex of the original CLIP BPE), then bytes -> printable byte-level symbols.

    Kept pieces: the two special-token spellings, English contractions, runs of letters, single digits and
    runs of other non-space symbols. Whitespace is dropped, so no word carries a leading space.
    """
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def _read_clip_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict | None]:
    """Vocabulary and merges from tokenizer.json, or else vocab.json + merges.txt."""
    json_path = folder / "tokenizer.json"
    if json_path.is_file():
        data = _read_json(json_path)
        model = data.get("model", {})
        if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
            raise TokenizerError(f"{json_path} does not hold a BPE model (model.type {model.get('type')!r})")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise TokenizerError(f"{json_path} has malformed merges, e.g. {bad[0]!r}")
        return dict(model["vocab"]), merges, data
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        try:
            vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as err:  # the library raises a bare Exception with the parse error
            raise TokenizerError(f"cannot read {vocab_path} / {merges_path}: {err}") from err
        return vocab, merges, None
    raise TokenizerError(
        f"{folder} is not a CLIP tokenizer folder: expected tokenizer.json, or vocab.json and merges.txt"
    )


class ClipTokenizer(_Tokenizer):
    """CLIP byte-level BPE tokenizer, the ids of transformers 5 ``CLIPTokenizer`` (docs/numerics.md §6.1).

    ``encode(prompts, 77)`` gives ``<|startoftext|>`` + at most 75 tokens + ``<|endoftext|>`` + pad ids. It
    lower-cases, collapses whitespace runs to one space, and never uses ftfy / html clean-up (transformers 5).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        added_tokens: Sequence[AddedToken] = (),
        model_max_length: int | None = 77,
        source: Path = Path("<memory>"),
    ) -> None:
        """Build from an in-memory vocabulary.

        `added_tokens` are registered in order (for a text given twice the last flags win); the four named
        tokens are registered as plain special tokens if `added_tokens` does not mention them.
        """
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk_token,
            )
        )
        backend.normalizer = clip_normalizer()
        backend.pre_tokenizer = clip_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        super().__init__(
            backend,
            single=[bos_token, "$A", eos_token],
            pair=[bos_token, "$A", eos_token, eos_token, "$B", eos_token],
            bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
            added_tokens=added_tokens, model_max_length=model_max_length, source=source,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        """Load ``tokenizer/`` or ``tokenizer_2/`` of an SD3 repository (pad token from its config)."""
        folder = Path(folder)
        vocab, merges, tokenizer_json = _read_clip_bpe(folder)
        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
        defaults |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        settings = _token_settings(folder, defaults, tokenizer_json)
        named = settings.named
        return cls(
            vocab,
            merges,
            bos_token=str(named["bos_token"]),
            eos_token=str(named["eos_token"]),
            unk_token=str(named["unk_token"]),
            pad_token=str(named["pad_token"]),
            added_tokens=_tokens_to_register(settings, settings.extra),
            model_max_length=settings.model_max_length,
            source=folder,
        )

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        # Byte-level decoding keeps the end-of-word marks; like transformers, turn them into spaces.
        return super().decode(ids, skip_special_tokens).replace("</w>", " ").strip()


# ---------------------------------------------------------------------------------------------------------------
# T5


@dataclass(frozen=True)
class SpiecePiece:
    piece: str
    score: float
    kind: int  # SentencePiece type: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte


@dataclass(frozen=True)
class SpieceModel:
    """The parts of a SentencePiece ``.model`` file a T5 tokenizer needs."""

    pieces: list[SpiecePiece]
    precompiled_charsmap: bytes | None
    unk_id: int
    model_type: int  # 1 unigram, 2 bpe, 3 word, 4 char


def _protobuf_fields(data: bytes, where: str):
    """Yield (field number, value) of one protobuf message; value is int, or bytes for length-delimited."""
    pos, end = 0, len(data)

    def varint() -> int:
        nonlocal pos
        result, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise TokenizerError(f"{where}: truncated or corrupt protobuf data (not a SentencePiece model?)")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, data[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size = varint()
            if pos + size > end:
                raise TokenizerError(f"{where}: truncated protobuf data (not a SentencePiece model?)")
            yield number, data[pos : pos + size]
            pos += size
        elif wire == 5:
            yield number, data[pos : pos + 4]
            pos += 4
        else:
            raise TokenizerError(f"{where}: unsupported protobuf wire type {wire} (not a SentencePiece model?)")
    if pos != end:
        raise TokenizerError(f"{where}: truncated protobuf data (not a SentencePiece model?)")


def read_spiece_model(path: str | Path) -> SpieceModel:
    """Read pieces, scores, types, the normalisation charsmap and unk id from a SentencePiece model file.

    A SentencePiece model is a protobuf ``ModelProto`` (sentencepiece_model.proto): field 1 repeated pieces
    {1 piece, 2 score (float32), 3 type}, field 2 trainer spec {3 model_type, 40 unk_id}, field 3 normalizer
    spec {2 precompiled_charsmap}. Reading these few fields directly avoids a protobuf dependency.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err
    pieces: list[SpiecePiece] = []
    charsmap: bytes | None = None
    unk_id, model_type = 0, 1  # proto defaults
    for number, value in _protobuf_fields(data, str(path)):
        if number == 1 and isinstance(value, bytes):
            piece, score, kind = None, 0.0, 1
            for n, v in _protobuf_fields(value, str(path)):
                if n == 1 and isinstance(v, bytes):
                    piece = v.decode("utf-8")
                elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and isinstance(v, int):
                    kind = v
            if piece is None:
                raise TokenizerError(f"{path}: a vocabulary entry has no piece string")
            pieces.append(SpiecePiece(piece, score, kind))
        elif number == 2 and isinstance(value, bytes):
            for n, v in _protobuf_fields(value, str(path)):
                if n == 40 and isinstance(v, int):
                    unk_id = v - (1 << 64) if v >= 1 << 63 else v
                elif n == 3 and isinstance(v, int):
                    model_type = v
        elif number == 3 and isinstance(value, bytes):
            for n, v in _protobuf_fields(value, str(path)):
                if n == 2 and isinstance(v, bytes):
                    charsmap = v or None
    if not pieces:
        raise TokenizerError(f"{path} holds no SentencePiece vocabulary")
    return SpieceModel(pieces=pieces, precompiled_charsmap=charsmap, unk_id=unk_id, model_type=model_type)


def _find_precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece charsmap of a tokenizer.json normalizer (alone or inside a Sequence), if any."""
    if not normalizer:
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


class T5Tokenizer(_Tokenizer):
    """T5 SentencePiece-unigram tokenizer, the ids of transformers 5 ``T5TokenizerFast`` / ``T5Tokenizer``
    (docs/numerics.md §6.2).

    ``encode(prompts, max_sequence_length)`` gives the pieces, then ``</s>``, then pad ids (0). It applies
    SentencePiece's NFKC-style character map (``"ﬁ"`` -> ``"fi"``, full-width -> ASCII), splits on whitespace and
    prepends ``"▁"`` to every word, also to text that follows an added token.
    """

    def __init__(
        self,
        vocab: list[tuple[str, float]],
        *,
        precompiled_charsmap: bytes | None = None,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        added_tokens: Sequence[AddedToken] = (),
        model_max_length: int | None = 512,
        source: Path = Path("<memory>"),
    ) -> None:
        """Build from (piece, score) pairs that already include any ``<extra_id_k>`` entries."""
        pieces = [piece for piece, _ in vocab]
        if unk_token not in pieces:
            raise TokenizerError(f"unk token {unk_token!r} of {source} is not in its vocabulary")
        backend = Tokenizer(Unigram(vocab, unk_id=pieces.index(unk_token), byte_fallback=False))
        if precompiled_charsmap is not None:
            backend.normalizer = normalizers.Precompiled(precompiled_charsmap)
        # Words are split on whitespace and each gets the "▁" word-start mark, as SentencePiece pieces expect.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        super().__init__(
            backend,
            single=["$A", eos_token],
            pair=["$A", eos_token, "$B", eos_token],
            bos_token=None, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
            added_tokens=added_tokens, model_max_length=model_max_length, source=source,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Load ``tokenizer_3/`` of an SD3 repository: tokenizer.json if present, else spiece.model."""
        folder = Path(folder)
        json_path, spiece_path = folder / "tokenizer.json", folder / "spiece.model"
        tokenizer_json: dict | None = None
        spm_tokens: list[AddedToken] = []
        if json_path.is_file():
            tokenizer_json = _read_json(json_path)
            model = tokenizer_json.get("model", {})
            if model.get("type") not in (None, "Unigram") or not isinstance(model.get("vocab"), list):
                raise TokenizerError(f"{json_path} does not hold a Unigram model (model.type {model.get('type')!r})")
            vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
            charsmap = _find_precompiled_charsmap(tokenizer_json.get("normalizer"))
        elif spiece_path.is_file():
            spm = read_spiece_model(spiece_path)
            if spm.model_type != 1:
                raise TokenizerError(f"{spiece_path} is not a unigram SentencePiece model (type {spm.model_type})")
            vocab = [(p.piece, p.score) for p in spm.pieces]
            charsmap = spm.precompiled_charsmap
            # Control pieces are special tokens, user-defined pieces plain added tokens (both matched verbatim).
            spm_tokens = [
                AddedToken(p.piece, normalized=False, special=p.kind == 3) for p in spm.pieces if p.kind in (3, 4)
            ]
        else:
            raise TokenizerError(f"{folder} is not a T5 tokenizer folder: expected tokenizer.json or spiece.model")

        settings = _token_settings(folder, {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
                                   tokenizer_json)
        extra_ids = 100 if settings.extra_ids is None else settings.extra_ids
        sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
        if tokenizer_json is None:
            # T5 appends the sentinels after the SentencePiece pieces, <extra_id_0> getting the highest id.
            vocab += [(s, 0.0) for s in reversed(sentinels)]
        extra = [*spm_tokens, *settings.extra]
        if not any("<extra_id_" in str(t) for t in extra):
            extra += [AddedToken(s, special=True) for s in sentinels]
        named = settings.named
        return cls(
            vocab,
            precompiled_charsmap=charsmap,
            eos_token=str(named["eos_token"]),
            unk_token=str(named["unk_token"]),
            pad_token=str(named["pad_token"]),
            added_tokens=_tokens_to_register(settings, extra),
            model_max_length=settings.model_max_length,
            source=folder,
        )
