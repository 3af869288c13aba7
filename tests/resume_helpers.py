"""Callbacks that interrupt a run at a chosen step, for the resume tests (importable by subprocesses too)."""

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl


class CrashAt(pl.Callback):
    """Raises before training step ``step + 1`` (the run's work after its last checkpoint is lost)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash after step {self.step}")


class _KillWhilePickled:
    def __reduce__(self):  # runs inside torch.save, after part of the file has been written
        os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(pl.Callback):
    """``kill -9`` of the process in the middle of writing the first checkpoint at ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            checkpoint["zz_kill"] = [b"\0" * (1 << 20), _KillWhilePickled()]  # 1 MiB written, then the kill


class SlowAfter(pl.Callback):
    """After ``step`` training steps, touch ``marker`` and make each further step last ``seconds``."""

    def __init__(self, step: int, marker: str, seconds: float = 1.0):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.marker.touch()
            time.sleep(self.seconds)

