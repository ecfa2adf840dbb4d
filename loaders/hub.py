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
HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3")  # whose errors mean "the network failed", whichever
# huggingface_hub uses


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
    return ModelSource(download(model, need_t5=need_t5, offline=not hub_reachable()), model)


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub's host answers a TCP connection within `timeout` seconds. Asked first, so that an
    unreachable Hub means the local cache (or a one-line error) at once, not huggingface_hub's half minute of
    retries. True when HF_HUB_OFFLINE is set (huggingface_hub then uses the cache itself) or a proxy is
    configured (only the proxy can tell)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                     "all_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


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


def download(repo_id: str, *, need_t5: bool = True, offline: bool = False) -> Path:
    """Fetch what a run needs from `repo_id`; returns the local single file or snapshot folder. `offline`: the
    Hub cannot be reached, so only the local cache is looked at."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    ignore = ["*.bin", "*.pt", "*.ckpt"]
    try:
        if offline:
            patterns = DIFFUSERS_PATTERNS + (T5_PATTERNS if need_t5 else [])
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore,
                                            local_files_only=True))
            return _component(repo_id, folder)
        try:
            files = HfApi().list_repo_files(repo_id)
        except (LocalEntryNotFoundError, OSError) as e:  # offline: the cache decides what exists
            if isinstance(e, (GatedRepoError, RepositoryNotFoundError)):
                raise
            files = None
        patterns = _patterns(files, need_t5) if files is not None else DIFFUSERS_PATTERNS + (T5_PATTERNS if need_t5 else [])
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore))
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
    except Exception as e:  # the HTTP client's own errors (connection reset, timeouts) are not all OSErrors
        if not isinstance(e, (OSError, HfHubHTTPError)) and type(e).__module__.split(".")[0] not in HTTP_CLIENTS:
            raise
        raise MissingInputError(f"{repo_id}: the Hugging Face Hub did not answer ({type(e).__name__}: {e}); check "
                                "the network and try again, or give a local path to --model") from None
    return _component(repo_id, folder)


def _component(repo_id: str, folder: Path) -> Path:
    """The downloaded folder when it is a diffusers pipeline, else its main single file."""
    if (folder / "transformer").is_dir():
        return folder
    singles = sorted(p for p in folder.glob("*.safetensors"))
    if not singles:
        raise MissingInputError(f"{repo_id}: the download holds no transformer/ folder and no .safetensors file")
    return min(singles, key=lambda p: ("incl" in p.name, len(p.name)))
