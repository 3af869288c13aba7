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


# ------------------------------------------------------------------------------------------ output paths
def _same(a: Path, b: Path) -> bool:
    """The same file: one resolved path, or one inode (a hard link, a bind mount)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(a: Path, folder: Path) -> bool:
    a, folder = a.resolve(), folder.resolve()
    return a == folder or folder in a.parents


def writable_folder(folder: str | os.PathLike, key: str) -> Path:
    """``folder`` can be written (it or its nearest existing ancestor is a folder this process may write: checked,
    nothing created), or one :class:`ConfigError` line naming ``key``: a file where a folder belongs, a read-only
    file system, no permission."""
    from dgss.errors import ConfigError

    folder = Path(folder).expanduser()
    for p in (folder, *folder.parents):  # the nearest existing ancestor must be a writable folder
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "a file" if p.is_file() else "not a folder"
                raise ConfigError(f"{key}={str(folder)!r}: {p} is {what}, not a folder; choose another path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={str(folder)!r}: {p} is not writable (read-only or no permission); choose "
                                  "another folder")  # fmt: skip
            break
    return folder


def check_output_file(out: str | os.PathLike, key: str, inputs: dict[str, str | os.PathLike | None]) -> Path:
    """``out`` may be written: not a folder, its folder writable, and not the same file as (or a link to) any of
    ``inputs`` (``{how the user named it: path}``), which writing it would destroy. One line otherwise, before
    anything is written."""
    from dgss.errors import ConfigError

    out = Path(out).expanduser()
    for name, path in inputs.items():
        if path is not None and _same(out, Path(path).expanduser()):
            raise ConfigError(f"{key}={str(out)!r} is {name} ({path}): writing it would replace its input; "
                              "write to another file")  # fmt: skip
    if out.is_dir():
        raise ConfigError(f"{key}={str(out)!r} is a folder; name the file to write")
    writable_folder(out.parent, key)
    return out


def check_output_folder(out: str | os.PathLike, key: str, inputs: dict[str, str | os.PathLike | None],
                        writes: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """``out`` may be written into: not the same as, nor inside, any input folder of ``inputs`` (its outputs would
    be read as inputs by the next run), no input inside the subfolders it ``writes``, and writable."""
    from dgss.errors import ConfigError

    out = Path(out).expanduser()
    for name, path in inputs.items():
        if path is None:
            continue
        path = Path(path).expanduser()
        if _same(out, path) or (path.is_dir() and _inside(out, path)):
            raise ConfigError(f"{key}={str(out)!r} is {'' if _same(out, path) else 'inside '}{name} ({path}): the "
                              "outputs would mix with the inputs (and be read as inputs next time); write to a "
                              "folder outside it")  # fmt: skip
        for sub in writes:
            if _inside(path, out / sub):
                raise ConfigError(f"{name} ({path}) is inside {key}={str(out)!r}/{sub}, which this command writes; "
                                  "write to another folder")  # fmt: skip
    return writable_folder(out, key)
