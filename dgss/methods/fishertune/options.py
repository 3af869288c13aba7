"""FisherTune's options: ``method.fishertune.schedule``, ``.selection``, ``.fisher``, ``.perturb``, ``.optim``, ``.finalize``
(typed, checked at compose time like every method's), and its Hydra node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dgss.errors import ConfigError
from dgss.methods.base import MethodConfig
from dgss.options import RENAMED, Options, register

GROUPS = ("schedule", "selection", "fisher", "perturb", "optim", "finalize")


# -------------------------------------------------------------------------------------------------- options
# Every value the paper does not state is ours, marked (ours) and explained in docs/methods.md; the 40k-step
# recipe (conf/method/fishertune.yaml) scales the schedule lengths with trainer.max_steps.
@dataclass
class ScheduleOptions(Options):
    """``method.fishertune.schedule``: when and how far the selection grows."""

    warmup_iters: int = 2000  # T1: head-only warm-up, backbone frozen (ours: 5 %)
    delta_min: float = 0.005  # first selected fraction (ours: grows 10x)
    delta_max: float = 0.05  # final fraction: 5 % of a 304M ViT-L = 15.2M elements, the paper's count
    budget: int | None = None  # absolute final count (e.g. 15210000); overrides delta_max
    ratio_base: Literal["all_backbone", "candidates"] = "all_backbone"  # what delta is a fraction of
    growth_tau: int = 2000  # T of ratio(t) = dmax - (dmax - dmin) exp(-(t - T1) / T) (ours)
    growth_end: int = 12000  # ratio snaps to delta_max here; selection fixed after (ours)
    refresh_every: int = 500  # selection refresh interval during growth (ours)
    monotone: bool = (
        True  # false: re-select from scratch; deselected elements return to their pretrained value
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_iters <= self.growth_end or self.refresh_every < 1 or self.growth_tau <= 0:
            raise ConfigError(
                "method.fishertune.schedule needs 0 <= warmup_iters <= growth_end, refresh_every >= 1 and growth_tau > 0; got "
                f"warmup_iters={self.warmup_iters}, growth_end={self.growth_end}, "
                f"refresh_every={self.refresh_every}, growth_tau={self.growth_tau}"
            )


@dataclass
class SelectionOptions(Options):
    """``method.fishertune.selection``: what is ranked, and over which scope."""

    granularity: Literal["element", "row", "tensor"] = "element"
    scope: Literal["global", "per_block", "per_tensor"] = (
        "global"  # one ranking, or budgets in proportion to size
    )
    exclude: list[str] = field(
        default_factory=lambda: ["pos_embed", "cls_token", "reg_token", "mask_token", "patch_embed"]
    )


@dataclass
class FisherOptions(Options):
    """``method.fishertune.fisher``: the Fisher estimates F(x) and F(x') and the DR-FIM score."""

    # the ablations (paper Table 4): DR-FIM | the Fisher alone (no perturbed pass) | uniformly random elements
    # under the same budget and schedule (no statistics): the control every selection must beat
    score: Literal["dr_fim", "fim", "random"] = "dr_fim"
    # the loss whose gradients enter F: the head's training loss (its backward is needed anyway) | the per-pixel
    # cross-entropy of the head's semantic prediction (a log-likelihood, the empirical Fisher's definition)
    loss: Literal["train_loss", "pixel_ce"] = "train_loss"
    # false: the square of the batch's mean gradient (the usual cheap approximation); true: the mean over the batch's
    # images of each image's squared gradient, its loss taken as a batch of one (the empirical Fisher's definition;
    # one more backward per image on a statistic step)
    per_sample: bool = False
    ema_decay: float | None = (
        0.99  # F <- b F + (1 - b) g^2, bias-corrected (ours: ~100-batch memory); null: mean
    )
    interval: int = 1  # statistics every n-th step inside the window
    window: int | None = (
        200  # statistics in the last `window` steps before each refresh; null = every growth step
    )
    # the unit both Fisher estimates are divided by: F(x) at `quantile` over all candidates (the final
    # selection's boundary: robust to the few outliers that set the mean) | the same per tensor | the mean | none
    normalize: Literal["quantile", "per_tensor", "mean", "none"] = "quantile"
    quantile: float = 0.95  # 1 - delta_max of the paper recipe
    gamma: float = 1.0  # KL weight of the variational model
    prior_precision: float = 0.1  # tau^-2 in units of the normaliser: floors the domain ratio's denominator
    eps: float = 1.0e-8  # numerical guard only
    ratio_factor: Literal["mul_gamma", "div_gamma"] = (
        "mul_gamma"  # the two readings of the paper's ratio term
    )
    estimator: Literal["ema"] = "ema"  # closed-form Lambda = F / gamma + tau^-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"method.fishertune.fisher.quantile={self.quantile} must be in (0, 1]")


@dataclass
class PerturbOptions(Options):
    """``method.fishertune.perturb``: the simulated domain shift x' (feature statistics of early blocks re-drawn)."""

    # dsu: re-draw channel mean / std of patch tokens around themselves | paired_render (an oracle for ablations): x′ is
    # the same scenes rendered in other domains by the data (synthetic.paired=[...]), through the same augmentation
    type: Literal["dsu", "paired_render"] = "dsu"
    scale: float = (
        1.0  # s_mu: multiple of the batch std of the channel means (and of the stds unless scale_sigma)
    )
    scale_sigma: float | None = None  # s_sigma for the channel stds; null = scale
    # the std stays >= 0: DSU's linear draw clamped at 0 (the same values wherever it is >= 0) | multiplicative
    sigma: Literal["clamp", "log"] = "clamp"
    after_blocks: list[int] = field(
        default_factory=lambda: [0, 1, 2]
    )  # shallow blocks, where style lives (ours)
    train_aug: bool = False  # also train on the perturbed view on statistic steps
    seed: int = 0  # draws from a generator seeded by (seed, step, rank): identical after a resume


@dataclass
class OptimOptions(Options):
    """``method.fishertune.optim``: how selected backbone elements are stepped."""

    backbone_lr_mult: float = (
        0.1  # selected elements at 0.1 x the head's lr, like full fine-tuning in Rein's recipe
    )
    backbone_wd: float = 0.0  # decoupled decay on selected elements only (AdamW would decay every element)
    prior_l2: float = 0.0  # optional pull of selected elements towards their pretrained values


@dataclass
class FinalizeOptions(Options):
    """``method.fishertune.finalize``: after the last refresh."""

    drop_fisher: bool = True  # free the statistics
    prune_frozen_tensors: bool = True  # no gradients for tensors without a selected element


@dataclass
class FisherTuneOptions(Options):
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    fisher: FisherOptions = field(default_factory=FisherOptions)
    perturb: PerturbOptions = field(default_factory=PerturbOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    finalize: FinalizeOptions = field(default_factory=FinalizeOptions)


@dataclass
class FisherTuneConfig(MethodConfig):
    """The Hydra node: the base's options plus FisherTune's under ``method.fishertune``, as every method's."""

    _target_: str = "dgss.methods.fishertune.FisherTune"
    fishertune: FisherTuneOptions = field(default_factory=FisherTuneOptions)


register(FisherTuneConfig, "method", "fishertune_schema")
RENAMED.update(
    {f"method.{g}": f"method.fishertune.{g}" for g in GROUPS}
)  # before issue 29 they were method.<group>
