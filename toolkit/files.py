"""Reading files from outside with a size bound, and writing state so a crash never half-writes it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from toolkit.errors import UserError


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The file's bytes, or one line saying why not (unreadable, or over ``limit`` bytes)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise UserError(f"{what} {path} is more than {limit} bytes")
    return raw


def write_atomically(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Temp file in the same folder, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
