"""Callbacks that interrupt a run at a chosen step, for the resume tests (importable by subprocesses too)."""

import os
import signal
import signal as signal_module
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class CrashAt(pl.Callback):
    """Raises before training step ``step + 1`` (the run's work after its last checkpoint is lost)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash after step {self.step}")


class _KillAfter:
    """A file whose writes kill the process (SIGKILL) once more than ``limit`` bytes are on disk."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data):
        n = self.f.write(data)
        self.written += len(data)
        if self.written > self.limit:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


class KillDuringSave(pl.Callback):
    """``kill -9`` of the process in the middle of writing the first checkpoint at ``step`` (after 1 MiB)."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            real = torch.save
            torch.save = lambda obj, f, *a, **k: real(obj, _KillAfter(f, 1 << 20), *a, **k)


class SlowAfter(pl.Callback):
    """After ``step`` training steps, touch ``marker`` and make each further step last ``seconds``."""

    def __init__(self, step: int, marker: str, seconds: float = 1.0):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.marker.touch()
            time.sleep(self.seconds)


def child_pids() -> list[int]:
    """This process's children (the loader workers), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


class SignalAt(pl.Callback):
    """Sends the process ``signal`` while training step ``step + 1`` runs (from its batch start, before the step's
    hooks) or (``during=validation``) in the first validation batch after step ``step``, as a scheduler would.
    ``group``: to every loader worker as well (first), as SLURM, ``timeout`` and a terminal signal a job's process
    group."""

    def __init__(self, step: int, signal: str = "SIGTERM", during: str = "train", group: bool = False):
        self.step, self.signal, self.during, self.group = step, getattr(signal_module, signal), during, group
        self.workers_signalled, self.sent = 0, False

    def _send(self) -> None:
        if self.group:
            children = child_pids()
            for pid in children:
                os.kill(pid, self.signal)
            self.workers_signalled += len(children)
            time.sleep(0.5)  # a worker that dies of it is noticed by the main process meanwhile
        signal_module.raise_signal(self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.during == "train" and trainer.global_step == self.step and not self.sent:
            self.sent = True
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (
            self.during == "validation"
            and trainer.global_step == self.step
            and batch_idx == dataloader_idx == 0
            and not self.sent
        ):
            self.sent = True
            self._send()
