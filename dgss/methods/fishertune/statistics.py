"""The Fisher statistics FisherTune ranks by (the paper's empirical Fisher): F̂ = EMA of squared backbone gradients on
the clean batch x (``x``) and on its shifted view x′ (``p``), bias-corrected on read, and ε̄ = ε_μ + ε_σ, the
perturbation's magnitude. Pure update and scaling functions, and the store that owns the running values."""

from __future__ import annotations

import math

import torch


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


class FisherStatistics:
    """F̂(x), F̂(x′) per candidate tensor (``fisher["x"]``, ``fisher["p"]``), the perturbation's magnitude
    (``eps_ema``: ε_μ, ε_σ) and how many updates each received (``counts``), with ``ema_decay`` β (None: the
    running sum for an exact mean).

    >>> s = FisherStatistics({"w": torch.zeros(2)}, ema_decay=0.5)
    >>> s.accumulate("x", {"w": torch.tensor([1.0, 2.0])})
    >>> s.accumulate("x", {"w": torch.tensor([1.0, 2.0])})
    >>> s.estimate("x", "w").tolist(), s.counts["x"]
    ([1.0, 4.0], 2)
    """

    def __init__(self, candidates: dict[str, torch.Tensor], ema_decay: float | None):
        self.candidates = candidates
        self.ema_decay = ema_decay
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}  # "x" / "p" -> name -> EMA of squared gradients
        self.counts = {"x": 0, "p": 0, "eps": 0}
        self.eps_ema = torch.zeros(2)

    @torch.no_grad()
    def accumulate(self, which: str, grads: dict[str, torch.Tensor], squared: bool = False) -> None:
        """F ← βF + (1−β)g² (or the running sum); ``squared``: the values are already squares (per-sample)."""
        accumulate_squares(self.fisher.setdefault(which, {}), grads, self.ema_decay, squared=squared)
        self.counts[which] += 1

    def accumulate_eps(self, mag: torch.Tensor, device: torch.device) -> None:
        beta = self.ema_decay
        # a new tensor, not an in-place update: under ddp_spawn the initial tensor is shared memory of all ranks
        eps = self.eps_ema.to(device)
        self.eps_ema = eps + mag if beta is None else eps.mul(beta).add(mag, alpha=1 - beta)
        self.counts["eps"] += 1

    def debias(self, n: int) -> float:
        """Factor that turns an accumulated statistic after n updates into the estimate (0 before any)."""
        beta = self.ema_decay
        if not n:
            return 0.0
        return 1.0 / n if beta is None else 1.0 / (1 - beta**n)

    def estimate(self, which: str, name: str, scale: float = 1.0) -> torch.Tensor:
        """Bias-corrected statistic of one tensor × ``scale``, a new tensor (zeros before any statistic)."""
        store = self.fisher.get(which, {})
        if name not in store:
            return torch.zeros_like(self.candidates[name], dtype=torch.float32)
        return store[name] * (self.debias(self.counts[which]) * scale)

    def estimates(self, which: str) -> dict[str, torch.Tensor]:
        """Bias-corrected EMA of squared gradients per candidate (``x`` clean, ``p`` perturbed)."""
        return {k: self.estimate(which, k) for k in self.candidates}

    def eps_bar(self) -> float:
        """ε̄ = ε_μ + ε_σ, bias-corrected."""
        return float(self.eps_ema.sum()) * self.debias(self.counts["eps"])

    def to(self, device: torch.device) -> None:
        for which in self.fisher.values():
            for name in which:
                which[name] = which[name].to(device)

    def state(self) -> dict:
        """What a checkpoint keeps (on the CPU)."""
        return {"fisher": {w: {n: v.cpu() for n, v in d.items()} for w, d in self.fisher.items()},
                "stat_counts": dict(self.counts), "eps_ema": self.eps_ema.cpu()}  # fmt: skip

    def load(self, state: dict) -> None:
        self.fisher = {
            w: {n: v.to(self.candidates[n].device) for n, v in d.items()} for w, d in state["fisher"].items()
        }
        self.counts = dict(state["stat_counts"])
        self.eps_ema = state["eps_ema"].clone()
