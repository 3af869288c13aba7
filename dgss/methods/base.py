"""``SegmentationMethod``: everything a tuning method shares, so that a method file only says what trains.

The base composes its parts: the input (normalise + pad, :mod:`dgss.methods.input`, as mmseg's
``SegDataPreProcessor``), the non-finite guard (:mod:`dgss.methods.guard`), the optimizer recipe (parameter groups
by mmengine's ``paramwise_cfg`` rule, :mod:`dgss.methods.paramwise`; AdamW or any partial optimizer, the poly schedule,
weight-decay annealing: :mod:`dgss.methods.recipe`), the checkpoint format (:mod:`dgss.checkpoint`) and the summary
(:mod:`dgss.methods.summary`). It owns the training step, validation with per-domain IoU, and which modules train.

A method is one file: a dataclass of its options (registered as its Hydra schema) and a subclass that overrides
:meth:`configure_tuning` (freeze, wrap, add modules) and, where it needs them, ``recipe_custom_keys`` (its official
config's parameter-group keys), :meth:`training_pass` (the one extension point of the step: passes of its own,
:class:`TrainingPass`) and ``checkpoint_section`` with :meth:`save_section` / :meth:`load_section` (state of its own
in checkpoints). Tuning is built once, in :meth:`configure_model` (Lightning calls it before fit / validate;
``dgss.config.build_method`` right after construction), never from a constructor.

Eval mode, one rule: modules a method freezes (:meth:`freeze`) run in eval mode; modules it places inside them and
trains (:meth:`adopt`, e.g. AdaptFormer's adapters with their dropout) run in the trainer's mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from dgss import console
from dgss.checkpoint import load_model_part, put_section, save_model_part, section
from dgss.compat import attached_trainer
from dgss.errors import ConfigError
from dgss.methods import recipe
from dgss.methods.guard import NonFiniteGuard
from dgss.methods.input import InputOptions, SegInput
from dgss.methods.paramwise import ParamwiseOptions, group_parameters
from dgss.methods.recipe import OptimizerConfig, SchedulerOptions, default_optimizer
from dgss.methods.summary import describe_summary, parameter_summary
from dgss.metrics import DomainIoU, summarize
from dgss.models import inference
from dgss.models.backbone import Backbone
from dgss.models.heads.protocol import HeadFactory, RegionalHead, SegmentationHead
from dgss.models.inference import InferenceOptions


@dataclass
class MethodConfig:
    """The Hydra node of every method: the base's options. A method's config subclasses it, sets ``_target_`` and
    adds its own option groups; ``method/<name>.yaml`` starts from the registered ``<name>_schema``."""

    _target_: str = ""
    num_classes: int = 19  # checked against the data at fit / validate time
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    paramwise: ParamwiseOptions = field(
        default_factory=ParamwiseOptions
    )  # groups: keys over the method's own
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    input: InputOptions = field(default_factory=InputOptions)  # the training crop (linked to the data's)
    max_nonfinite: int = 10  # non-finite losses / gradients in a row that abort the run (each skips its step)


class TrainingPass:
    """One training step of a method, from its forward to its optimizer step: the one extension point of the step.

    :meth:`SegmentationMethod.training_step` runs :meth:`losses` between the batch's preparation and the backward
    (``None``: a pass of its own was non-finite, the step is skipped); after the backward the non-finite guard checks
    the optimizer's gradients together with :meth:`extra_grads` (gradients the pass took outside the optimizer), and
    :meth:`finish` runs before clipping and the update, told whether it goes ahead. What a step gathers between its
    forward and its update lives here, never on the method. A method with passes of its own (FisherTune) returns its
    subclass from :meth:`SegmentationMethod.training_pass`."""

    def __init__(self, method: SegmentationMethod):
        self.method = method

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return self.method.training_losses(images, labels)

    def extra_grads(self) -> Sequence[torch.Tensor]:
        return ()

    def finish(self, went_ahead: bool) -> None:
        pass


class SegmentationMethod(pl.LightningModule):
    """Backbone + head with a tuning recipe; the options are :class:`MethodConfig`'s.

    Args:
        backbone: the feature extractor.
        head: a factory ``head(in_channels=..., num_classes=...)`` (a Hydra partial).
        optimizer: a factory ``optimizer(param_groups)`` carrying ``lr`` and ``weight_decay`` (a Hydra partial).
        scheduler, inference, input: :class:`SchedulerOptions`, :class:`InferenceOptions`, :class:`InputOptions` (or
            their dicts).
        num_classes, paramwise, max_nonfinite: as :class:`MethodConfig`.
    """

    recipe_custom_keys: dict[str, dict[str, float]] = {}  # the official config's keys; method.paramwise's win

    def __init__(
        self,
        backbone: Backbone,
        head: HeadFactory,
        num_classes: int = MethodConfig.num_classes,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: SchedulerOptions | dict | None = None,
        paramwise: ParamwiseOptions | dict | None = None,
        inference: InferenceOptions | dict | None = None,
        input: InputOptions | dict | None = None,
        max_nonfinite: int = MethodConfig.max_nonfinite,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head(in_channels=backbone.out_channels, num_classes=num_classes)
        if not isinstance(self.head, SegmentationHead):
            raise ConfigError(f"head {type(self.head).__name__} is not a segmentation head: it needs forward(features, "
                              "queries=None), loss(output, labels) and logits(output, size) (dgss.models.heads.protocol)")  # fmt: skip
        self.num_classes = num_classes
        self.optimizer_factory = optimizer or default_optimizer()
        self.scheduler_options = SchedulerOptions.of(scheduler, "method.scheduler")
        self.inference_options = InferenceOptions.of(inference, "method.inference")
        self.paramwise = ParamwiseOptions.of(paramwise, "method.paramwise")
        self.guard = NonFiniteGuard(self, max_nonfinite)
        self.step_pass: TrainingPass | None = None  # this step's passes, from training_step to its update
        self.domains: list[str] = []
        self.mean_domains: list[str] | None = None
        self.val_iou: DomainIoU | None = None
        self.last_val: dict[str, torch.Tensor] = {}  # per-class IoU of the last validation, for callbacks
        self.last_counts: dict[str, dict[str, int]] = {}  # images scored / skipped per target, likewise
        self.input = SegInput(*backbone.normalization, InputOptions.of(input, "method.input").crop)
        self._frozen: list[nn.Module] = []  # eval mode (freeze)
        self._adopted: list[nn.Module] = []  # the trainer's mode, inside frozen modules (adopt)
        self._built = False
        # the trained state will come from a checkpoint (resume, dgss-eval, dgss-merge): tuning is built without its
        # data-dependent initialisation (SoMA's SVD); set by dgss.config.build_method before configure_model
        self.restoring = False

    def configure_model(self) -> None:
        """Build the tuning once (Lightning calls this before fit / validate; ``build_method`` and ``load_method``
        right after construction): :meth:`configure_tuning` runs on a fully constructed method."""
        if self._built:
            return
        self._built = True
        self.configure_tuning()

    # ----------------------------------------------------------------------------- what trains
    def configure_tuning(self) -> None:
        """Subclasses freeze, wrap or add modules here. The base trains everything."""

    def freeze(self, module: nn.Module) -> None:
        """``requires_grad=False`` for all of ``module``, which then runs in eval mode (no dropout / drop-path)."""
        module.requires_grad_(False)
        self._frozen.append(module)
        module.eval()

    def adopt(self, module: nn.Module) -> None:
        """A trainable module the method placed inside a frozen one: it follows the trainer's mode."""
        self._adopted.append(module)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:  # Lightning calls train() around every validation
            m.eval()
        for m in self._adopted:
            m.train(mode)
        return self

    # ---------------------------------------------------------------------------------- input
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images (..., 3, H, W) -> float32 normalised with the backbone's mean / std (:class:`SegInput`)."""
        return self.input.normalize(images)

    def prepare_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch normalised, padded to ``method.input.crop`` and stacked (:class:`SegInput`)."""
        return self.input(batch)

    # -------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> Any:
        """Normalised float images -> the head's outputs."""
        return self.head(self.backbone(images))

    def compile_regions(self, **options) -> None:
        """``compile=true``: ``torch.compile`` the regions that repeat, in place (checkpoint keys unchanged): each
        backbone block (one graph for all of them: the blocks share their code and, with torch's inlining of built-in
        modules, their guards; a method's wrappers inside a block, such as LoRA's, compile with it) and each of the
        head's repeated layers (a :class:`~dgss.models.heads.protocol.RegionalHead`, e.g. Mask2Former's encoder and
        decoder layers; another head is compiled whole). The glue between them, the losses (host matching) and Rein's hooks between blocks stay eager, so
        the eager path remains the exact reference and a compile costs a few layers' graphs, not the whole model's
        (on the CPU, DINOv2-L's depth at small widths: first step 222 s compiling the whole model, 152 s with the
        head's forward whole, 50 s by layers; docs/benchmarks.md)."""
        for blk in self.backbone.model.blocks:
            blk.compile(**options)
        for layer in self.head.repeated_layers() if isinstance(self.head, RegionalHead) else [self.head]:
            layer.compile(**options)

    def predict_logits(self, images: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> logits at ``out_size``, with the method's inference setting."""
        fn = lambda x: self.head.logits(self(x), x.shape[-2:])  # noqa: E731
        return inference.predict(fn, self.normalize(images), out_size, self.backbone.patch_size,
                                 **asdict(self.inference_options))  # fmt: skip

    # ---------------------------------------------------------------------------------- steps
    @property
    def nonfinite(self) -> dict[str, int]:
        """Skipped non-finite steps: ``{"total", "streak"}`` (:class:`~dgss.methods.guard.NonFiniteGuard`)."""
        return self.guard.counts

    def training_pass(self, batch: dict) -> TrainingPass:
        """The extension point of the step: the :class:`TrainingPass` that runs this batch's passes (``batch`` as the
        data module gave it). The default is one forward of the head's losses (:meth:`training_losses`)."""
        return TrainingPass(self)

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The losses of one training forward (the head's, by name)."""
        return self.head.loss(self(images), labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.guard.skipping:  # an earlier micro-batch of this accumulation window was non-finite
            return self.guard.skipped_output()
        self.guard.save_buffers()
        images, labels = self.prepare_batch(batch)
        self.step_pass = self.training_pass(batch)
        losses = self.step_pass.losses(images, labels)
        if losses is None:  # no backward (a zero one under DDP); the optimizer step has no gradients
            return self.guard.skipped_output()
        loss = sum(losses.values())
        if (
            self.guard.fp16_scaler()
        ):  # the scaler must not step on dropped gradients: decide before the backward
            if not self.guard.check(loss):
                return self.guard.skipped_output()
        else:  # checked with the gradients at the window's end (finish_window): no host synchronisation here
            self.guard.note_loss(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        if len(losses) > 1:
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """After the backward, before clipping: the guard checks the window (with the pass's own gradients), then the
        pass finishes, told whether the update goes ahead."""
        step, self.step_pass = self.step_pass, None
        went_ahead = self.guard.finish_window(optimizer, step.extra_grads() if step is not None else ())
        if step is not None:
            step.finish(went_ahead)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        if dm.num_classes != self.num_classes:
            raise ConfigError(
                f"the data has {dm.num_classes} classes but the model was built for num_classes={self.num_classes}; "
                f"set num_classes={dm.num_classes} (or use data with {self.num_classes} classes)"
            )
        crop = self.input.crop
        if stage == "fit" and crop is not None and any(c % self.backbone.patch_size for c in crop):
            raise ConfigError(
                f"the training crop {list(crop)} is not a multiple of the backbone's patch size "
                f"{self.backbone.patch_size}; change data.train_pipeline.crop"
            )
        self.domains = list(dm.target_names)
        self.mean_domains = list(dm.mean_targets)
        self.val_iou = DomainIoU(self.domains, self.num_classes).to(self.device)

    def on_validation_epoch_start(self) -> None:
        self.val_iou.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        skipped = int(torch.as_tensor(batch.get("skipped", 0)).sum())
        if skipped:
            self.val_iou.skip(dataloader_idx, skipped)
        if batch["image"] is None:  # every image of the batch was unreadable (on_bad: skip): nothing to score
            return None
        label = batch["label"]
        pred = self.predict_logits(batch["image"], label.shape[-2:]).argmax(1)
        self.val_iou.update(dataloader_idx, pred, label)
        return {"pred": pred}

    def on_validation_epoch_end(self) -> None:
        per_class = self.val_iou.compute()
        self.last_counts = self.val_iou.counts()
        self.last_val = {d: v.detach().cpu() for d, v in per_class.items()}
        scores = summarize(self.last_val, self.mean_domains)
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, sync_dist=False, rank_zero_only=False)
        self.val_iou.reset()

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    # -------------------------------------------------------------------- optimizer, schedule
    def paramwise_options(self) -> ParamwiseOptions:
        """``method.paramwise`` with the method's recipe keys underneath (a key set in the config wins)."""
        o = self.paramwise
        return ParamwiseOptions(custom_keys={**self.recipe_custom_keys, **o.custom_keys},
                                norm_decay_mult=o.norm_decay_mult, bias_decay_mult=o.bias_decay_mult,
                                flat_decay_mult=o.flat_decay_mult)  # fmt: skip

    def param_groups(self) -> list[dict]:
        """Trainable parameters grouped by (lr_mult, decay_mult) as mmengine's paramwise_cfg groups them."""
        groups = group_parameters(self, self.paramwise_options())
        if not groups:
            raise ConfigError(f"method {type(self).__name__} has no trainable parameters")
        return groups

    def build_optimizer(self) -> torch.optim.Optimizer:
        """``method.optimizer`` over :meth:`param_groups` (:func:`dgss.methods.recipe.build_optimizer`)."""
        return recipe.build_optimizer(self.optimizer_factory, self.param_groups())

    def configure_optimizers(self):
        opt = self.build_optimizer()
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.build_scheduler(opt), "interval": "step"},
        }

    def total_steps(self) -> int:
        """The run's optimizer steps: ``trainer.max_steps``, else Lightning's estimate from the epochs."""
        t = self.trainer
        return t.max_steps if t.max_steps > 0 else int(t.estimated_stepping_batches)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``scheduler.weight_decay: cosine``: every group's decay for this step (:func:`~dgss.methods.recipe.anneal_weight_decay`)."""
        recipe.anneal_weight_decay(
            self.trainer.optimizers, self.global_step, self.total_steps(), self.scheduler_options
        )

    def build_scheduler(self, opt: torch.optim.Optimizer):
        """Linear warm-up then poly decay to 0 at the last step (:func:`dgss.methods.recipe.build_scheduler`)."""
        return recipe.build_scheduler(opt, self.total_steps(), self.scheduler_options)

    def plain_backbone(self) -> nn.Module:
        """A copy of the backbone's timm model with what the method trained folded into its weights
        (``dgss-merge --backbone-out``). Methods that leave the backbone a timm model (full, frozen, FisherTune) give
        it as is; a method whose modules cannot be folded into the weights (Rein's tokens, prompts, adapters with a
        nonlinearity) raises, one that can (SoMA) overrides this."""
        own = [n for n, m in self.backbone.model.named_modules() if type(m).__module__.startswith("dgss.")]
        if own or self.backbone.has_block_hooks:
            raise ConfigError(f"method {type(self).__name__} adds modules to the backbone that do not fold into its "
                              "weights (e.g. " + (own[0] if own else "a block hook") + "); there is no plain backbone "
                              "to write: merge to a dgss checkpoint (dgss-merge without --backbone-out)")  # fmt: skip
        return copy.deepcopy(self.backbone.model)

    # ----------------------------------------------------------------------------- checkpoints
    def reattachable_keys(self) -> set[str]:
        """State-dict keys that come unchanged from the backbone weights file (dropped from checkpoints)."""
        if not self.backbone.weights:
            return set()
        keys = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if not p.requires_grad}
        keys |= {f"backbone.{n}" for n, _ in self.backbone.model.named_buffers()}
        return keys

    #: the name of the method's own part of its checkpoints (``dgss.checkpoint.section``), None for none: written
    #: by :meth:`save_section`, handed back to :meth:`load_section`
    checkpoint_section: str | None = None

    def save_section(self, checkpoint: dict) -> Any:
        """The method's own state to save beside the state dict (``checkpoint`` as the callbacks left it: a weight
        averaging callback's averages in its ``state_dict``)."""
        raise NotImplementedError

    def load_section(self, checkpoint: dict, payload: Any) -> None:
        """Restore what :meth:`save_section` wrote, before the state dict loads (it may complete it)."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        payload = self.save_section(checkpoint) if self.checkpoint_section else None
        save_model_part(checkpoint, self, attached_trainer(self))
        if self.checkpoint_section:
            put_section(checkpoint, self.checkpoint_section, payload)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if load_model_part(checkpoint, self, resuming=attached_trainer(self) is not None):
            self.strict_loading = False  # the frozen tensors come from the weights file
        if self.checkpoint_section:
            payload = section(checkpoint, self.checkpoint_section)
            if payload is None:
                raise ConfigError(f"the checkpoint has no {self.checkpoint_section} state: it was not written by "
                                  f"method={self.checkpoint_section}")  # fmt: skip
            self.load_section(checkpoint, payload)

    # ---------------------------------------------------------------------------- summary
    def extra_summary(self) -> dict[str, float]:
        """A method's own counts for the summary (e.g. COBOT's extra parameters); none by default."""
        return {}

    def on_fit_start(self) -> None:
        s = parameter_summary(self)
        console.info(describe_summary(type(self).__name__, s, self.extra_summary()))
        for logger in self.loggers:
            logger.log_hyperparams(s)
