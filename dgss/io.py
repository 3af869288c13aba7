"""Atomic file writes: nobody ever reads a half-written file under its final name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary beside ``dst`` (same folder, so the rename is atomic) to write to; it replaces
    ``dst`` when the block ends without an error and is removed otherwise."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def remove_cut_off(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporaries of ``atomic_path`` writes to ``folder/<name>`` that a kill cut off (only call it when
    no process is writing there); returns the removed paths."""
    folder = Path(folder)
    removed = sorted(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed
