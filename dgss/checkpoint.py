"""Checkpoints that survive a kill: atomic writes, step-boundary saves, random states and ``resume=auto``.

``AtomicCheckpointIO`` (the trainer's checkpoint plugin) writes every checkpoint to a hidden temporary in the same
folder, fsyncs it and renames it over the target, so a kill at any moment leaves the previous file or the new one,
never a truncated one. ``find_resume_checkpoint`` picks the newest checkpoint of a run that loads, warning about
and skipping unreadable ones.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dgss.compat import should_accumulate
from dgss.errors import ConfigError
from dgss.io import atomic_path, remove_cut_off

log = logging.getLogger("dgss.checkpoint")


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
    if not path.is_file():
        raise UnreadableFile(where, "is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise UnreadableFile(where, "is empty (0 bytes): an interrupted copy or download? copy it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes one line
        if mmap and "mmap" in str(e):  # an old (non-zip) torch.save format: readable, just not memory-mapped
            return load_file(path, key, mmap=False)
        raise UnreadableFile(where, unreadable_reason(e)) from None


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary in the same folder + fsync + ``os.replace``), read back with
    :func:`load_file` (``weights_only``; one-line errors)."""

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        ckpt = load_checkpoint_dict(path)
        if "state_dict" not in ckpt:
            raise ConfigError(
                f"ckpt_path={str(path)!r} is not a dgss-train checkpoint (no state_dict): resume from a "
                "checkpoints/*.ckpt of a run; to start from backbone weights use backbone.weights=<file>"
            )
        return ckpt

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never saves inside a gradient-accumulation window (accumulated gradients are not in
    checkpoints, so such a file would not resume exactly). Lightning's would, e.g. one batch after a resume at a
    step it had not saved yet."""

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if not should_accumulate(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)


def readable(path: Path) -> bool:
    try:
        ckpt = load_checkpoint_dict(path, key="checkpoint", mmap=True)
    except UnreadableFile as e:  # any unreadable file is skipped with the reason
        rank_zero_warn(f"resume=auto: {path} is unreadable (it {e.reason}); trying the previous checkpoint")
        return False
    if "state_dict" not in ckpt:
        rank_zero_warn(f"resume=auto: {path} holds no state_dict; trying the previous checkpoint")
        return False
    return True


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``*.ckpt`` in ``folder`` (by modification time) that loads; None when there is none. Temporaries
    of writes that a kill cut off are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if rank_zero_only.rank == 0:  # before the fit starts, so no rank is writing yet
        for stale in remove_cut_off(folder, "*.ckpt"):  # a save the previous process was killed in
            log.info(f"resume=auto: removed {stale.name}, a checkpoint write that was cut off")
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if readable(path):
            return path
    return None


def rng_states() -> dict[str, Any]:
    """The process's random streams (torch CPU, this device's CUDA, Python, numpy) as tensors and plain values (the
    checkpoint stays loadable with ``weights_only``): dropout, drop-path and the loss's point sampling continue
    after a resume exactly as without the interruption."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this device only: every device's would wake all GPUs
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
