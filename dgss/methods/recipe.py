"""The optimizer recipe every method shares: ``method.optimizer`` over the method's parameter groups (mmengine's
``paramwise_cfg`` rule: :mod:`dgss.methods.paramwise`) in its fastest exact implementation, the poly schedule with an
optional linear warm-up, and cosine weight-decay annealing (SoMA's recipe: mmengine's ``CosineAnnealingParamScheduler``
on ``weight_decay``). Pure functions of the options and the groups; :class:`~dgss.methods.base.SegmentationMethod`
calls them from Lightning's ``configure_optimizers`` and ``on_train_batch_start``."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dgss import console
from dgss.errors import ConfigError
from dgss.methods.paramwise import describe_groups
from dgss.options import Options


@dataclass
class SchedulerOptions(Options):
    """``method.scheduler``: a linear warm-up from ``warmup_start_factor`` × lr over ``warmup_steps``, then a poly
    decay (``power``) to 0 at ``trainer.max_steps`` (Rein's recipe: no warm-up, power 0.9)."""

    warmup_steps: int = 0
    warmup_start_factor: float = 1e-6
    power: float = 0.9
    # every group's weight decay: constant, or cosine-annealed from its own value to weight_decay_min at max_steps
    # (SoMA's recipe: mmengine's CosineAnnealingParamScheduler on weight_decay, eta_min 1e-5, stepped per iteration)
    weight_decay: Literal["constant", "cosine"] = "constant"
    weight_decay_min: float = 1e-5
    # groups without decay: keep 0 (ours) | rise to weight_decay_min as the official scheduler makes them
    weight_decay_zero: Literal["keep", "official"] = "keep"


@dataclass
class OptimizerConfig:
    """``method.optimizer``: the optimizer as a Hydra partial (Rein's AdamW); the method supplies the param groups
    (lr multipliers, no decay on norms / biases / tokens)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


def cosine_weight_decay(wd0: float, t: int, total: int, wd_min: float, zero: str = "keep") -> float:
    """Weight decay at step t of ``total``: wd_min + (wd0 − wd_min)·(1 + cos(π·t/total))/2 (mmengine's cosine
    annealing in closed form; wd0 at t = 0, wd_min from t = total on). A group without decay (wd0 = 0) keeps 0 under
    ``zero='keep'``; ``'official'`` lets it rise to wd_min as the official scheduler does."""
    if wd0 == 0.0 and zero == "keep":
        return 0.0
    return wd_min + (wd0 - wd_min) * (1.0 + math.cos(math.pi * min(t, total) / total)) / 2.0


def fast_implementation(
    factory: Callable[..., torch.optim.Optimizer], device_types: set[str]
) -> dict[str, bool]:
    """The keyword that makes a torch optimizer take its fastest exact path for parameters on ``device_types``:
    ``fused=True`` on CUDA (AdamW's whole update in one kernel launch per ~100 tensors, found-inf aware),
    ``foreach=True`` elsewhere (one vectorised op per update term, not one per tensor); nothing when the optimizer
    has no such option or the config chose (``+method.optimizer.fused=false`` / ``foreach``).

    >>> import functools
    >>> fast_implementation(functools.partial(torch.optim.AdamW, lr=1e-4), {"cuda"})
    {'fused': True}
    >>> fast_implementation(functools.partial(torch.optim.AdamW, lr=1e-4), {"cpu"})
    {'foreach': True}
    >>> fast_implementation(functools.partial(torch.optim.AdamW, fused=False), {"cuda"})
    {}
    """
    func = getattr(factory, "func", factory)
    chosen = {
        k for k, v in getattr(factory, "keywords", {}).items() if k in ("fused", "foreach") and v is not None
    }
    try:
        accepted = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    if chosen or not device_types:
        return {}
    if device_types == {"cuda"} and "fused" in accepted:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}


def default_optimizer() -> Callable[..., torch.optim.Optimizer]:
    c = OptimizerConfig()
    return functools.partial(
        torch.optim.AdamW, lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas), eps=c.eps
    )


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], groups: list[dict]
) -> torch.optim.Optimizer:
    """``method.optimizer`` (``factory``) over ``groups`` (:func:`dgss.methods.paramwise.group_parameters`), each
    group's lr and decay times its multipliers, in its fastest exact implementation for the parameters' device
    (:func:`fast_implementation`: fused on CUDA); the groups are printed."""
    devices = {p.device.type for g in groups for p in g["params"]}
    opt = factory(
        [{k: v for k, v in g.items() if k not in ("names", "rules")} for g in groups],
        **fast_implementation(factory, devices),
    )
    base_lr, base_wd = opt.defaults["lr"], opt.defaults.get("weight_decay", 0.0)
    for g in opt.param_groups:
        g["lr"] = g["lr"] * g["lr_mult"]
        g["weight_decay"] = g["weight_decay"] * g["decay_mult"]
    console.info(f"parameter groups ({type(opt).__name__}, lr {base_lr:.3g}, weight decay {base_wd:.3g}):\n"
                 + describe_groups(groups, base_lr, base_wd))  # fmt: skip
    return opt


def anneal_weight_decay(
    optimizers: Sequence[torch.optim.Optimizer], t: int, total: int, options: SchedulerOptions
) -> None:
    """``scheduler.weight_decay: cosine``: every group's decay for this step, from its value at step 0."""
    o = options
    if o.weight_decay == "constant":
        return
    for opt in optimizers:
        for g in opt.param_groups:
            wd0 = g.setdefault("initial_weight_decay", g.get("weight_decay", 0.0))
            g["weight_decay"] = cosine_weight_decay(wd0, t, total, o.weight_decay_min,
                                                    o.weight_decay_zero)  # fmt: skip


def build_scheduler(opt: torch.optim.Optimizer, total: int, options: SchedulerOptions):
    """Linear warm-up from ``warmup_start_factor`` then poly decay to 0 at step ``total``."""
    cfg = options
    warm = cfg.warmup_steps
    if warm >= total:
        raise ConfigError(f"method.scheduler.warmup_steps={warm} must be below trainer.max_steps={total}")
    poly = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total - warm, power=cfg.power)
    if not warm:
        return poly
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=cfg.warmup_start_factor, total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(opt, [linear, poly], milestones=[warm])
