"""FisherTune's scores, one small strategy each (``method.fishertune.fisher.score``): DR-FIM (the paper's Eq. for
the domain-related Fisher information with its variational stabilisation), the
Fisher alone (the paper's Table 4 ablation), and uniformly random elements under the same budget and schedule (the
control every selection must beat). A score says whether it reads statistics and whether it needs the perturbed pass.

DR-FIM with the variational stabilisation: with Λ = F̂/γ + τ⁻² (Gaussian posterior, prior N(θ_pt, τ²)),
DRF = γ(Λ_x − τ⁻²) + exp(−(ε_μ+ε_σ)) · γ · |Λ_x − Λ_x′| / (min(Λ_x, Λ_x′) + ε): the task term is F̂(x) and the prior
precision τ⁻² floors the ratio's denominator. Both estimates are divided by the clean one's unit first
(``fisher.normalize``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from dgss.methods.fishertune.options import FisherOptions
from dgss.methods.fishertune.statistics import FisherStatistics, fisher_scale


# ------------------------------------------------------------------------------------------ pure functions
def random_score_seed(seed: int, t: int) -> int:
    """The ``random`` score's generator seed at refresh step ``t``: integers only (numpy's ``SeedSequence``), so every
    process, rank and resumed run draws the same selection — Python's ``hash`` of a string is salted per process.

    >>> random_score_seed(0, 200) == random_score_seed(0, 200) != random_score_seed(0, 400)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(t), 0x52414E44]).generate_state(1)[0]) & 0x7FFFFFFF


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


class FimScore:
    """The normalised Fisher on x alone (``fisher.score: fim``); temporaries one tensor at a time."""

    statistics = True  # reads F̂: the schedule has statistic steps
    perturbs = False  # no perturbed pass

    def __init__(self, options: FisherOptions, seed: int = 0):
        self.options = options

    @torch.no_grad()
    def __call__(self, stats: FisherStatistics, t: int) -> dict[str, torch.Tensor]:
        f = self.options
        units = (
            fisher_scale(stats.fisher.get("x", {}), f.normalize, f.quantile) if stats.fisher.get("x") else {}
        )
        if f.normalize != "none" and units:  # the stored sums are scaled by the debias factor on read
            d = stats.debias(stats.counts["x"]) or 1.0
            units = {k: max(v * d, torch.finfo(torch.float32).tiny) for k, v in units.items()}
        eps_bar = stats.eps_bar()
        return {k: self.combine(stats, k, units.get(k, 1.0), eps_bar) for k in stats.candidates}

    def combine(self, stats: FisherStatistics, name: str, unit: float, eps_bar: float) -> torch.Tensor:
        return stats.estimate("x", name, 1 / unit)


class DrFimScore(FimScore):
    """DR-FIM (``fisher.score: dr_fim``): the task term plus the domain term from F̂(x′) of the perturbed pass."""

    perturbs = True

    def combine(self, stats: FisherStatistics, name: str, unit: float, eps_bar: float) -> torch.Tensor:
        f = self.options
        return dr_fim(stats.estimate("x", name, 1 / unit), stats.estimate("p", name, 1 / unit), eps_bar, f.gamma,
                      f.prior_precision, f.eps, f.ratio_factor)  # fmt: skip


class RandomScore:
    """Uniform draws (``fisher.score: random``) from a generator seeded by (``perturb.seed``, t) through
    :func:`random_score_seed`: the same on every rank, in every process and after a resume."""

    statistics = False
    perturbs = False

    def __init__(self, options: FisherOptions, seed: int = 0):
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(self, stats: FisherStatistics, t: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(random_score_seed(self.seed, int(t)))
        return {k: torch.rand(p.shape, generator=gen).to(p.device) for k, p in stats.candidates.items()}


SCORES = {"dr_fim": DrFimScore, "fim": FimScore, "random": RandomScore}
