"""FisherTune (CVPR'25): fine-tune only the backbone elements that the domain-related Fisher information ranks
highest, growing the selection from δ_min to δ_max; the head trains throughout.

Paper: Zhao et al., *FisherTune: Fisher-Guided Robust Tuning of Vision Foundation Models for Domain Generalized
Segmentation*, CVPR 2025, https://arxiv.org/abs/2503.17940 . No official code has been published; every value the
paper does not state is ours, marked (ours) in :mod:`~dgss.methods.fishertune.options` and explained in
docs/methods.md.

Phases, in optimizer steps t (T1 = ``warmup_iters``; :class:`~dgss.methods.fishertune.schedule.Schedule`):

1. warm-up, t < T1: backbone frozen, head only, no statistics.
2. growth, T1 ≤ t ≤ ``growth_end``: selected fraction ratio(t) = δ_max − (δ_max − δ_min)·exp(−(t − T1)/τ), snapping to
   δ_max at ``growth_end``; refreshes at T1, T1 + R, … and ``growth_end``. In the ``window`` steps before each refresh
   a step makes a perturbed pass (a simulated domain shift x′) and the clean pass, and keeps EMAs of the squared
   backbone gradients F̂(x′) and F̂(x) (:mod:`~dgss.methods.fishertune.statistics`). At a refresh the not yet selected
   elements with the highest score (:mod:`~dgss.methods.fishertune.score`: DR-FIM, the Fisher alone, random) join
   the selection (monotone growth; :mod:`~dgss.methods.fishertune.selection`).
3. tuning, t > ``growth_end``: selection fixed, clean pass only; statistics freed, unselected tensors frozen.

Only selected elements move: :class:`SelectedAdamW` holds state (and applies decay) for them alone, so every other
backbone element stays bit-identical to the pretrained weights. The step is the base's (Lightning's automatic
optimisation, one :class:`ChainedOptimizer` over the head's optimizer and SelectedAdamW); FisherTune's passes are its
:class:`~dgss.methods.fishertune.step.FisherStep`, the base's one extension point of the step. Checkpoints store the
selected elements as a sparse delta (indices and values) over the backbone's weights file plus the head, in the
``fishertune`` section.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dgss import console
from dgss.checkpoint import apply_sparse_delta, sparse_delta
from dgss.errors import ConfigError
from dgss.methods.base import SegmentationMethod
from dgss.methods.chained_optimizer import ChainedOptimizer
from dgss.methods.fishertune.options import FisherTuneOptions
from dgss.methods.fishertune.report import FisherTuneReport
from dgss.methods.fishertune.schedule import Schedule
from dgss.methods.fishertune.score import SCORES
from dgss.methods.fishertune.selection import breakdown, check_ranks_agree, grow_selection, scope_groups
from dgss.methods.fishertune.statistics import FisherStatistics
from dgss.methods.fishertune.step import FisherStep, fisher_loss
from dgss.methods.selected_adamw import SelectedAdamW
from dgss.models.style_perturb import ChannelStatPerturbation


class FisherTune(SegmentationMethod):
    """Selective fine-tuning of backbone elements ranked by DR-FIM; head trained throughout.

    Options under ``method.fishertune`` (see ``conf/method/fishertune.yaml`` and docs/methods.md): ``schedule``,
    ``selection``, ``fisher``, ``perturb``, ``optim``, ``finalize``: :class:`FisherTuneOptions` (every key not given
    takes its default).
    """

    def __init__(self, *args, fishertune: FisherTuneOptions | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = FisherTuneOptions.of(fishertune, "method.fishertune")

    # ------------------------------------------------------------------------------------ set-up
    def configure_tuning(self) -> None:
        self.freeze(self.backbone)  # eval mode throughout: the unselected majority stays the pretrained model
        exclude = tuple(self.options.selection.exclude)
        named = dict(self.backbone.model.named_parameters())
        self.candidates = {n: p for n, p in named.items() if not any(e in n for e in exclude)}
        if not self.candidates:
            raise ConfigError(
                f"method.fishertune.selection.exclude={list(exclude)} leaves no backbone parameter to select"
            )
        s = self.options.schedule
        n_cand = sum(p.numel() for p in self.candidates.values())
        self.n_base = n_cand if s.ratio_base == "candidates" else sum(p.numel() for p in named.values())
        self.delta_max = s.budget / self.n_base if s.budget else float(s.delta_max)
        k_final = round(self.delta_max * self.n_base)
        if k_final > n_cand or not 0 <= s.delta_min <= self.delta_max:
            raise ConfigError(
                f"method.fishertune.schedule: a final selection of {k_final:,} elements (budget / delta_max) with delta_min="
                f"{s.delta_min} does not fit the {n_cand:,} candidate elements; lower budget or delta_max"
            )
        p = self.options.perturb
        bad = [b for b in p.after_blocks if not 0 <= b < self.backbone.num_blocks]
        if bad:
            raise ConfigError(
                f"method.fishertune.perturb.after_blocks has {bad} outside the backbone's {self.backbone.num_blocks} blocks"
            )
        self.perturb_seed = int(p.seed)
        self.perturbation = ChannelStatPerturbation(p.after_blocks, p.scale, self.backbone.num_prefix_tokens,
                                                    scale_sigma=p.scale_sigma, sigma=p.sigma)  # fmt: skip
        # the identity outside the perturbed pass: the trained model is the timm model (dgss-merge --backbone-out)
        self.backbone.register_block_hook(self.perturbation, part_of_model=False)
        o = self.options.optim
        self.selected_opt = SelectedAdamW(
            self.candidates, weight_decay=o.backbone_wd, prior_l2=o.prior_l2, **self._adam_kwargs()
        )
        self.score = SCORES[self.options.fisher.score](self.options.fisher, self.perturb_seed)
        self.schedule = Schedule(s, self.options.fisher, self.score.statistics, self.n_base, self.delta_max)
        self.stats = FisherStatistics(self.candidates, self.options.fisher.ema_decay)
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []  # one row per refresh: step, ratio, target, selected
        self.growing = False  # candidates require grad (from the first statistic step, after any DDP wrap)
        self.warned_batch_of_one = False
        self.final = False  # the selection is fixed (after growth_end)

    def _adam_kwargs(self) -> dict:
        f = self.optimizer_factory
        kw = getattr(f, "keywords", {}) or {}
        return {k: kw[k] for k in ("betas", "eps") if k in kw}

    def param_groups(self) -> list[dict]:
        """The head's groups (backbone elements are :class:`SelectedAdamW`'s, a second optimizer)."""
        groups = []
        for g in super().param_groups():
            keep = [i for i, n in enumerate(g["names"]) if not n.startswith("backbone.")]
            if keep:
                groups.append({**g, **{k: [g[k][i] for i in keep] for k in ("params", "names", "rules")}})
        return groups

    def build_optimizer(self) -> torch.optim.Optimizer:
        """One optimizer for Lightning's automatic step: the head's (``method.optimizer``) chained with
        :class:`SelectedAdamW` for the selected backbone elements at ``optim.backbone_lr_mult`` x the head's lr; the
        base's schedule drives both, Lightning saves and restores both."""
        head = super().build_optimizer()
        for g in self.selected_opt.param_groups:
            g["lr"] = head.defaults["lr"] * self.options.optim.backbone_lr_mult
        g = self.selected_opt.param_groups[0]
        console.info(f"  lr {g['lr']:.3g}, weight decay {g['weight_decay']:.3g}: the selected backbone elements "
                     f"(SelectedAdamW, up to {self.schedule.k_target(self.options.schedule.growth_end):,})")  # fmt: skip
        return ChainedOptimizer(head, self.selected_opt)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        prec = str(self.trainer.precision)
        if prec.startswith("16"):
            raise ConfigError(
                f"trainer.precision={prec} is not supported by FisherTune (its Fisher statistics are read before "
                "the fp16 grad scaler decides whether a step overflowed); use bf16-mixed or 32-true"
            )
        if self.trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                "FisherTune takes its Fisher statistics per optimizer step: set trainer.accumulate_grad_batches=1"
            )
        s = self.options.schedule
        if self.trainer.max_steps > 0 and s.growth_end > self.trainer.max_steps:
            rank_zero_warn(
                f"method.fishertune.schedule.growth_end={s.growth_end} is past trainer.max_steps={self.trainer.max_steps}: "
                f"the selection will not reach delta_max"
            )
        console.info(
            f"FisherTune: {len(self.candidates)} candidate tensors "
            f"({sum(p.numel() for p in self.candidates.values()):,} elements); final selection "
            f"{self.schedule.k_target(s.growth_end):,} of {self.n_base:,} backbone elements"
        )

    # -------------------------------------------------------------------------------------- step
    def fisher_forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[object, dict, torch.Tensor]:
        """One forward of a step's passes: the head's output, its training losses by name, and the Fisher loss (their
        sum under ``fisher.loss: train_loss``, else :func:`~dgss.methods.fishertune.step.fisher_loss`)."""
        output = self(images)
        losses = self.head.loss(output, labels)
        train = self.options.fisher.loss == "train_loss"
        return output, losses, sum(losses.values()) if train else fisher_loss(self.head, output, labels)

    def training_pass(self, batch: dict) -> FisherStep:
        """This step's passes: from the first statistic step on the candidates train; a statistic step gathers F(x)
        (and, for a score that perturbs, F(x′))."""
        t = self.global_step
        if t >= self.schedule.stats_start() and not self.growing:
            self.start_growth()
        stats = self.growing and not self.final and self.schedule.is_stat_step(t)
        perturb = stats and self.score.perturbs
        paired = None
        if perturb and self.options.perturb.type == "paired_render":
            if "paired_image" not in batch:
                raise ConfigError("method.fishertune.perturb.type=paired_render needs training data that renders each scene "
                                  "again in other domains (data=synthetic with synthetic.paired=[photo, fog, ...])")  # fmt: skip
            paired = self.prepare_batch({"image": batch["paired_image"], "label": batch["label"]})[0]
        n = self.selected_opt.num_selected()
        self.log_dict({"fishertune/selected": float(n), "fishertune/selected_fraction": n / self.n_base,
                       "fishertune/stat_step": float(stats)}, batch_size=len(batch["image"]))  # fmt: skip
        return FisherStep(self, t, stats, perturb, perturb and self.options.perturb.train_aug, paired)

    def start_growth(self) -> None:
        """Candidates train from here; state restored from a checkpoint moves to the parameters' device."""
        for name, p in self.candidates.items():
            p.requires_grad_(True)
            self.masks[name] = (
                self.masks[name].to(p.device) if name in self.masks else torch.zeros_like(p, dtype=torch.bool)
            )
        self.stats.to(self.device)
        self.growing = True  # SelectedAdamW's state: torch's loader already put it on the parameters' device
        if self.final:
            self.prune()

    # -------------------------------------------------------------------------------- selection
    @torch.no_grad()
    def scores(self, t: int | None = None) -> dict[str, torch.Tensor]:
        """Per candidate element, the score of ``fisher.score`` at step ``t``."""
        return self.score(self.stats, int(t or 0))

    def select(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """New elements (flat indices per tensor) that bring the selection to ``k``: :func:`grow_selection` over
        this method's scope groups, granularity and current masks."""
        o = self.options
        return grow_selection(
            scores,
            self.masks,
            scope_groups(list(self.candidates), o.selection.scope),
            k,
            o.selection.granularity,
            o.schedule.monotone,
        )

    @torch.no_grad()
    def refresh(self, t: int) -> None:
        k = self.schedule.k_target(t)
        chosen = self.select(self.scores(t), k)
        monotone = self.options.schedule.monotone
        for name, idx in chosen.items():
            mask = self.masks[name]
            if not monotone:
                new = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
                new[idx] = True
                self.selected_opt.retain(name, new[self.selected_opt.index(name)])
                idx = idx[~mask.view(-1)[idx]]
                mask.view(-1).copy_(new)
            else:
                mask.view(-1)[idx] = True
            self.selected_opt.add(name, idx)
        check_ranks_agree(
            [self.selected_opt.index(n) for n in self.candidates], self.trainer.world_size, self.device
        )
        selected = self.selected_opt.num_selected()
        self.history.append(
            {"step": t, "target": k, "selected": selected, "fraction": selected / self.n_base}
        )

    def breakdown(self) -> list[dict]:
        """Selected elements per block and module kind (:func:`~dgss.methods.fishertune.selection.breakdown`)."""
        return breakdown(self.masks)

    def finalize(self) -> None:
        """After the last refresh: free the statistics and stop computing gradients of unselected tensors."""
        self.final = True
        if self.options.finalize.drop_fisher:
            self.stats.fisher = {}
        self.prune()

    def prune(self) -> None:
        if not self.options.finalize.prune_frozen_tensors:
            return
        for name, p in self.candidates.items():
            if not bool(self.masks[name].any()):
                p.requires_grad_(False)

    def configure_callbacks(self):
        """The selection's reporting (CSV, logger metrics, wandb tables, the final mask file) is a callback."""
        return [FisherTuneReport()]

    # ------------------------------------------------------------------------------ checkpoints
    def reattachable_keys(self) -> set[str]:
        """With a weights file the whole backbone is re-attached; selected elements travel as a sparse delta."""
        keys = super().reattachable_keys()  # frozen tensors and buffers (empty without a weights file)
        return keys | {f"backbone.{n}" for n, _ in self.backbone.named_parameters()} if keys else keys

    checkpoint_section = "fishertune"

    def save_section(self, checkpoint: dict) -> dict:
        # the values of the state dict being saved (a weight-averaging callback put its averages there)
        state = checkpoint["state_dict"]
        values = {n: state.get(f"backbone.model.{n}", p) for n, p in self.candidates.items()}
        index = {n: self.selected_opt.index(n) for n in self.candidates if self.selected_opt.index(n).numel()}
        return {  # SelectedAdamW's moments travel in optimizer_states, as any optimizer's
            "delta": sparse_delta(values, index),
            **self.stats.state(),
            "history": list(self.history),
            "final": self.final,
        }

    def load_section(self, checkpoint: dict, ft: dict) -> None:
        apply_sparse_delta(checkpoint["state_dict"], ft["delta"], self.candidates, "backbone.model.")
        self.masks = {}
        for (
            name,
            p,
        ) in self.candidates.items():  # the selection is the delta's index (the optimizer loads later)
            m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            if name in ft["delta"]:
                m[ft["delta"][name]["index"].to(p.device)] = True
            self.masks[name] = m.view_as(p)
        self.stats.load(ft)
        self.history = list(ft["history"])
        self.final = bool(ft["final"])
        self.growing = False  # requires_grad is set again at the next training step (after DDP wraps)
