"""FisherTune's schedule (the paper's progressive selection; lengths ours): in optimizer steps t, a head-only warm-up to T1
(``warmup_iters``), then the selected fraction grows as δ_max − (δ_max − δ_min)·exp(−(t − T1)/τ), refreshed every
``refresh_every`` steps and snapping to δ_max at ``growth_end``, after which the selection is fixed. Statistics are
gathered in the ``window`` steps before each refresh (the first window ends at T1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgss.methods.fishertune.options import FisherOptions, ScheduleOptions


def growth_ratio(
    t: int, warmup: int, delta_min: float, delta_max: float, tau: float, growth_end: int
) -> float:
    """Scheduled selected fraction at step t (0 before the growth phase, δ_max from ``growth_end`` on)."""
    if t < warmup:
        return 0.0
    if t >= growth_end:
        return delta_max
    return delta_max - (delta_max - delta_min) * math.exp(-(t - warmup) / tau)


@dataclass
class Schedule:
    """When the selection grows, how far, and which steps gather statistics.

    Args:
        options: ``method.fishertune.schedule``.
        fisher: ``method.fishertune.fisher`` (``window``, ``interval``).
        statistics: the score reads Fisher statistics (``random`` does not: no statistic steps).
        n_base: the elements δ is a fraction of (``schedule.ratio_base``).
        delta_max: the final fraction (``budget / n_base`` when a budget is set).

    >>> from dgss.methods.fishertune.options import FisherOptions, ScheduleOptions
    >>> s = Schedule(ScheduleOptions(warmup_iters=10, growth_end=30, refresh_every=10, delta_min=0.01, delta_max=0.05,
    ...              growth_tau=10), FisherOptions(window=3), statistics=True, n_base=1000, delta_max=0.05)
    >>> s.stats_start(), [t for t in range(35) if s.is_refresh(t)], s.k_target(9), s.k_target(30)
    (8, [10, 20, 30], 0, 50)
    >>> [t for t in range(8, 22) if s.is_stat_step(t)]
    [8, 9, 10, 18, 19, 20]
    """

    options: ScheduleOptions
    fisher: FisherOptions
    statistics: bool
    n_base: int
    delta_max: float

    def k_target(self, t: int) -> int:
        """The scheduled number of selected elements at step ``t``."""
        s = self.options
        r = growth_ratio(t, s.warmup_iters, s.delta_min, self.delta_max, s.growth_tau, s.growth_end)
        return round(r * self.n_base)

    def stats_start(self) -> int:
        """The first statistic step: the warm-up's last ``window`` steps (``refresh_every`` with ``window: null``)
        gather F(x) and F(x′) for the first selection, like the window before every later refresh. The backbone
        takes gradients from here but no element moves before T1 (nothing is selected yet)."""
        s, f = self.options, self.fisher
        if not self.statistics:
            return s.warmup_iters
        return max(s.warmup_iters - (f.window if f.window is not None else s.refresh_every) + 1, 0)

    def next_refresh(self, t: int) -> int | None:
        """The first refresh at or after step ``t`` (None after ``growth_end``, or before the first window)."""
        s = self.options
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
        f = self.fisher
        if r is None or not self.statistics:
            return False
        return (f.window is None or r - t < f.window) and (r - t) % f.interval == 0
