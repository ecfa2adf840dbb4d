"""Writing output files so that nothing is half-written and nothing the user had is lost.

Every file the project writes (images, latents, attention maps, stats, manifests, layouts) goes to a temporary
file in the same folder (`.NAME.<random>.partial`) and is renamed over NAME only once it is complete
(`os.replace`, atomic within one file system): a crash, Ctrl-C or a full disk leaves the old file or the new
one, never a truncated one, and a resumed batch can trust every file it finds. `check_outputs` checks a run's
output paths before any work: each one writable, none a folder, no two the same file under two spellings.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from mmdit.errors import InputError

PARTIAL = ".partial"  # the suffix of a file still being written
NAME_MAX = 255  # bytes in one file name on every common file system (ext4, APFS, NTFS, XFS)


class OutputError(InputError):
    """An output path cannot be written (no such folder, not a folder, read-only, a full disk, ...)."""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`; on any failure (Ctrl-C
    included) the temporary file is removed and `path` is as it was. OS errors become an `OutputError`."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {folder} for {path}: {e.strerror or e}") from None
    temp = folder / f".{path.name}.{secrets.token_hex(4)}{PARTIAL}"
    try:
        # os.open with 0o666 so the final file gets the user's usual permissions (umask), unlike mkstemp's 0o600
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temp, path)
    except BaseException as e:
        temp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}; nothing was left half-written "
                              "(free some space or choose another place, then run again)") from None
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_json(path: str | Path, data: object, indent: int | None = 1) -> Path:
    return write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))


def same_file(path: str | Path) -> str:
    """The key under which two spellings of one file compare equal (`d/x.png`, `d/../d/x.png`, `./d/x.png`, a
    symlinked folder): the absolute path with every link resolved, as far as it exists."""
    return os.path.normcase(os.path.realpath(Path(path).expanduser()))


def check_output_path(path: str | Path, what: str, tried: set[Path] | None = None) -> None:
    """An `OutputError` unless `path` can be written as a file: its name not too long, no part of its folder a
    file, the nearest existing folder writable (tried by creating a temporary file there, once per folder in
    `tried`), and `path` itself not a folder. Creates nothing that stays."""
    path = Path(path).expanduser()
    long = [p for p in path.parts if len(os.fsencode(p)) > NAME_MAX - 20]  # room for the temporary file's suffix
    if long:
        raise OutputError(f"{what} {path}: the name {long[0][:40]!r}... is {len(os.fsencode(long[0]))} bytes long; "
                          f"file names may have at most {NAME_MAX - 20} here. Choose a shorter one")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    folder = path.parent
    while not folder.exists():
        if folder.is_symlink():
            raise OutputError(f"{what} {path}: {folder} is a broken link")
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is a file, not a folder; choose another path")
    if tried is not None and folder in tried:
        return
    try:
        probe = folder / f".sd3-write-test.{secrets.token_hex(4)}{PARTIAL}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {folder} ({e.strerror or e}); choose another "
                          "place") from None
    if tried is not None:
        tried.add(folder)


def check_outputs(paths: Iterable[tuple[str | Path, str]], hint: str = "give each output its own path") -> None:
    """Check each (path, what it is) with `check_output_path` (each distinct folder once), and that no two name
    the same file (`hint`: what to do then)."""
    seen: dict[str, tuple[Path, str]] = {}
    tried: set[Path] = set()
    for path, what in paths:
        path = Path(path)
        key = same_file(path)
        if key in seen:
            first, first_what = seen[key]
            spelt = f"{first}" if str(first) == str(path) else f"{first} and {path}"
            raise OutputError(f"{first_what} and {what} would write the same file ({spelt}); {hint}")
        seen[key] = (path, what)
        check_output_path(path, what, tried)
