"""Every private Lightning, timm and torch API dgss relies on, in one place (``tests/test_compat.py`` has a test per
entry): an upgrade that moves one of them breaks here, loudly, not somewhere in a method.

Also the console's quiet: Lightning messages that are false or irrelevant for an iteration-based dgss run are
silenced here, each by its exact text and where it is raised, never by a blanket filter.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler  # noqa: F401  (re-exported)
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from dgss.errors import ConfigError

__all__ = ["UnrepeatedDistributedSampler", "StepProgressBar", "batches_done", "grad_norm", "optional_module",
           "optuna_distribution", "parameters_swapped", "quiet_fit", "should_accumulate", "vit_pos_embed",
           "attached_trainer", "is_batch_norm", "tensor_version", "foreach_mul_", "foreach_copy_", "foreach_lerp_"]  # fmt: skip


# ------------------------------------------------------------------------------------ optional dependencies
def optional_module(name: str, missing: str) -> ModuleType:
    """An optional dependency, imported where it is first needed (PyAV for videos, onnxruntime to check an export,
    the Optuna sweeper's internals): the one place dgss imports at run time, so a command that never needs one never
    pays its import, and a missing one is one :class:`ConfigError` line, ``missing``, saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(missing) from None


def optuna_distribution(override):
    """The Optuna distribution the sweeper builds from one search-space override (``lr=interval(1e-5,1e-3)``):
    ``hydra_optuna_sweeper._impl.create_optuna_distribution_from_override``, a private function of the plugin."""
    impl = optional_module("hydra_plugins.hydra_optuna_sweeper._impl",
                           "hparams_search needs the sweep extra: pip install 'dgss[sweep]'")  # fmt: skip
    return impl.create_optuna_distribution_from_override(override)


# ------------------------------------------------------------------------------------------------- Lightning
def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer running ``module``, or None outside a fit / validate (``module.trainer`` raises there)."""
    return module._trainer


def should_accumulate(trainer: pl.Trainer) -> bool:
    """True inside a gradient-accumulation window (this batch does not end with an optimizer step)."""
    return trainer.fit_loop._should_accumulate()


def batches_done(trainer: pl.Trainer) -> int:
    """Training batches processed in the current pass (Lightning's progress counter, restored on resume)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


# Lightning warnings that are false for dgss, by their text: (message regex, why)
FALSE_WARNINGS = (
    (r".*your dataloader is not resumable.*",
     "the DataModule keeps the training stream's state (dgss.data.resumable) in every checkpoint"),
    (r"Found \d+ module\(s\) in eval mode at the start of training.*",
     "frozen backbones stay in eval mode on purpose (SegmentationMethod.freeze)"),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
     "Lightning 2.6 calls a torch 2.14-deprecated pytree API on every step; nothing a user can act on"),
)  # fmt: skip


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """Around every Lightning loop a command runs (``trainer.fit``, dgss-eval's ``trainer.validate``): the warnings of
    :data:`FALSE_WARNINGS` are not shown (only there, only those)."""
    with warnings.catch_warnings():
        for message, _ in FALSE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class _NoTips(logging.Filter):
    """Lightning's advertisements for its cloud products, logged at every Trainer construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in str(record.msg)


_LIGHTNING_LOG = logging.getLogger("lightning.pytorch.utilities.rank_zero")
if not any(isinstance(f, _NoTips) for f in _LIGHTNING_LOG.filters):
    _LIGHTNING_LOG.addFilter(_NoTips())


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counted in optimizer steps of ``trainer.max_steps`` (an iteration-based run has
    no meaningful epochs: Lightning's bar showed ``Epoch 0/-2`` and, after a resume, ``20/9`` batches of a pass), with
    the rate and the time left; after a resume it starts at the checkpoint's step. Overrides private methods of
    ``RichProgressBar``: hence here.

    Args:
        metrics_every: steps between readings of the logged metrics shown beside the bar (each reading copies the
            loss to the host, a synchronisation that stalls the GPU's queue); ``None``: ``trainer.log_every_n_steps``,
            the steps the loggers read them anyway. The step count and rate update every step.
        **kwargs: ``RichProgressBar``'s.
    """

    def __init__(self, metrics_every: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if metrics_every is not None and metrics_every < 1:
            raise ValueError(f"callbacks.progress_bar.metrics_every={metrics_every} must be >= 1 (or null)")
        self.metrics_every = metrics_every

    @property
    def total_train_batches(self) -> int | float:
        steps = self.trainer.max_steps
        return steps if steps and steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train (steps)':{len(self.validation_description)}}"

    def _start_at_step(self) -> None:
        """The bar starts at the checkpoint's step (its rate and time left measured from there, not from 0)."""
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.reset(self.train_progress_bar_id, total=self.total_train_batches,
                                completed=self.trainer.global_step)  # fmt: skip

    def _initialize_train_progress_bar_id(self) -> None:
        super()._initialize_train_progress_bar_id()
        self._start_at_step()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar_id is None:  # one bar for the whole run, not one per pass over the data
            super().on_train_epoch_start(trainer, pl_module)
            self._start_at_step()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        every = self.metrics_every or trainer.log_every_n_steps
        if trainer.global_step % every == 0 or trainer.global_step == self.total_train_batches:
            self._update_metrics(trainer, pl_module)
        self.refresh()


# ------------------------------------------------------------------------------------------------------ timm
def vit_pos_embed(model: nn.Module, tokens: torch.Tensor):
    """timm's position embedding step of a ViT / EVA (prefix tokens, absolute positions resampled to the grid,
    dropout; EVA: also the rotary embedding): ``model._pos_embed``."""
    return model._pos_embed(tokens)


# ----------------------------------------------------------------------------------------------------- torch
def parameters_swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """A context in which ``module``'s parameters named in ``tensors`` are those tensors (``torch.func``'s
    reparametrisation, as ``functional_call`` does it), restored after: ``torch.nn.utils.stateless``."""
    return _reparametrize_module(module, tensors, tie_weights=False, strict=False)


def is_batch_norm(module: nn.Module) -> bool:
    """A batch-norm layer of any dimension (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``): torch's ``_NormBase``."""
    return isinstance(module, nn.modules.batchnorm._NormBase)


def tensor_version(t: torch.Tensor) -> int:
    """The counter autograd bumps on every in-place change of ``t``: ``t._version``."""
    return t._version


def foreach_mul_(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``tensors[i] *= others[i]`` for all i in one multi-tensor kernel: ``torch._foreach_mul_``."""
    torch._foreach_mul_(tensors, others)


def foreach_copy_(tensors: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``tensors[i].copy_(sources[i])`` in one multi-tensor kernel: ``torch._foreach_copy_``."""
    torch._foreach_copy_(tensors, sources)


def foreach_lerp_(tensors: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
    """``tensors[i] += weight·(ends[i] − tensors[i])`` in one multi-tensor kernel: ``torch._foreach_lerp_``."""
    torch._foreach_lerp_(tensors, ends, weight)


def grad_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, one fused pass (non-finite if any element is)."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))), 2.0)
