"""Preemption: on SIGTERM, SIGINT (Ctrl-C), SIGUSR1 or SIGUSR2 save a checkpoint at the next safe point, requeue, stop.

Schedulers warn before they stop a job: SLURM sends ``--signal=USR1@<s>`` (submitit: USR2) before the time limit
and SIGTERM on preemption (then SIGKILL after ``KillWait``); Kubernetes and cloud spot VMs send SIGTERM. The handler
only notes the signal. The optimizer step in flight finishes (with gradient accumulation: its window); at the end
of that training batch (or of the validation batch, when the signal comes during a single process's validation)
``<dirpath>/preempted.ckpt`` is written (atomically, like every checkpoint), the SLURM job is requeued when running
in one, and training stops by raising ``Preempted``: ``dgss-train`` prints one line and exits with status 0 when
requeued, else 128 + the signal's number. The requeued job, or the same command with ``resume=auto``, continues
from that checkpoint exactly. Under DDP one rank receiving the signal is enough: the signal is reduced over the
ranks every step.

Ctrl-C (SIGINT) is handled the same way, without a requeue: the first one says on the console that the step in
flight finishes and a checkpoint follows; a second one stops at once (KeyboardInterrupt), without a checkpoint.

A checkpoint written during validation holds the training state of the last step (validation changes nothing of
it) and the loops' state as they were at that step's end, so it is the file a signal at the step's end would have
written: Lightning's resumed run skips that validation (no partial one is logged), validates again at the next
interval, and does not replay the rest of a finished pass (with loader workers that replay drew a pass's order it
never trained on, and the resumed run's data differed from a straight run's).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from dgss.compat import should_accumulate
from dgss.errors import ConfigError

log = logging.getLogger("dgss.preemption")

CHECKPOINT_NAME = "preempted.ckpt"


class Preempted(Exception):
    """Training stopped on a signal after saving ``path``; ``requeued`` names the SLURM job put back in the queue."""

    def __init__(
        self, signame: str, step: int, path: Path, requeued: str | None, resume_hint: str = "resume=auto"
    ):
        self.signame, self.step, self.path, self.requeued = signame, step, path, requeued
        rerun = f"rerun the same command with {resume_hint}" if resume_hint else "rerun the same command"
        then = f"SLURM job {requeued} requeued" if requeued else f"{rerun} to continue"
        super().__init__(f"stopped by {signame} at step {step}; checkpoint {path}; {then}")

    @property
    def exit_code(self) -> int:
        """0 when requeued (the job goes on), else 128 + the signal's number, as a process killed by it."""
        return 0 if self.requeued else 128 + int(getattr(signal, self.signame))


