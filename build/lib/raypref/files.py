"""Writing files so that a reader (or a resumed run) never sees a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``content`` (text, bytes, or a callable that writes the file at the path it is given) to a
    temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX). The temporary name
    keeps the suffix, so writers that infer the format from it (Parquet, matplotlib) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    if isinstance(content, str):
        tmp.write_text(content)
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        content(tmp)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())
