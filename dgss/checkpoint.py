"""Checkpoints that survive a kill: atomic writes and ``resume=auto``.

``AtomicCheckpointIO`` (the trainer's checkpoint plugin) writes every checkpoint to a hidden temporary in the same
folder, fsyncs it and renames it over the target, so a kill at any moment leaves the previous file or the new one,
never a truncated one. ``find_resume_checkpoint`` picks the newest checkpoint of a run that loads, warning about
and skipping unreadable ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from dgss.io import atomic_path

log = logging.getLogger("dgss.checkpoint")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary in the same folder + fsync + ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def readable(path: Path) -> bool:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return isinstance(ckpt, dict) and "state_dict" in ckpt
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped with the reason
        rank_zero_warn(
            f"resume=auto: {path} is unreadable ({type(e).__name__}: {e}); trying the previous checkpoint"
        )
        return False


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``*.ckpt`` in ``folder`` (by modification time) that loads; None when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if readable(path):
            return path
    return None