def slurm_job_id() -> str | None:
    """The job to requeue: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class Preemption(pl.Callback):
    """
    Args:
        dirpath: where ``preempted.ckpt`` is written (the run's checkpoint folder, where ``resume=auto`` looks).
        signals: the signals to act on (names). SIGUSR2 is submitit's time-limit warning (``signal_delay_s``).
        requeue: ``auto`` (requeue with ``scontrol`` when running in a SLURM job) | ``true`` | ``false``.
    """

    def __init__(
        self,
        dirpath: str | Path,
        signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"),
        requeue: Any = "auto",
    ):
        self.dirpath = Path(dirpath)
        unknown = [s for s in signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        if unknown:
            raise ConfigError(
                f"callbacks.preemption.signals names unknown signals {unknown}; use e.g. SIGTERM, SIGUSR1"
            )
        self.signals = [getattr(signal, s) for s in signals]
        if requeue not in ("auto", True, False):
            raise ConfigError(f"callbacks.preemption.requeue={requeue!r}; use auto, true or false")
        self.requeue = requeue
        self.received: str | None = None
        self.stopped: Preempted | None = None
        self.resume_hint = "resume=auto"  # what the stop message tells the user to add (dgss-train sets it)
        self.requeue_refused: str | None = None  # why a requeued job could not continue (dgss-train sets it)
        self._previous: dict[signal.Signals, Any] = {}
        self._loops_at_step_end: dict | None = None  # the fit loop's state after the last optimizer step
        self._saving_mid_validation = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the save happens after every other callback finished the step (EMA's update, a periodic checkpoint), so
        # the checkpoint belongs to one step whatever the callbacks' order; Lightning's own reordering (checkpoint
        # callbacks last) is done by now
        # (a new list: the hook loop calling this goes on over the old one)
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    # ------------------------------------------------------------------------------- signals
    def _note(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.received == "SIGINT":  # the second Ctrl-C: stop now, no checkpoint
                self._restore_handlers()
                raise KeyboardInterrupt
            print("\ndgss-train: Ctrl-C: finishing this step, then saving a checkpoint to resume from "
                  "(Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)  # fmt: skip
        self.received = self.received or signal.Signals(signum).name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own SIGTERM handler (which would raise mid-validation, and in a single
        # process only at an epoch's end): ours replaces it for the fit and Lightning restores it at teardown
        self.received, self.stopped = None, None
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread (e.g. a notebook's worker thread): nothing to install
            log.warning("preemption: signal handlers need the main thread; running without them")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    # ---------------------------------------------------------------------------- safe points
    def _agreed(self, trainer: pl.Trainer) -> str | None:
        """The signal to act on now, the same on every rank (the highest number any rank received), or None."""
        if self.stopped is not None:
            return None
        num = int(getattr(signal, self.received)) if self.received else 0
        if trainer.world_size > 1:  # any rank's signal stops them all
            num = int(
                trainer.strategy.reduce(
                    torch.tensor(num, device=trainer.strategy.root_device), reduce_op="max"
                )
            )
        return signal.Signals(num).name if num else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if should_accumulate(trainer):  # mid-accumulation: gradients are not in checkpoints, so wait
            return
        if trainer.world_size == 1:  # what a save during the validation that may follow writes as the loops
            self._loops_at_step_end = copy.deepcopy(trainer.fit_loop.state_dict())
        # raised, not should_stop: Lightning would run a validation first, past the grace period
        if signame := self._agreed(trainer):
            raise self._save_and_requeue(trainer, signame)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        # one process only: under DDP the ranks' evaluation shares differ in length (no padded duplicates), so a
        # collective here could hang; the ranks agree at the next training batch instead
        if trainer.state.fn == "fit" and trainer.world_size == 1 and (signame := self._agreed(trainer)):
            self._saving_mid_validation = True
            try:
                raise self._save_and_requeue(trainer, signame)
            finally:
                self._saving_mid_validation = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        if self._saving_mid_validation and self._loops_at_step_end is not None:
            checkpoint["loops"]["fit_loop"] = self._loops_at_step_end

    def _save_and_requeue(self, trainer: pl.Trainer, signame: str) -> Preempted:
        path = self.dirpath / CHECKPOINT_NAME
        trainer.save_checkpoint(
            path, weights_only=False
        )  # the full training state (False: no "not set" notice)
        requeued = self._requeue() if trainer.is_global_zero and signame != "SIGINT" else None
        self.stopped = Preempted(signame, trainer.global_step, path, requeued, self.resume_hint)
        log.warning(f"preemption: {self.stopped}")
        return self.stopped

    def _requeue(self) -> str | None:
        job = slurm_job_id()
        if self.requeue is False or (self.requeue == "auto" and job is None):
            return None
        if self.requeue_refused:  # the same command again would start over in a new folder
            log.warning(f"preemption: SLURM job {job} not requeued: {self.requeue_refused}")
            return None
        if job is None:
            raise ConfigError(
                "callbacks.preemption.requeue=true but SLURM_JOB_ID is not set: not in a SLURM job"
            )
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            log.warning(f"preemption: scontrol is not on PATH; SLURM job {job} not requeued")
            return None
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning(
                f"preemption: scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
            )
            return None
        return job
