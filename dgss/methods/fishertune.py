"""FisherTune (CVPR'25): fine-tune only the backbone elements that the domain-related Fisher information ranks
highest, growing the selection from δ_min to δ_max; the head trains throughout. Spec: specs/fishertune.md.

Phases, in optimizer steps t (T1 = ``warmup_iters``):

1. warm-up, t < T1: backbone frozen, head only, no statistics.
2. growth, T1 ≤ t ≤ ``growth_end``: selected fraction ratio(t) = δ_max − (δ_max − δ_min)·exp(−(t − T1)/τ), snapping to
   δ_max at ``growth_end``; refreshes at T1, T1 + R, … and ``growth_end``. In the ``window`` steps before each refresh
   a step makes a perturbed pass (feature statistics of early blocks re-drawn, a simulated domain shift x′) and the
   clean pass, and keeps EMAs of the squared backbone gradients F̂(x′) and F̂(x). At a refresh the not yet
   selected elements with the highest DR-FIM join the selection (monotone growth).
3. tuning, t > ``growth_end``: selection fixed, clean pass only; statistics freed, unselected tensors frozen.

DR-FIM with the variational stabilisation (spec §1, §3.3): with Λ = F̂/γ + τ⁻² (Gaussian posterior, prior N(θ_pt, τ²)),
DRF = γ(Λ_x − τ⁻²) + exp(−(ε_μ+ε_σ)) · γ · |Λ_x − Λ_x′| / (min(Λ_x, Λ_x′) + ε): the task term is F̂(x) and the prior
precision τ⁻² floors the ratio's denominator. F̂ is normalised by its mean over the candidates first.

Only selected elements move: :class:`SelectedAdamW` holds state (and applies decay) for them alone, so every other
backbone element stays bit-identical to the pretrained weights. The step is the base's (Lightning's automatic
optimisation, one :class:`ChainedOptimizer` over the head's optimizer and SelectedAdamW); FisherTune adds the passes
before the backward (:meth:`FisherTune.training_losses`) and the statistics, refresh and masking after it
(:meth:`FisherTune.on_before_optimizer_step`). Checkpoints store the selected elements as a sparse delta (indices and
values) over the backbone's weights file plus the head.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from dgss import console
from dgss.checkpoint import apply_sparse_delta, sparse_delta
from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError
from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.methods.chained_optimizer import ChainedOptimizer
from dgss.methods.selected_adamw import SelectedAdamW
from dgss.models.heads.protocol import QueryHead
from dgss.models.style_perturb import ChannelStatPerturbation, channel_stats, shift_in_draw_units
from dgss.options import Options, register

GROUPS = ("schedule", "selection", "fisher", "perturb", "optim", "finalize")
KINDS = ("q", "k", "v", "proj", "fc1", "fc2", "norm", "other")


# -------------------------------------------------------------------------------------------------- options
# Every value the paper does not state is ours, marked (ours) and explained in docs/methods.md; the 40k-step
# recipe (conf/method/fishertune.yaml) scales the schedule lengths with trainer.max_steps.
@dataclass
class ScheduleOptions(Options):
    """``method.schedule``: when and how far the selection grows."""

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


@dataclass
class SelectionOptions(Options):
    """``method.selection``: what is ranked, and over which scope."""

    granularity: Literal["element", "row", "tensor"] = "element"
    scope: Literal["global", "per_block", "per_tensor"] = (
        "global"  # one ranking, or budgets in proportion to size
    )
    exclude: list[str] = field(
        default_factory=lambda: ["pos_embed", "cls_token", "reg_token", "mask_token", "patch_embed"]
    )


@dataclass
class FisherOptions(Options):
    """``method.fisher``: the Fisher estimates F(x) and F(x') and the DR-FIM score."""

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


@dataclass
class PerturbOptions(Options):
    """``method.perturb``: the simulated domain shift x' (feature statistics of early blocks re-drawn)."""

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
    """``method.optim``: how selected backbone elements are stepped."""

    backbone_lr_mult: float = (
        0.1  # selected elements at 0.1 x the head's lr, like full fine-tuning in Rein's recipe
    )
    backbone_wd: float = 0.0  # decoupled decay on selected elements only (AdamW would decay every element)
    prior_l2: float = 0.0  # optional pull of selected elements towards their pretrained values


@dataclass
class FinalizeOptions(Options):
    """``method.finalize``: after the last refresh."""

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
class FisherTuneConfig(MethodConfig, FisherTuneOptions):
    """The Hydra node: the base's options plus FisherTune's groups (one list of groups, in FisherTuneOptions)."""

    _target_: str = "dgss.methods.fishertune.FisherTune"


# ------------------------------------------------------------------------------------------ pure functions
def random_score_seed(seed: int, t: int) -> int:
    """The ``random`` score's generator seed at refresh step ``t``: integers only (numpy's ``SeedSequence``), so every
    process, rank and resumed run draws the same selection — Python's ``hash`` of a string is salted per process.

    >>> random_score_seed(0, 200) == random_score_seed(0, 200) != random_score_seed(0, 400)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(t), 0x52414E44]).generate_state(1)[0]) & 0x7FFFFFFF


def growth_ratio(
    t: int, warmup: int, delta_min: float, delta_max: float, tau: float, growth_end: int
) -> float:
    """Scheduled selected fraction at step t (0 before the growth phase, δ_max from ``growth_end`` on)."""
    if t < warmup:
        return 0.0
    if t >= growth_end:
        return delta_max
    return delta_max - (delta_max - delta_min) * math.exp(-(t - warmup) / tau)


def dr_fim(
    fx: torch.Tensor,
    fp: torch.Tensor,
    eps_bar: float,
    gamma: float = 1.0,
    prior_precision: float = 1.0,
    eps: float = 1e-8,
    ratio_factor: str = "mul_gamma",
) -> torch.Tensor:
    """Domain-related Fisher score from (normalised) Fisher estimates on x and on the shifted x′.

    ``eps_bar`` = ε_μ + ε_σ. With Λ = F/γ + τ⁻², the score is γ(Λ_x − τ⁻²) + exp(−ε̄)·c·|Λ_x − Λ_x′| / (min(Λ_x, Λ_x′) + ε)
    with c = γ (``mul_gamma``) or 1/γ (``div_gamma``).
    """
    lam_x = fx / gamma + prior_precision
    lam_p = fp / gamma + prior_precision
    task = fx  # = γ(Λ_x − τ⁻²), without the rounding of the round trip
    c = gamma if ratio_factor == "mul_gamma" else 1.0 / gamma
    domain = math.exp(-eps_bar) * c * (lam_x - lam_p).abs() / (torch.minimum(lam_x, lam_p) + eps)
    return task + domain


def fisher_scale(stats: dict[str, torch.Tensor], how: str, q: float = 0.95, max_samples: int = 1 << 24,
                 ) -> dict[str, float]:  # fmt: skip
    """The unit each tensor's Fisher values are divided by (``fisher.normalize``).

    ``quantile``: F at quantile ``q`` over all candidate elements (a strided sample of at most ``max_samples``
    elements, the same on every rank), so F / n ≈ 1 at the final selection's boundary whatever a few outliers do;
    ``per_tensor``: the same within each tensor; ``mean``: the mean over all elements; ``none``: 1. A unit of 0
    (most elements without any gradient) falls back to the mean of the non-zero values, then to 1."""
    names = list(stats)
    if how == "none" or not names:
        return dict.fromkeys(names, 1.0)
    tiny = torch.finfo(torch.float32).tiny

    def robust(values: torch.Tensor) -> float:
        n = values.numel()
        k = min(max(int(math.ceil(q * n)), 1), n)
        v = float(values.float().kthvalue(k).values)
        if v <= 0:
            nz = values[values > 0]
            v = float(nz.double().mean()) if nz.numel() else 1.0
        return max(v, tiny)

    if how == "mean":
        total = sum(float(v.double().sum()) for v in stats.values())
        return dict.fromkeys(names, max(total / sum(v.numel() for v in stats.values()), tiny))
    if how == "per_tensor":
        return {n: robust(_strided(v, max_samples, v.numel())) for n, v in stats.items()}
    total = sum(v.numel() for v in stats.values())
    return dict.fromkeys(names, robust(torch.cat([_strided(v, max_samples, total) for v in stats.values()])))


def _strided(v: torch.Tensor, max_samples: int, total: int) -> torch.Tensor:
    """Every ``ceil(total / max_samples)``-th element of ``v`` (float32, on the CPU): a sample the same on every rank."""
    return v.reshape(-1)[:: max(1, math.ceil(total / max_samples))].float().cpu()


def selection_digest(indices: list[torch.Tensor]) -> torch.Tensor:
    """An exact int64 fingerprint of a selection (flat indices per tensor, in a fixed tensor order): the count,
    Σ_t (t + 1)·Σ idx and Σ idx² mod (2³¹ − 1). Ranks compare it to prove they selected the same elements."""
    out = torch.zeros(3, dtype=torch.int64)
    for t, idx in enumerate(indices):
        i = idx.detach().to(torch.int64).cpu()
        out[0] += i.numel()
        out[1] += (t + 1) * int(i.sum())
        out[2] = (out[2] + int(((i * i) % 2147483647).sum())) % 2147483647
    return out


@torch.no_grad()
def accumulate_squares(store: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], beta: float | None,
                       scale: float = 1.0, squared: bool = False) -> None:  # fmt: skip
    """One Fisher statistic update, in place: F ← βF + (1−β)(s·g)² per tensor (the EMA, not yet bias-corrected:
    divide by 1 − βⁿ after n updates), or with ``beta=None`` the running sum of (s·g)² (divide by n for the mean).
    ``squared``: ``grads`` already holds squares (per-sample statistics, mean_i g_i²), entered as s²·value."""
    for name, g in grads.items():
        sq = g.float() * scale**2 if squared else (g.float() * scale) ** 2
        if name not in store:
            store[name] = sq if beta is None else sq.mul_(1 - beta)
        elif beta is None:
            store[name].add_(sq)
        else:
            store[name].mul_(beta).add_(sq, alpha=1 - beta)


def batch_slice(output, i: int):
    """Image ``i`` of a head's output as a batch of one: every tensor in it (nested in dicts, lists, tuples) sliced
    ``[i : i + 1]`` along its first (batch) axis.

    >>> out = batch_slice({"cls": [torch.zeros(3, 2), torch.ones(3, 2)], "masks": torch.arange(3)}, 1)
    >>> out["cls"][1].shape, out["masks"].tolist()
    (torch.Size([1, 2]), [1])
    """
    if isinstance(output, torch.Tensor):
        return output[i : i + 1]
    if isinstance(output, dict):
        return {k: batch_slice(v, i) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(batch_slice(v, i) for v in output)
    return output


def top_k_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest finite scores; ties broken by the lower index (identical on all ranks)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    k = min(k, int(torch.isfinite(scores).sum()))
    if k <= 0:
        return out
    thr = torch.topk(scores, k, sorted=False).values.min()
    out = scores > thr
    need = k - int(out.sum())
    out[(scores == thr).nonzero().squeeze(1)[:need]] = True
    return out


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder; sums to ``total``)."""
    n = sum(sizes)
    raw = [total * s / n for s in sizes]
    out = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


@torch.no_grad()
def grow_selection(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], groups: list[list[str]], k: int,
                   granularity: str = "element", monotone: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The elements (flat indices per tensor) that bring the selection to ``k``: per scope group a budget in
    proportion to its size (:func:`apportion`), filled with the highest scores, ``granularity`` units (element, row,
    tensor) at a time. ``monotone``: already selected elements (``masks``) stay and count towards the budget, only
    new ones are returned; otherwise the fresh top-k. Consumes ``scores`` (edited in place and released tensor by
    tensor, to keep the peak memory low). Ties go to the lower index, so every rank picks the same."""
    targets = apportion(k, [sum(masks[n].numel() for n in g) for g in groups])
    chosen: dict[str, torch.Tensor] = {}
    for names, target in zip(groups, targets):
        have = sum(int(masks[n].sum()) for n in names) if monotone else 0
        units, shapes = [], []
        for n in names:
            sc = scores.pop(n).float()
            if monotone:
                sc.masked_fill_(masks[n], -math.inf)
            if granularity == "element" or (granularity == "row" and sc.ndim < 2):
                u, size = sc.reshape(-1), 1
            elif granularity == "row":
                u, size = sc.reshape(sc.shape[0], -1).mean(1), sc[0].numel()
            else:
                u, size = sc.reshape(1, -1).mean(1), sc.numel()
            units.append(u)
            shapes.append((n, u.numel(), size))
        u = torch.cat(units)
        del units
        need = max(target - have, 0)
        if all(size == 1 for _, _, size in shapes):
            pick = top_k_first(u, need)
        else:  # coarse units: best first (stable order) while the budget lasts
            sz = torch.cat([torch.full((count,), size, dtype=torch.long) for _, count, size in shapes])
            order = torch.sort(u, descending=True, stable=True).indices
            order = order[torch.isfinite(u[order])]
            order = order[torch.cumsum(sz.to(order.device)[order], 0) <= need]
            pick = torch.zeros_like(u, dtype=torch.bool)
            pick[order] = True
        del u
        offset = 0
        for n, count, size in shapes:
            sel = pick[offset : offset + count]
            offset += count
            if size > 1:
                sel = sel.repeat_interleave(size) if count > 1 else sel.expand(size)
            chosen[n] = sel.reshape(-1).nonzero().squeeze(1)
    return chosen


def block_of(name: str) -> int:
    """Block index in a parameter name (``blocks.7.…``), -1 outside the blocks."""
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def kind_counts(name: str, mask: torch.Tensor) -> dict[str, int]:
    """Selected elements of one tensor per module kind; a fused qkv splits into thirds along its output rows."""
    if ".qkv." in name:
        parts = mask.reshape(3, -1).sum(1).tolist()
        return dict(zip(("q", "k", "v"), (int(x) for x in parts)))
    leaf = name.split(".")[-2:]
    joined = ".".join(leaf)
    for kind, pats in (
        ("q", ("q_proj", "q_bias")),
        ("k", ("k_proj", "k_bias")),
        ("v", ("v_proj", "v_bias")),
        ("fc1", ("fc1", "lin1", "w1", "w12")),
        ("fc2", ("fc2", "lin2", "w3")),
        ("norm", ("norm",)),
    ):
        if any(p in joined for p in pats):
            return {kind: int(mask.sum())}
    if ".attn.proj." in name:
        return {"proj": int(mask.sum())}
    return {"other": int(mask.sum())}


# ------------------------------------------------------------------------------------------------- method
@dataclass
class StepStatistics:
    """What one training step gathers between its forward passes and its optimizer step."""

    t: int  # the step
    stats: bool  # a statistic step: its gradients enter F(x) (and F(x′))
    perturb: bool  # with a perturbed pass (fisher.score: dr_fim)
    aug: bool  # perturb.train_aug: the perturbed view trains too
    perturbed: dict = field(default_factory=dict)  # parameter -> gradient of the Fisher loss on x′
    train_p: dict = field(default_factory=dict)  # train_aug: parameter -> gradient of the training loss on x′
    fisher_x: dict = field(
        default_factory=dict
    )  # pixel_ce / per_sample: name -> gradient of the Fisher loss on x
    squared: bool = False  # fisher.per_sample: fisher_x and perturbed hold mean_i g_i², not a batch gradient
    mag: torch.Tensor | None = None  # the perturbation's (ε_μ, ε_σ)
    paired: torch.Tensor | None = None  # perturb.type=paired_render: x′, the batch's scenes in another domain


class FisherTune(SegmentationMethod):
    """Selective fine-tuning of backbone elements ranked by DR-FIM; head trained throughout.

    Option groups (see ``conf/method/fishertune.yaml`` and docs/methods.md): ``schedule``, ``selection``,
    ``fisher``, ``perturb``, ``optim``, ``finalize``: :class:`FisherTuneOptions` (every key not given takes its default).
    """

    def __init__(self, *args, **kwargs):
        groups = {g: kwargs.pop(g, None) for g in GROUPS}
        super().__init__(*args, **kwargs)
        self.options = FisherTuneOptions.of(groups, "method")

    # ------------------------------------------------------------------------------------ set-up
    def configure_tuning(self) -> None:
        self.freeze(self.backbone)  # eval mode throughout: the unselected majority stays the pretrained model
        exclude = tuple(self.options.selection.exclude)
        named = dict(self.backbone.model.named_parameters())
        self.candidates = {n: p for n, p in named.items() if not any(e in n for e in exclude)}
        if not self.candidates:
            raise ConfigError(
                f"method.selection.exclude={list(exclude)} leaves no backbone parameter to select"
            )
        s = self.options.schedule
        n_cand = sum(p.numel() for p in self.candidates.values())
        self.n_base = n_cand if s.ratio_base == "candidates" else sum(p.numel() for p in named.values())
        self.delta_max = s.budget / self.n_base if s.budget else float(s.delta_max)
        k_final = round(self.delta_max * self.n_base)
        if k_final > n_cand or not 0 <= s.delta_min <= self.delta_max:
            raise ConfigError(
                f"method.schedule: a final selection of {k_final:,} elements (budget / delta_max) with delta_min="
                f"{s.delta_min} does not fit the {n_cand:,} candidate elements; lower budget or delta_max"
            )
        if not 0 <= s.warmup_iters <= s.growth_end or s.refresh_every < 1 or s.growth_tau <= 0:
            raise ConfigError(
                "method.schedule needs 0 <= warmup_iters <= growth_end, refresh_every >= 1 and growth_tau > 0; got "
                f"warmup_iters={s.warmup_iters}, growth_end={s.growth_end}, "
                f"refresh_every={s.refresh_every}, growth_tau={s.growth_tau}"
            )
        p = self.options.perturb
        bad = [b for b in p.after_blocks if not 0 <= b < self.backbone.num_blocks]
        if bad:
            raise ConfigError(
                f"method.perturb.after_blocks has {bad} outside the backbone's {self.backbone.num_blocks} blocks"
            )
        self.perturb_seed = int(p.seed)
        self.perturbation = ChannelStatPerturbation(p.after_blocks, p.scale, self.backbone.num_prefix_tokens,
                                                    scale_sigma=p.scale_sigma, sigma=p.sigma)  # fmt: skip
        if not 0 < self.options.fisher.quantile <= 1:
            raise ConfigError(f"method.fisher.quantile={self.options.fisher.quantile} must be in (0, 1]")
        # the identity outside the perturbed pass: the trained model is the timm model (dgss-merge --backbone-out)
        self.backbone.register_block_hook(self.perturbation, part_of_model=False)
        o = self.options.optim
        self.selected_opt = SelectedAdamW(
            self.candidates, weight_decay=o.backbone_wd, prior_l2=o.prior_l2, **self._adam_kwargs()
        )
        self.masks: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}  # "x" / "p" -> name -> EMA of squared gradients
        self.stat_counts = {"x": 0, "p": 0, "eps": 0}
        self.eps_ema = torch.zeros(2)
        self.history: list[dict] = []  # one row per refresh: step, ratio, target, selected
        self._growing = False  # candidates require grad (applied in training_step, after any DDP wrap)
        self._warned_batch_of_one = False
        self._pending: StepStatistics | None = None  # what this step gathered before its backward
        self._final = False

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
                     f"(SelectedAdamW, up to {self.k_target(self.options.schedule.growth_end):,})")  # fmt: skip
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
                f"method.schedule.growth_end={s.growth_end} is past trainer.max_steps={self.trainer.max_steps}: "
                f"the selection will not reach delta_max"
            )
        console.info(
            f"FisherTune: {len(self.candidates)} candidate tensors "
            f"({sum(p.numel() for p in self.candidates.values()):,} elements); final selection "
            f"{self.k_target(s.growth_end):,} of {self.n_base:,} backbone elements"
        )

    # ---------------------------------------------------------------------------------- schedule
    def k_target(self, t: int) -> int:
        s = self.options.schedule
        r = growth_ratio(t, s.warmup_iters, s.delta_min, self.delta_max, s.growth_tau, s.growth_end)
        return round(r * self.n_base)

    def stats_start(self) -> int:
        """The first statistic step: the warm-up's last ``window`` steps (``refresh_every`` with ``window: null``)
        gather F(x) and F(x′) for the first selection, like the window before every later refresh. The backbone
        takes gradients from here but no element moves before T1 (nothing is selected yet)."""
        s, f = self.options.schedule, self.options.fisher
        if f.score == "random":
            return s.warmup_iters
        return max(s.warmup_iters - (f.window if f.window is not None else s.refresh_every) + 1, 0)

    def next_refresh(self, t: int) -> int | None:
        s = self.options.schedule
        t1, end, every = s.warmup_iters, s.growth_end, s.refresh_every
        if t > end:
            return None
        if t < t1:
            return t1 if t >= self.stats_start() else None
        return min(t1 + math.ceil((t - t1) / every) * every, end)

    def is_refresh(self, t: int) -> bool:
        return self.next_refresh(t) == t

    def is_stat_step(self, t: int) -> bool:
        r = self.next_refresh(t)
        f = self.options.fisher
        if r is None or f.score == "random":
            return False
        return (f.window is None or r - t < f.window) and (r - t) % f.interval == 0

    # ------------------------------------------------------------------------------------ steps
    def _forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[object, dict[str, torch.Tensor], torch.Tensor]:
        """One forward: the head's output, its training losses by name, and the Fisher loss (their sum under
        ``fisher.loss: train_loss``, else :meth:`_fisher_loss` of the same output)."""
        output = self(images)
        losses = self.head.loss(output, labels)
        if self.options.fisher.loss == "train_loss":
            return output, losses, sum(losses.values())
        return output, losses, self._fisher_loss(output, labels)

    def _per_sample_squares(self, output, labels: torch.Tensor, params: list[torch.Tensor]) -> dict:
        """``fisher.per_sample``: (1/B) Σ_i g_i² per parameter, g_i the gradient of image i's Fisher loss taken as a
        batch of one (its output sliced from the batch's; the graph is kept for the batch's own backward). Random
        draws (the head's point samples) come from a forked stream: the training stream is the same as without."""
        b = labels.shape[0]
        out: dict[torch.Tensor, torch.Tensor] = {}
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            for i in range(b):
                one = batch_slice(output, i)
                lab = labels[i : i + 1]
                loss = (
                    sum(self.head.loss(one, lab).values())
                    if self.options.fisher.loss == "train_loss"
                    else self._fisher_loss(one, lab)
                )
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        sq = g.detach().float().square_().div_(b)
                        out[p] = sq if p not in out else out[p].add_(sq)
        return out

    def _start_growth(self) -> None:
        """Candidates train from here; state restored from a checkpoint moves to the parameters' device."""
        for name, p in self.candidates.items():
            p.requires_grad_(True)
            self.masks[name] = (
                self.masks[name].to(p.device) if name in self.masks else torch.zeros_like(p, dtype=torch.bool)
            )
            for which in self.fisher.values():
                if name in which:
                    which[name] = which[name].to(p.device)
        self._growing = True  # SelectedAdamW's state: torch's loader already put it on the parameters' device
        if self._final:
            self._prune()

    def _backbone_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.candidates.items() if p.grad is not None}

    def _all_reduce_mean(self, grads) -> None:
        """Average over ranks the gradients DDP does not: the candidates (they start training after DDP wrapped
        the module) and everything of the perturbed pass (taken with autograd.grad, outside DDP's reducer)."""
        if self.trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        for g in grads:
            dist.all_reduce(g)
            g.div_(self.trainer.world_size)

    @torch.no_grad()
    def _accumulate(self, which: str, grads: dict[str, torch.Tensor], squared: bool = False) -> None:
        """F ← βF + (1−β)g² (``ema_decay`` β), or the running sum for an exact mean (``ema_decay: null``);
        ``squared``: the values are already squares (``fisher.per_sample``)."""
        accumulate_squares(
            self.fisher.setdefault(which, {}), grads, self.options.fisher.ema_decay, squared=squared
        )
        self.stat_counts[which] += 1

    def _fisher_loss(self, output: dict, labels: torch.Tensor) -> torch.Tensor:
        """``fisher.loss: pixel_ce``: the per-pixel cross-entropy of the head's semantic prediction — log-softmax
        of a head's logits, or for a query head (Mask2Former, whose scores Σ_q softmax(class_q)·sigmoid(mask_q) are
        not logits) the log of the scores normalised over classes; ignored pixels (255) left out."""
        scores = self.head.logits(output, labels.shape[-2:]).float()
        if isinstance(self.head, QueryHead):
            logp = (scores.clamp_min(1e-12) / scores.sum(1, keepdim=True).clamp_min(1e-12)).log()
        else:
            logp = scores.log_softmax(1)
        return torch.nn.functional.nll_loss(logp, labels.long(), ignore_index=IGNORE_INDEX)

    def _perturbed_pass(self, images: torch.Tensor, labels: torch.Tensor, t: int, with_head: bool,
                        paired: torch.Tensor | None = None) -> tuple[dict, dict, torch.Tensor] | None:  # fmt: skip
        """Gradients on x′, by autograd.grad (the one backward of the step stays the clean pass's, DDP's): of the
        Fisher loss for F(x′), and with ``train_aug`` of the training loss for the head and the selection too. Runs
        from the RNG state the clean pass then starts from again (dropout masks, point samples and so the matching
        are the same in both passes; the training stream never sees this pass), and leaves running statistics as they
        were (a statistics pass is not a training forward). ``None``: non-finite, the step is skipped."""
        seed = hash((self.perturb_seed, t, self.global_rank)) & 0x7FFFFFFF
        cuda = [self.device] if self.device.type == "cuda" else []
        # x′: the perturbation's draw on x, or (paired_render) the same scenes rendered in another domain
        shift = self.perturbation.active(seed=seed) if paired is None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=cuda), shift:
            output, losses, fisher_loss = self._forward(images if paired is None else paired, labels)
            train_loss = sum(losses.values())
            if not self.guard.check(fisher_loss) or not self.guard.check(train_loss):
                return None  # nothing enters the statistics; the step is skipped
            cands = [p for p in self.candidates.values() if p.requires_grad]
            if self.options.fisher.per_sample:
                stats = self._per_sample_squares(output, labels, cands)
            else:
                grads = torch.autograd.grad(fisher_loss, cands, allow_unused=True, retain_graph=with_head)
                stats = {p: g for p, g in zip(cands, grads) if g is not None}
            train: dict = {}
            if with_head:  # train_aug: the training loss on x′ trains the head and the selection as well
                params = cands + [
                    p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")
                ]
                tg = torch.autograd.grad(train_loss, params, allow_unused=True)
                train = {p: g for p, g in zip(params, tg) if g is not None}
        if not with_head:  # back to the guard's saved values of the step's start (this was its first forward)
            self.guard.restore_buffers(forget=False)
        if self.perturbation.batch_of_one and not self._warned_batch_of_one:
            self._warned_batch_of_one = True
            rank_zero_warn("FisherTune: one image per rank, so the perturbation has no batch spread to draw from: "
                           "x′ = x, F(x′) = F(x) and the domain term is 0; use data.batch_size >= 2 per rank")  # fmt: skip
        mag = self.perturbation.magnitudes() if paired is None else self._real_shift(images, paired)
        mag = mag.to(self.device)
        if self.trainer.world_size > 1:
            mag = self.trainer.strategy.reduce(mag, reduce_op="mean")
        return stats, train, mag

    @torch.no_grad()
    def _real_shift(self, images: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
        """paired_render's (ε_μ, ε_σ): how far x′'s channel statistics sit from x's at the perturbation's blocks, in
        the units the perturbation records its own draws in (:func:`shift_in_draw_units`), averaged over blocks."""
        seen: dict[int, list[torch.Tensor]] = {}
        blocks = set(self.options.perturb.after_blocks)

        def record(x: torch.Tensor, i: int) -> torch.Tensor:
            if i in blocks:
                seen.setdefault(i, []).append(x.detach())
            return x

        handle = self.backbone.register_block_hook(record, part_of_model=False)
        try:
            self.backbone(images)
            self.backbone(paired)
        finally:
            handle.remove()
        p, out = self.backbone.num_prefix_tokens, []
        for clean, shifted in seen.values():
            (mu_c, sig_c), (mu_s, sig_s) = channel_stats(clean.float(), p), channel_stats(shifted.float(), p)
            out.append(torch.stack([shift_in_draw_units(mu_c, mu_s), shift_in_draw_units(sig_c, sig_s)]))
        return torch.stack(out).mean(0)

    def _accumulate_eps(self, mag: torch.Tensor) -> None:
        beta = self.options.fisher.ema_decay
        # a new tensor, not an in-place update: under ddp_spawn the initial tensor is shared memory of all ranks
        eps = self.eps_ema.to(self.device)
        self.eps_ema = eps + mag if beta is None else eps.mul(beta).add(mag, alpha=1 - beta)
        self.stat_counts["eps"] += 1

    def _debias(self, n: int) -> float:
        """Factor that turns an accumulated statistic after n updates into the estimate (0 before any)."""
        beta = self.options.fisher.ema_decay
        if not n:
            return 0.0
        return 1.0 / n if beta is None else 1.0 / (1 - beta**n)

    # The step is the base's (Lightning's automatic optimisation: its loss, non-finite guard, logging, clipping and
    # one optimizer, a ChainedOptimizer over the head's and SelectedAdamW). FisherTune adds, in training_losses, the
    # perturbed pass and F(x)'s own loss before the clean backward, and in on_before_optimizer_step, after it, the
    # statistics, the refresh and the masking.
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        t = self.global_step
        if t >= self.stats_start() and not self._growing:
            self._start_growth()
        growing = self._growing and not self._final  # selection still changing
        stats = growing and self.is_stat_step(t)
        perturb = stats and self.options.fisher.score == "dr_fim"
        self._pending = StepStatistics(t, stats, perturb, perturb and self.options.perturb.train_aug)
        if perturb and self.options.perturb.type == "paired_render":
            if "paired_image" not in batch:
                raise ConfigError("method.perturb.type=paired_render needs training data that renders each scene "
                                  "again in other domains (data=synthetic with synthetic.paired=[photo, fog, ...])")  # fmt: skip
            self._pending.paired = self.prepare_batch(
                {"image": batch["paired_image"], "label": batch["label"]}
            )[0]
        loss = super().training_step(batch, batch_idx)
        n = self.selected_opt.num_selected()
        self.log_dict({"fishertune/selected": float(n), "fishertune/selected_fraction": n / self.n_base,
                       "fishertune/stat_step": float(stats)}, batch_size=len(batch["image"]))  # fmt: skip
        return loss

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """On a statistic step the perturbed pass first (gradients on x′), then the clean forward; with its own
        Fisher loss (``pixel_ce``) F(x)'s gradients through the same forward. The clean losses go to the base."""
        step = self._pending
        if step.perturb:
            result = self._perturbed_pass(images, labels, step.t, with_head=step.aug, paired=step.paired)
            if result is None:
                return None
            step.perturbed, step.train_p, step.mag = result
        output, losses, fisher_loss = self._forward(images, labels)
        per_sample = self.options.fisher.per_sample
        if step.stats and (per_sample or self.options.fisher.loss != "train_loss"):
            if not self.guard.check(fisher_loss):
                return None
            cands = {n: p for n, p in self.candidates.items() if p.requires_grad}
            if per_sample:
                sq = self._per_sample_squares(output, labels, list(cands.values()))
                step.fisher_x, step.squared = {n: sq[p] for n, p in cands.items() if p in sq}, True
            else:
                grads = torch.autograd.grad(fisher_loss, list(cands.values()), retain_graph=True)
                step.fisher_x = dict(zip(cands, grads))
        return losses

    def on_before_optimizer_step(self, optimizer) -> None:
        """After the clean backward, before clipping: gradients DDP did not average are averaged, the base's guard
        checks them all; a step that goes ahead enters the statistics (and with ``train_aug`` trains on x and x′ at
        1/2 each). A refresh due at this step happens even when the step is skipped (the schedule does not wait for a
        finite batch); then unselected elements' gradients are zeroed, so clipping never counts them."""
        step, self._pending = self._pending, None
        extra = []
        if step is not None and not self.guard.skipping and self._growing:
            self._all_reduce_mean(self._backbone_grads().values())
            extra = [*step.perturbed.values(), *step.train_p.values(), *step.fisher_x.values()]
            self._all_reduce_mean(extra)
        if self.guard.finish_window(optimizer, extra) and step is not None and step.stats:
            self._take_statistics(step)
        del extra
        if step is None or not self._growing:
            return
        step.perturbed = step.train_p = step.fisher_x = {}  # released before a refresh's scores are made
        if not self._final and self.is_refresh(step.t):
            self.refresh(step.t)
        grads = self._backbone_grads()
        if grads:  # one multi-tensor kernel, not one per candidate tensor
            torch._foreach_mul_(list(grads.values()), [self.masks[n] for n in grads])
        if not self._final and step.t >= self.options.schedule.growth_end:
            self._finalize()

    @torch.no_grad()
    def _take_statistics(self, step: StepStatistics) -> None:
        """A finite statistic step's gradients enter F(x), F(x′) and ε̄."""
        if step.perturb:
            self._accumulate(
                "p",
                {n: step.perturbed[p] for n, p in self.candidates.items() if p in step.perturbed},
                squared=self.options.fisher.per_sample,
            )
            self._accumulate_eps(step.mag)
        self._accumulate("x", step.fisher_x or self._backbone_grads(), squared=step.squared)
        for p, g in step.train_p.items():  # train_aug: the training losses on x and x′, each weighted 1/2
            p.grad = g.mul_(0.5) if p.grad is None else p.grad.mul_(0.5).add_(g, alpha=0.5)

    # -------------------------------------------------------------------------------- selection
    def _estimate(self, which: str, name: str, scale: float = 1.0) -> torch.Tensor:
        """Bias-corrected statistic of one tensor × ``scale``, a new tensor (zeros before any statistic)."""
        store = self.fisher.get(which, {})
        if name not in store:
            return torch.zeros_like(self.candidates[name], dtype=torch.float32)
        return store[name] * (self._debias(self.stat_counts[which]) * scale)

    def fisher_estimate(self, which: str) -> dict[str, torch.Tensor]:
        """Bias-corrected EMA of squared gradients per candidate (``x`` clean, ``p`` perturbed)."""
        return {k: self._estimate(which, k) for k in self.candidates}

    @torch.no_grad()
    def scores(self, t: int | None = None) -> dict[str, torch.Tensor]:
        """Per candidate element: DR-FIM (``fisher.score: dr_fim``), the normalised Fisher alone (``fim``) or a
        uniform draw (``random``, from a generator seeded by (perturb.seed, t) through :func:`random_score_seed`: the same
        on every rank, in every process and after a resume). Both Fisher
        estimates are divided by the clean one's unit (``fisher.normalize``); temporaries one tensor at a time."""
        f = self.options.fisher
        if f.score == "random":
            gen = torch.Generator().manual_seed(random_score_seed(self.perturb_seed, int(t or 0)))
            return {k: torch.rand(p.shape, generator=gen).to(p.device) for k, p in self.candidates.items()}
        units = (
            fisher_scale(self.fisher.get("x", {}), f.normalize, f.quantile) if self.fisher.get("x") else {}
        )
        if f.normalize != "none" and units:  # the stored sums are scaled by the debias factor on read
            d = self._debias(self.stat_counts["x"]) or 1.0
            units = {k: max(v * d, torch.finfo(torch.float32).tiny) for k, v in units.items()}
        eps_bar = float(self.eps_ema.sum()) * self._debias(self.stat_counts["eps"])
        out = {}
        for k in self.candidates:
            unit = units.get(k, 1.0)
            fx = self._estimate("x", k, 1 / unit)
            if f.score == "fim":
                out[k] = fx
            else:
                out[k] = dr_fim(fx, self._estimate("p", k, 1 / unit), eps_bar, f.gamma, f.prior_precision, f.eps,
                                f.ratio_factor)  # fmt: skip
        return out

    def _groups(self) -> list[list[str]]:
        scope = self.options.selection.scope
        names = list(self.candidates)
        if scope == "global":
            return [names]
        if scope == "per_tensor":
            return [[n] for n in names]
        blocks: dict[int, list[str]] = {}
        for n in names:
            blocks.setdefault(block_of(n), []).append(n)
        return list(blocks.values())

    def select(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """New elements (flat indices per tensor) that bring the selection to ``k``: :func:`grow_selection` over
        this method's scope groups, granularity and current masks."""
        o = self.options
        return grow_selection(
            scores, self.masks, self._groups(), k, o.selection.granularity, o.schedule.monotone
        )

    @torch.no_grad()
    def refresh(self, t: int) -> None:
        k = self.k_target(t)
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
        self._check_ranks_agree()
        selected = self.selected_opt.num_selected()
        self.history.append(
            {"step": t, "target": k, "selected": selected, "fraction": selected / self.n_base}
        )

    def _check_ranks_agree(self) -> None:
        """Every rank selected the same elements: an exact int64 digest (:func:`selection_digest`), min = max."""
        if self.trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        digest = selection_digest([self.selected_opt.index(n) for n in self.candidates]).to(self.device)
        lo, hi = digest.clone(), digest.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(
                "FisherTune: the selection differs across ranks (gradients were not synchronised)"
            )

    def breakdown(self) -> list[dict]:
        """Selected elements per block and module kind: rows of block, kind, selected, share of the selection."""
        counts: dict[tuple[int, str], int] = {}
        for name, mask in self.masks.items():
            for kind, c in kind_counts(name, mask).items():
                key = (block_of(name), kind)
                counts[key] = counts.get(key, 0) + c
        total = max(sum(counts.values()), 1)
        return [
            {"block": b, "kind": k, "selected": c, "share": c / total} for (b, k), c in sorted(counts.items())
        ]

    def _finalize(self) -> None:
        """After the last refresh: free the statistics and stop computing gradients of unselected tensors."""
        self._final = True
        if self.options.finalize.drop_fisher:
            self.fisher = {}
        self._prune()

    def _prune(self) -> None:
        if not self.options.finalize.prune_frozen_tensors:
            return
        for name, p in self.candidates.items():
            if not bool(self.masks[name].any()):
                p.requires_grad_(False)

    def configure_callbacks(self):
        """The selection's reporting (CSV, logger metrics, wandb tables, the final mask file) is a callback."""
        from dgss.callbacks import FisherTuneReport

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
            "fisher": {w: {n: v.cpu() for n, v in d.items()} for w, d in self.fisher.items()},
            "stat_counts": dict(self.stat_counts),
            "eps_ema": self.eps_ema.cpu(),
            "history": list(self.history),
            "final": self._final,
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
        self.fisher = {
            w: {n: v.to(self.candidates[n].device) for n, v in d.items()} for w, d in ft["fisher"].items()
        }
        self.stat_counts = dict(ft["stat_counts"])
        self.eps_ema = ft["eps_ema"].clone()
        self.history = list(ft["history"])
        self._final = bool(ft["final"])
        self._growing = False  # requires_grad is set again at the next training step (after DDP wraps)


register(FisherTuneConfig, "method", "fishertune_schema")
