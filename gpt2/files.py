"""Files: writes that survive crashes, checksums and JSONL reading, for every file the pipeline writes
(shards, manifests, checkpoints, logs, scores, plots, exports), verifies or reads back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt2.errors import UserError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, rename it over ``path`` and fsync the directory:
    after a crash at any moment there is the old file or the whole new one, never a torn one under that name.
    If ``write`` raises, the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or deletion in ``directory`` durable (the directory's entry table reaches the disk)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (shards are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line; a malformed line is a ``UserError`` at file:line.

    With ``allow_partial_tail`` a last line without its newline that does not parse is skipped: it is a
    record another process is still appending.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and lineno == len(lines):
                return
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def jsonl_text(records: Iterable[dict]) -> str:
    """Records as JSON lines, each ending in a newline."""
    return "".join(json.dumps(r) + "\n" for r in records)
