"""Files a user names, read and written safely: atomic writes (nobody ever reads a half-written file under its final
name), ``torch.load`` of untrusted files with ``weights_only`` and a zip-record size check (a crafted file runs no code
and allocates nothing it does not hold), output paths checked against the inputs they would overwrite; every failure
one :class:`~dgss.errors.ConfigError` line."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dgss.errors import ConfigError


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


# ------------------------------------------------------------------------------------------ reading a user's file
class UnreadableFile(ConfigError):
    """A user's file that cannot be loaded; ``reason`` is the message without the file's name."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where} {reason}")
        self.reason = reason


def load_file(path: str | os.PathLike, key: str = "ckpt_path", mmap: bool = False) -> Any:
    """``torch.load`` of a file a user names, safely: ``weights_only=True`` (tensors and plain containers only, so a
    crafted file cannot run code), and every way it can fail as one :class:`ConfigError` line naming ``key``, the
    file and the fix. dgss's own checkpoints hold only such types."""
    path = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if not path.exists():
        raise UnreadableFile(where, "does not exist")
    if path.is_dir():
        raise UnreadableFile(where, "is a folder, not a checkpoint file")
    if not path.is_file():
        raise UnreadableFile(
            where, "is not a regular file (a pipe, socket or device); point at a checkpoint file"
        )
    if path.stat().st_size == 0:
        raise UnreadableFile(where, "is empty (0 bytes): an interrupted copy or download? copy it again")
    check_archive(path, where)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes one line
        if mmap and "mmap" in str(e):  # an old (non-zip) torch.save format: readable, just not memory-mapped
            return load_file(path, key, mmap=False)
        raise UnreadableFile(where, unreadable_reason(e)) from None


def check_archive(path: Path, where: str) -> None:
    """A zip archive (``torch.save``'s format) is read only if its records' declared sizes fit the file (records
    are stored uncompressed; a TorchScript archive's small code records aside): a crafted archive with a
    compressed record would make ``torch.load`` allocate its declared size (GBs from a few MB) before failing."""
    if not zipfile.is_zipfile(path):
        return  # the legacy pickle format, or not an archive at all: torch.load says which
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnreadableFile(
            where, f"is a damaged zip archive ({e}); copy it again or point at the right file"
        ) from None
    declared, size = sum(i.file_size for i in infos), path.stat().st_size
    if declared > size + ARCHIVE_SLACK:
        packed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
        why = f", in compressed records ({packed}) torch.save never writes" if packed else ""
        raise UnreadableFile(where, f"declares {declared} bytes of records in a {size}-byte file{why}; refused "
                                    "unread (a crafted file can claim any size): copy it again, or re-save it")  # fmt: skip


ARCHIVE_SLACK = (
    64 << 20
)  # bytes an archive may declare beyond its size (TorchScript compresses its code records)


def unreadable_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` (or a safetensors read) failed, as the tail of a one-line message."""
    msg = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if unsafe:
        return (
            f"holds Python objects beyond tensors and plain containers ({unsafe.group(1)}); refused, since loading "
            "it could run code. dgss checkpoints and state dicts never need that: if you trust the file, re-save "
            "its tensors as a plain state dict (or .safetensors) and pass that"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)  # torch's own reason, not its advice
    detail = detail.group(1) if detail else next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    detail = f"{type(e).__name__}: {detail.split('. ')[0][:120]}" if detail else type(e).__name__
    return f"is not a readable PyTorch checkpoint, or it is truncated ({detail}); copy it again or point at the right file"


def load_checkpoint_dict(path: str | os.PathLike, key: str = "ckpt_path", mmap: bool = False) -> dict:
    """:func:`load_file` for a file that must be a dict (a Lightning checkpoint or a state dict)."""
    obj = load_file(path, key, mmap=mmap)
    if not isinstance(obj, dict):
        raise UnreadableFile(
            f"{key}={str(path)!r}", f"holds a {type(obj).__name__}, not a checkpoint (a dict)"
        )
    return obj


def write_failure(e: BaseException, path) -> str:
    """Why a write failed, in words: the errno's (a full disk, a read-only folder), else the error's first line."""
    err = (
        e
        if isinstance(e, OSError)
        else next((c for c in (e.__cause__, e.__context__) if isinstance(c, OSError)), None)
    )
    if err is not None and err.errno is not None:
        return os.strerror(err.errno).lower()
    try:
        if shutil.disk_usage(Path(path).parent).free < 1 << 20:
            return "no space left on device"
    except OSError:
        pass
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
