"""Feature-statistics perturbation (DSU-style) as a backbone block hook: a simulated domain shift.

Per sample and channel, the patch tokens' mean μ and std σ are re-drawn around themselves,
``μ' = μ + z_μ · s · Σ_μ`` and ``σ' = σ + z_σ · s · Σ_σ`` with ``z ~ N(0, 1)`` and Σ the batch std of the statistic,
and the tokens are re-normalised, ``f' = σ' (f − μ) / σ + μ'``. A std must stay ≥ 0 (a negative σ' flips the channel:
10 % of channels at s = 7): ``sigma: clamp`` (default) keeps DSU's linear draw and clamps σ' at 0 — the same values
wherever σ' ≥ 0 —, ``sigma: log`` draws ``σ' = σ · exp(z_σ · s · Σ_log σ)`` instead (Σ_log σ the batch std of log σ). Prefix tokens (CLS, registers) are untouched;
SAM's NHWC tokens arrive flattened through :meth:`Backbone.register_block_hook`.

The hook records the mean magnitude of the draws, ``ε_μ = mean(s |z_μ|)`` and ``ε_σ = mean(s |z_σ|)`` over samples,
channels and insertion points, which FisherTune uses to weight its domain term.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def channel_stats(
    tokens: torch.Tensor, num_prefix: int = 0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel: the patch tokens' mean and std, (B, C) each, as the perturbation computes them."""
    f = tokens[:, num_prefix:]
    return f.mean(1), (f.var(1, unbiased=False) + eps).sqrt()


def shift_in_draw_units(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A real shift of a statistic (paired samples, (B, C)) in the units of the perturbation's recorded magnitude
    ``mean(s·|z|)``: mean |target − source| over the mean batch std of the source statistic (the draw moves it by
    ``s·|z|·Σ``).

    >>> src = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # batch std 1 per channel
    >>> round(float(shift_in_draw_units(src, src + 0.5)), 4)
    0.5
    """
    spread = (source.var(0, unbiased=False) + eps).sqrt().mean()
    return (target - source).abs().mean() / spread


class ChannelStatPerturbation:
    """Call as a block hook ``(tokens, block_idx) -> tokens``; active only inside :meth:`active`.

    Args:
        after_blocks: block indices after which the statistics are perturbed (independent noise per point).
        scale: s_μ, the multiple of the batch std of the channel means (and of the stds, unless ``scale_sigma``).
        scale_sigma: s_σ for the channel stds. Both 0: the hook is the identity (x′ = x exactly).
        num_prefix_tokens: leading tokens left as they are.
        eps: added to variances before the square root.
        sigma: how the std is re-drawn: ``clamp`` (linear, σ' clamped at 0) or ``log`` (multiplicative).
    """

    def __init__(self, after_blocks: Sequence[int], scale: float = 1.0, num_prefix_tokens: int = 0,
                 eps: float = 1e-6, scale_sigma: float | None = None, sigma: str = "clamp"):  # fmt: skip
        if sigma not in ("clamp", "log"):
            raise ValueError(f"sigma={sigma!r}: use clamp or log")
        self.sigma_mode = sigma
        self.after_blocks = {int(b) for b in after_blocks}
        self.scale = float(scale)  # s_μ (and s_σ unless ``scale_sigma`` is given)
        self.scale_sigma = self.scale if scale_sigma is None else float(scale_sigma)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.eps = eps
        self.enabled = False
        self._seed: int | None = None
        self._gen: torch.Generator | None = None
        self._abs_z: list[torch.Tensor] = []  # per insertion point: (mean s|z_mu|, mean s|z_sigma|)
        self.batch_of_one = False  # the last perturbed forward saw one image: no batch spread, so x′ = x

    @contextmanager
    def active(self, seed: int | None = None) -> Iterator[None]:
        """Perturb inside the block; :meth:`magnitudes` then returns (ε_μ, ε_σ) of that forward. With ``seed``
        the draws come from their own generator (reproducible after a resume), else from torch's global one."""
        self.enabled, self._abs_z, self._seed, self._gen = True, [], seed, None
        self.batch_of_one = False
        try:
            yield
        finally:
            self.enabled = False

    def magnitudes(self) -> torch.Tensor:
        """(ε_μ, ε_σ) of the last perturbed forward, averaged over insertion points (zeros if none ran)."""
        if not self._abs_z:
            return torch.zeros(2)
        return torch.stack(self._abs_z).mean(0)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        if self._seed is None:
            return torch.randn_like(like)
        if self._gen is None or self._gen.device != like.device:
            self._gen = torch.Generator(device=like.device)
            self._gen.manual_seed(self._seed)
        return torch.randn(like.shape, generator=self._gen, device=like.device, dtype=like.dtype)

    def __call__(self, tokens: torch.Tensor, block_idx: int) -> torch.Tensor:
        if not self.enabled or block_idx not in self.after_blocks:
            return tokens
        if self.scale == 0 and self.scale_sigma == 0:  # no shift: exactly the clean tokens (and ε = 0)
            self._abs_z.append(torch.zeros(2, device=tokens.device))
            return tokens
        p = self.num_prefix_tokens
        prefix, f = tokens[:, :p], tokens[:, p:]
        b = f.shape[0]
        mu = f.mean(1, keepdim=True)  # (B, 1, C)
        sigma = (f.var(1, keepdim=True, unbiased=False) + self.eps).sqrt()
        log = self.sigma_mode == "log"
        if b > 1:  # the batch spread of each statistic sets the size of the shift (none for a batch of one)
            spread_mu = (mu.var(0, keepdim=True) + self.eps).sqrt().detach()
            spread_sigma = ((sigma.log() if log else sigma).var(0, keepdim=True) + self.eps).sqrt().detach()
        else:
            spread_mu = spread_sigma = torch.zeros_like(mu)
            self.batch_of_one = True
        z_mu, z_sigma = self._randn(mu), self._randn(sigma)
        new_mu = mu + z_mu * self.scale * spread_mu
        if log:
            new_sigma = sigma * (z_sigma * self.scale_sigma * spread_sigma).exp()
        else:
            new_sigma = (sigma + z_sigma * self.scale_sigma * spread_sigma).clamp_min(0)
        out = (f - mu) / sigma * new_sigma + new_mu
        self._abs_z.append(torch.stack([z_mu.abs().mean() * self.scale,
                                        z_sigma.abs().mean() * self.scale_sigma]).detach().float())  # fmt: skip
        return torch.cat([prefix, out], 1) if p else out
