"""The non-finite guard of every method's training step: a step whose loss or gradients are NaN / inf changes no
parameter, buffer or optimizer state.

A skipped step's running statistics are restored (saved before its first forward), its gradients dropped, the skip
counted, logged (``train/nonfinite_skipped``) and warned about; ``max_nonfinite`` skips in a row raise
:class:`~dgss.errors.TrainingAborted`. The iteration still counts, so the schedule stays on the step axis, and every
rank decides together (or DDP would hang). The training step does not wait for the check: its loss's finiteness stays
on the device and is checked with the gradients at the end of the accumulation window (:meth:`NonFiniteGuard.finish_window`),
one host synchronisation per optimizer step. Under fp16 Lightning's grad scaler checks the gradients itself and must
see the backward it scaled, so there the loss is checked before the backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from dgss.compat import attached_trainer, grad_norm, is_batch_norm
from dgss.errors import TrainingAborted


def running_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The buffers a forward in training mode changes: running statistics of batch norms that train."""
    return [b for m in module.modules() if is_batch_norm(m) and m.training
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]  # fmt: skip


class NonFiniteGuard:
    """The guard of one method (``module``); ``counts``: ``{"total": skipped steps, "streak": in a row}``.

    Args:
        module: the method it guards (its parameters, running statistics, trainer and logger).
        max_nonfinite: skipped steps in a row that abort the run.
    """

    def __init__(self, module: pl.LightningModule, max_nonfinite: int):
        self.module = module
        self.max_nonfinite = int(max_nonfinite)
        self.counts = {"total": 0, "streak": 0}
        self.skipping = False  # a non-finite micro-batch: the rest of its accumulation window is skipped
        self._saved: list[torch.Tensor] | None = None  # running statistics before this step's first forward
        self._loss_finite: torch.Tensor | None = None  # the window's losses finite (on the device, unchecked)

    # ------------------------------------------------------------------------------------ running statistics
    def save_buffers(self) -> None:
        """Before a step's first forward (of an accumulation window): what a skipped step restores."""
        if self._saved is None:
            self._saved = [b.detach().clone() for b in running_buffers(self.module)]

    def restore_buffers(self, forget: bool = True) -> None:
        """Running statistics back to their values before the step's forward. With ``forget=False`` the saved values
        stay for a later restore (a statistics-only pass inside a step)."""
        if self._saved is not None:
            with torch.no_grad():
                for b, saved in zip(running_buffers(self.module), self._saved):
                    b.copy_(saved)
        if forget:
            self._saved = None

    # ---------------------------------------------------------------------------------------------- decisions
    def fp16_scaler(self) -> bool:
        """Lightning's fp16 grad scaler checks the gradients itself and must see the backward it scaled."""
        trainer = attached_trainer(self.module)
        return trainer is not None and str(trainer.precision).startswith("16")

    def check(self, value: torch.Tensor | None, what: str = "loss") -> bool:
        """Checked now (one host synchronisation): False (skip the step) when ``value`` (a loss, or the gradients'
        summed norms) is NaN / inf on any rank; see :meth:`decide`."""
        return self.decide(bool(torch.isfinite(value.detach()).all()) if value is not None else True, what)

    def note_loss(self, loss: torch.Tensor) -> None:
        """The step's loss, checked with the window's gradients (:meth:`finish_window`), not now."""
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def decide(self, finite: bool, what: str = "loss") -> bool:
        """The guard's decision, taken by every rank together: a skipped step is undone, counted, logged and warned
        about; ``max_nonfinite`` in a row raise :class:`TrainingAborted`."""
        m, trainer = self.module, attached_trainer(self.module)
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        self.restore_buffers()
        self._loss_finite = None
        for p in m.parameters():
            p.grad = None
        self.skipping = True
        self.counts["total"] += 1
        self.counts["streak"] += 1
        n, total = self.counts["streak"], self.counts["total"]
        if trainer is not None:
            m.log("train/nonfinite_skipped", float(total), batch_size=1)
        rank_zero_warn(
            f"non-finite {what} at step {m.global_step}: step skipped ({n} in a row, {total} in all)"
        )
        if n >= self.max_nonfinite:
            raise TrainingAborted(
                f"{n} non-finite losses or gradients in a row at step {m.global_step} (method.max_nonfinite="
                f"{self.max_nonfinite}); the model and every checkpoint hold the weights from before them: lower "
                "method.optimizer.lr, set trainer.gradient_clip_val or check the data, then resume=auto"
            )
        return False

    def skipped_output(self) -> torch.Tensor | None:
        """What ``training_step`` returns for a skipped step: ``None`` (Lightning skips the backward), or under DDP,
        where Lightning refuses ``None``, a zero loss over every trainable parameter, so that every rank runs the same
        backward and gradient all-reduce; those (zero) gradients are dropped before the optimizer step."""
        m, trainer = self.module, attached_trainer(self.module)
        if trainer is None or trainer.world_size <= 1:
            return None
        return sum(
            (p.sum() * 0.0 for p in m.parameters() if p.requires_grad), torch.zeros((), device=m.device)
        )

    def finish_window(self, optimizer, extra_grads: Sequence[torch.Tensor] = ()) -> bool:
        """At the end of an accumulation window (before clipping): True when the optimizer step goes ahead. The
        window's losses and its gradients — the optimizer's, and ``extra_grads`` a method took outside it — are
        checked together, in one host synchronisation; a non-finite one skips the window's update."""
        if not self.skipping:
            checks = {"loss": self._loss_finite} if self._loss_finite is not None else {}
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grads += list(extra_grads)
            if grads and not self.fp16_scaler():
                checks["gradients"] = torch.isfinite(grad_norm(grads))
            self._loss_finite = None
            if checks:
                finite = torch.stack(list(checks.values())).cpu().numpy().tolist()  # the step's one host sync
                self.decide(all(finite), next((w for w, ok in zip(checks, finite) if not ok), "loss"))
        if self.skipping:  # the window ends here; no member of the optimizer sees a gradient
            self.skipping = False
            for p in self.module.parameters():
                p.grad = None
            return False
        self.counts["streak"] = 0  # an update went through: the streak ends, the saved statistics are dropped
        self._saved = None
        return True
