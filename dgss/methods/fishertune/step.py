"""One FisherTune training step (the base's :class:`~dgss.methods.base.TrainingPass`): on a statistic step the
perturbed pass first (gradients on the shifted view x′, by ``autograd.grad``), then the clean forward whose backward
is the step's own (Lightning's automatic optimisation, DDP's reducer); after it the statistics, the refresh due at
this step and the masking of unselected elements' gradients, before clipping and the update.

x′ is the perturbation's draw on x (feature statistics of early blocks re-drawn: DSU) or, for the oracle ablation
(``perturb.type: paired_render``), the same scenes rendered in other domains by the data. What the step gathers lives
on this object, from the forward to the update, never on the method."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from dgss.compat import foreach_mul_
from dgss.data.classes import IGNORE_INDEX
from dgss.methods.base import TrainingPass
from dgss.methods.fishertune.statistics import batch_slice
from dgss.models.heads.protocol import QueryHead
from dgss.models.style_perturb import channel_stats, shift_in_draw_units


class FisherStep(TrainingPass):
    """The passes of step ``t``: ``stats`` (its gradients enter F(x), and F(x′) with ``perturb``), ``aug``
    (``perturb.train_aug``: the perturbed view trains too), ``paired`` (x′ given by the data)."""

    def __init__(
        self, method, t: int, stats: bool, perturb: bool, aug: bool, paired: torch.Tensor | None = None
    ):
        super().__init__(method)
        self.t, self.stats, self.perturb, self.aug, self.paired = t, stats, perturb, aug, paired
        self.perturbed: dict = {}  # parameter -> gradient of the Fisher loss on x′
        self.train_p: dict = {}  # train_aug: parameter -> gradient of the training loss on x′
        self.fisher_x: dict = {}  # pixel_ce / per_sample: name -> gradient of the Fisher loss on x
        self.squared = False  # per_sample: fisher_x and perturbed hold mean_i g_i²
        self.mag: torch.Tensor | None = None  # the perturbation's (ε_μ, ε_σ)

    # ------------------------------------------------------------------------------- before the backward
    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """On a statistic step the perturbed pass first, then the clean forward; with its own Fisher loss
        (``pixel_ce``, or ``per_sample``) F(x)'s gradients through the same forward. The clean losses go to the base."""
        m, f = self.method, self.method.options.fisher
        if self.perturb:
            result = self.perturbed_pass(images, labels)
            if result is None:
                return None
            self.perturbed, self.train_p, self.mag = result
        output, losses, fisher_loss = m.fisher_forward(images, labels)
        if self.stats and (f.per_sample or f.loss != "train_loss"):
            if not m.guard.check(fisher_loss):
                return None
            cands = {n: p for n, p in m.candidates.items() if p.requires_grad}
            if f.per_sample:
                sq = self.per_sample_squares(output, labels, list(cands.values()))
                self.fisher_x, self.squared = {n: sq[p] for n, p in cands.items() if p in sq}, True
            else:
                grads = torch.autograd.grad(fisher_loss, list(cands.values()), retain_graph=True)
                self.fisher_x = dict(zip(cands, grads))
        return losses

    def per_sample_squares(self, output, labels: torch.Tensor, params: list[torch.Tensor]) -> dict:
        """``fisher.per_sample``: (1/B) Σ_i g_i² per parameter, g_i the gradient of image i's Fisher loss taken as a
        batch of one (its output sliced from the batch's; the graph is kept for the batch's own backward). Random
        draws (the head's point samples) come from a forked stream: the training stream is the same as without."""
        m = self.method
        b = labels.shape[0]
        out: dict[torch.Tensor, torch.Tensor] = {}
        cuda = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            for i in range(b):
                one, lab = batch_slice(output, i), labels[i : i + 1]
                loss = (
                    sum(m.head.loss(one, lab).values())
                    if m.options.fisher.loss == "train_loss"
                    else fisher_loss(m.head, one, lab)
                )
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        sq = g.detach().float().square_().div_(b)
                        out[p] = sq if p not in out else out[p].add_(sq)
        return out

    def perturbed_pass(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[dict, dict, torch.Tensor] | None:
        """Gradients on x′, by autograd.grad (the one backward of the step stays the clean pass's, DDP's): of the
        Fisher loss for F(x′), and with ``train_aug`` of the training loss for the head and the selection too. Runs
        from the RNG state the clean pass then starts from again (dropout masks, point samples and so the matching
        are the same in both passes; the training stream never sees this pass), and leaves running statistics as they
        were (a statistics pass is not a training forward). ``None``: non-finite, the step is skipped."""
        m, paired, with_head = self.method, self.paired, self.aug
        seed = hash((m.perturb_seed, self.t, m.global_rank)) & 0x7FFFFFFF
        cuda = [m.device] if m.device.type == "cuda" else []
        shift = m.perturbation.active(seed=seed) if paired is None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=cuda), shift:
            output, losses, fisher_loss = m.fisher_forward(images if paired is None else paired, labels)
            train_loss = sum(losses.values())
            if not m.guard.check(fisher_loss) or not m.guard.check(train_loss):
                return None  # nothing enters the statistics; the step is skipped
            cands = [p for p in m.candidates.values() if p.requires_grad]
            if m.options.fisher.per_sample:
                stats = self.per_sample_squares(output, labels, cands)
            else:
                grads = torch.autograd.grad(fisher_loss, cands, allow_unused=True, retain_graph=with_head)
                stats = {p: g for p, g in zip(cands, grads) if g is not None}
            train: dict = {}
            if with_head:  # train_aug: the training loss on x′ trains the head and the selection as well
                params = cands + [
                    p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("backbone.")
                ]
                tg = torch.autograd.grad(train_loss, params, allow_unused=True)
                train = {p: g for p, g in zip(params, tg) if g is not None}
        if not with_head:  # back to the guard's saved values of the step's start (this was its first forward)
            m.guard.restore_buffers(forget=False)
        if m.perturbation.batch_of_one and not m.warned_batch_of_one:
            m.warned_batch_of_one = True
            rank_zero_warn("FisherTune: one image per rank, so the perturbation has no batch spread to draw from: "
                           "x′ = x, F(x′) = F(x) and the domain term is 0; use data.batch_size >= 2 per rank")  # fmt: skip
        mag = m.perturbation.magnitudes() if paired is None else self.real_shift(images, paired)
        mag = mag.to(m.device)
        if m.trainer.world_size > 1:
            mag = m.trainer.strategy.reduce(mag, reduce_op="mean")
        return stats, train, mag

    @torch.no_grad()
    def real_shift(self, images: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
        """paired_render's (ε_μ, ε_σ): how far x′'s channel statistics sit from x's at the perturbation's blocks, in
        the units the perturbation records its own draws in (:func:`shift_in_draw_units`), averaged over blocks."""
        m = self.method
        seen: dict[int, list[torch.Tensor]] = {}
        blocks = set(m.options.perturb.after_blocks)

        def record(x: torch.Tensor, i: int) -> torch.Tensor:
            if i in blocks:
                seen.setdefault(i, []).append(x.detach())
            return x

        handle = m.backbone.register_block_hook(record, part_of_model=False)
        try:
            m.backbone(images)
            m.backbone(paired)
        finally:
            handle.remove()
        p, out = m.backbone.num_prefix_tokens, []
        for clean, shifted in seen.values():
            (mu_c, sig_c), (mu_s, sig_s) = channel_stats(clean.float(), p), channel_stats(shifted.float(), p)
            out.append(torch.stack([shift_in_draw_units(mu_c, mu_s), shift_in_draw_units(sig_c, sig_s)]))
        return torch.stack(out).mean(0)

    # -------------------------------------------------------------------------------- after the backward
    def extra_grads(self) -> list[torch.Tensor]:
        """Gradients DDP did not average are averaged (the candidates', and everything of the perturbed pass); those
        taken outside the optimizer go to the guard's check with the optimizer's."""
        m = self.method
        if m.guard.skipping or not m.growing:
            return []
        all_reduce_mean(m, backbone_grads(m).values())
        extra = [*self.perturbed.values(), *self.train_p.values(), *self.fisher_x.values()]
        all_reduce_mean(m, extra)
        return extra

    def finish(self, went_ahead: bool) -> None:
        """A step that goes ahead enters the statistics (and with ``train_aug`` trains on x and x′ at 1/2 each). A
        refresh due at this step happens even when the step is skipped (the schedule does not wait for a finite
        batch); then unselected elements' gradients are zeroed, so clipping never counts them."""
        m = self.method
        if went_ahead and self.stats:
            self.take_statistics()
        if not m.growing:
            return
        self.perturbed = self.train_p = self.fisher_x = {}  # released before a refresh's scores are made
        if not m.final and m.schedule.is_refresh(self.t):
            m.refresh(self.t)
        grads = backbone_grads(m)
        if grads:  # one multi-tensor kernel, not one per candidate tensor
            foreach_mul_(list(grads.values()), [m.masks[n] for n in grads])
        if not m.final and self.t >= m.options.schedule.growth_end:
            m.finalize()

    @torch.no_grad()
    def take_statistics(self) -> None:
        """A finite statistic step's gradients enter F(x), F(x′) and ε̄."""
        m = self.method
        if self.perturb:
            m.stats.accumulate("p", {n: self.perturbed[p] for n, p in m.candidates.items() if p in self.perturbed},
                               squared=m.options.fisher.per_sample)  # fmt: skip
            m.stats.accumulate_eps(self.mag, m.device)
        m.stats.accumulate("x", self.fisher_x or backbone_grads(m), squared=self.squared)
        for p, g in self.train_p.items():  # train_aug: the training losses on x and x′, each weighted 1/2
            p.grad = g.mul_(0.5) if p.grad is None else p.grad.mul_(0.5).add_(g, alpha=0.5)


def backbone_grads(method) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in method.candidates.items() if p.grad is not None}


def all_reduce_mean(method, grads) -> None:
    """Average over ranks the gradients DDP does not: the candidates (they start training after DDP wrapped the
    module) and everything of the perturbed pass (taken with autograd.grad, outside DDP's reducer)."""
    world = method.trainer.world_size
    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    for g in grads:
        dist.all_reduce(g)
        g.div_(world)


def fisher_loss(head, output, labels: torch.Tensor) -> torch.Tensor:
    """``fisher.loss: pixel_ce``: the per-pixel cross-entropy of the head's semantic prediction — log-softmax of a
    head's logits, or for a query head (Mask2Former, whose scores Σ_q softmax(class_q)·sigmoid(mask_q) are not
    logits) the log of the scores normalised over classes; ignored pixels (255) left out."""
    scores = head.logits(output, labels.shape[-2:]).float()
    if isinstance(head, QueryHead):
        logp = (scores.clamp_min(1e-12) / scores.sum(1, keepdim=True).clamp_min(1e-12)).log()
    else:
        logp = scores.log_softmax(1)
    return torch.nn.functional.nll_loss(logp, labels.long(), ignore_index=IGNORE_INDEX)
