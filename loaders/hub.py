"""What `--model` names: the built-in tiny model, a local path, or a Hugging Face repo id.

Downloads fetch only the files a run needs (`allow_patterns`): the SD3.5 repos hold both the Stability single
file and the diffusers folders, so an unfiltered snapshot would download the model twice. `huggingface_hub`
itself honours `HF_TOKEN`, `HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE`; this module only turns its failures
into messages that say what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmdit.errors import AccessError, MissingInputError

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

DIFFUSERS_PATTERNS = [
    "model_index.json", "transformer/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
    "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*",
]
T5_PATTERNS = ["text_encoder_3/*"]
WEIGHT_SUFFIXES = (".safetensors", ".json")  # never fetch pickled duplicates (.bin, .pt)


@dataclass(frozen=True)
class ModelSource:
    """Where a run's files are on disk."""

    diffusion: Path  # a single .safetensors file or a diffusers folder
    label: str  # what the user gave (repo id, path) or "builtin"
    builtin: bool = False


def resolve_model(model: str | None, *, need_t5: bool = True, say: Callable[[str], None] = lambda s: None
                  ) -> ModelSource:
    """Turn `--model` into files on disk: the built-in model's, a local path, or a download."""
    if model is None:
        from .builtin import builtin_model

        return ModelSource(builtin_model(), "builtin", builtin=True)
    path = Path(model).expanduser()
    if path.exists():
        return ModelSource(path, str(path))
    if not REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise MissingInputError(
            f"--model {model!r}: no such file or folder, and not a Hugging Face repo id (owner/name)"
        )
    say(f"fetching {model} from the Hugging Face Hub (only the files this run needs)")
    return ModelSource(download(model, need_t5=need_t5), model)


def _patterns(files: list[str], need_t5: bool) -> list[str]:
    """Diffusers folders when the repo has them; otherwise its single file plus text_encoders/."""
    if "transformer/config.json" in files:
        patterns = DIFFUSERS_PATTERNS + (T5_PATTERNS if need_t5 else [])
        return [p for p in patterns if any(re.fullmatch(p.replace("*", ".*"), f) for f in files)]
    singles = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if not singles:
        raise MissingInputError("the repo has neither a diffusers transformer/ folder nor a .safetensors file")
    # sd3_medium.safetensors over sd3_medium_incl_clips*.safetensors: encoders come from text_encoders/
    main = min(singles, key=lambda f: ("incl" in f, len(f)))
    encoders = ["text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors"]
    if need_t5:
        encoders.append("text_encoders/t5xxl_fp16.safetensors")
    tokenizers = [f"{t}/*" for t in ("tokenizer", "tokenizer_2", "tokenizer_3") if any(f.startswith(t + "/") for f in files)]
    return [main, *[e for e in encoders if e in files], *tokenizers]


def download(repo_id: str, *, need_t5: bool = True) -> Path:
    """Fetch what a run needs from `repo_id`; returns the local single file or snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        try:
            files = HfApi().list_repo_files(repo_id)
        except (LocalEntryNotFoundError, OSError) as e:  # offline: the cache decides what exists
            if isinstance(e, (GatedRepoError, RepositoryNotFoundError)):
                raise
            files = None
        patterns = _patterns(files, need_t5) if files is not None else DIFFUSERS_PATTERNS + (T5_PATTERNS if need_t5 else [])
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*.bin", "*.pt", "*.ckpt"]))
    except GatedRepoError:
        raise AccessError(
            f"{repo_id} is gated. Open https://huggingface.co/{repo_id} while logged in and accept the license, "
            "then create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN=<token> "
            "(or run `hf auth login`)."
        ) from None
    except RepositoryNotFoundError:
        raise MissingInputError(
            f"{repo_id}: no such repo on the Hugging Face Hub, or it is private and HF_TOKEN gives no access"
        ) from None
    except LocalEntryNotFoundError:
        raise MissingInputError(
            f"{repo_id} is not in the local cache (HF_HOME) and the Hub cannot be reached (HF_HUB_OFFLINE is set, "
            "or there is no network). Download it once with network access, or give a local path to --model."
        ) from None
    if (folder / "transformer").is_dir():
        return folder
    singles = sorted(p for p in folder.glob("*.safetensors"))
    if not singles:
        raise MissingInputError(f"{repo_id}: the download holds no transformer/ folder and no .safetensors file")
    return min(singles, key=lambda p: ("incl" in p.name, len(p.name)))
