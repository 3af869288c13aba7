"""Mask2Former's set criterion for semantic segmentation: one target mask per class present in the label, Hungarian
matching on point-sampled costs, class cross-entropy with a down-weighted no-object class, and mask BCE + Dice on
importance-sampled points (mmdet ``Mask2FormerHead.loss_by_feat`` semantics).

The whole step at once (every prediction layer, every image): the classes present come to the host in one small copy,
every layer's cost matrices for every image are computed together (targets padded to the batch's most classes) and
reach the host in one copy, scipy assigns each matrix, and every match goes back in one non-blocking copy; the losses
of all layers are then computed batched. The random draws are the ones the per-layer computation made, in its order
(per layer: one cost-point set per labelled image, then the candidate and uniform points of the mask losses), so the
losses equal that computation's (``tests/helpers/per_layer_criterion.py``) to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


def point_sample(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks (N, 1, H, W) or (N, H, W) at points (N, P, 2) in [0, 1] (x, y) -> (N, P), bilinear."""
    masks = masks[:, None] if masks.dim() == 3 else masks
    return F.grid_sample(masks, 2 * points[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def uncertain_points(logits: torch.Tensor, candidates: torch.Tensor, uniform: torch.Tensor,
                     num_uncertain: int) -> torch.Tensor:  # fmt: skip
    """PointRend sampling from given draws: of the ``candidates`` (N, C, 2), the ``num_uncertain`` where |logit| is
    smallest, then the ``uniform`` points (N, R, 2). logits (N, H, W) -> points (N, num_uncertain + R, 2)."""
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, uniform], dim=1)


def class_presence(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B, K) bool: which classes occur in each label map (ignored pixels and ids ≥ K count for none), on the
    labels' device without a host synchronisation (a scatter, not ``torch.unique``)."""
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    bins = torch.where(valid, labels, num_classes).flatten(1)
    present = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    return present.scatter_(1, bins, True)[:, :num_classes]


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without making the host wait: pinned and copied non-blocking on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return (t.pin_memory() if torch.cuda.is_available() else t).to(device, non_blocking=True)
    return t.to(device)


def assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of targets (columns) to queries (rows): (query indices ascending, target indices)."""
    return linear_sum_assignment(cost)


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`assign` of one cost tensor: (query indices, target indices) as int64 tensors."""
    rows, cols = assign(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def dice_cost(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(..., Q, P) logits vs (..., M, P) binary -> (..., Q, M) 1 − naive Dice."""
    p = pred.sigmoid()
    return 1 - (2 * p @ target.transpose(-1, -2) + eps) / (p.sum(-1)[..., :, None] + target.sum(-1)[..., None, :]
                                                            + eps)  # fmt: skip


def bce_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) logits vs (..., M, P) binary -> (..., Q, M) mean binary cross-entropy over the points."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.transpose(-1, -2) + neg @ (1 - target).transpose(-1, -2)) / pred.shape[-1]


def mask_normaliser(avg_factor: int, device: torch.device) -> float:
    """The divisor of the mask BCE and Dice losses, as mmdet's ``Mask2FormerHead._loss_by_feat_single``:
    ``max(reduce_mean(Σ_images max(matched_i, 1)), 1)`` — the per-image count floored at one (an image with nothing
    labelled still counts once), averaged over the ranks of a distributed run (only then a device round trip)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return max(float(avg_factor), 1.0)
    n = torch.tensor(float(avg_factor), device=device)
    torch.distributed.all_reduce(n)
    return max(float(n / torch.distributed.get_world_size()), 1.0)


@dataclass
class BatchTargets:
    """The semantic targets of a batch: per image the classes present (ascending, on the host), and on the device
    their ids and binary masks padded to the batch's most classes (id −1 and an empty mask past each image's own)."""

    classes: list[np.ndarray]  # per image (M_i,)
    ids: torch.Tensor  # (B, M) int64, −1 padded
    masks: torch.Tensor  # (B, M, H, W) float

    @classmethod
    def build(cls, labels: torch.Tensor, num_classes: int, ignore_index: int) -> BatchTargets:
        present = class_presence(labels, num_classes, ignore_index).cpu().numpy()  # one small host copy
        classes = [np.flatnonzero(row) for row in present]
        ids = np.full((len(classes), max([1, *map(len, classes)])), -1, dtype=np.int64)
        for i, c in enumerate(classes):
            ids[i, : len(c)] = c
        ids_t = to_device(ids, labels.device)
        return cls(classes, ids_t, (labels[:, None] == ids_t[:, :, None, None]).float())

    @property
    def counts(self) -> list[int]:
        return [len(c) for c in self.classes]


class SetCriterion(nn.Module):
    """Losses of prediction sets (class logits (B, Q, K+1), mask logits (B, Q, h, w) per layer) against semantic
    labels. A module only so that its class weights follow the head's device (a buffer, not in the state dict)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, num_points: int = 12544, oversample: float = 3.0,
                 importance: float = 0.75, no_object_weight: float = 0.1, weight_cls: float = 2.0,
                 weight_mask: float = 5.0, weight_dice: float = 5.0):  # fmt: skip
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_points, self.oversample, self.importance = num_points, oversample, importance
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.w_cls, self.w_mask, self.w_dice = weight_cls, weight_mask, weight_dice

    def targets(self, labels: torch.Tensor) -> BatchTargets:
        return BatchTargets.build(labels, self.num_classes, self.ignore_index)

    def normaliser(self, targets: BatchTargets) -> float:
        """:func:`mask_normaliser` of a batch; every prediction layer matches every target, so one value serves all
        layers. mmdet's ``SamplingResult.avg_factor``: max(matched, 1) per image."""
        return mask_normaliser(sum(max(m, 1) for m in targets.counts), targets.ids.device)

    @torch.no_grad()
    def costs(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, targets: BatchTargets,
              points: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Matching costs of L layers × B images (L, B, Q, M): class 2.0 / mask BCE 5.0 / Dice 5.0 over the random
        ``points`` (L, B, P, 2) shared by an image's queries and targets in one layer. In float32 with autocast off,
        as the official matcher computes them (under ``bf16-mixed`` the matmuls would otherwise run in bf16 and the
        matches could differ from the paper's). Columns past an image's own classes are padding."""
        (ll, b, q, _), m, p = cls_logits.shape, targets.ids.shape[1], points.shape[2]
        with torch.autocast(mask_logits.device.type, enabled=False):
            grid = 2 * points.float() - 1
            # the queries' masks as channels: one bilinear sample of every layer's and image's masks
            pred = F.grid_sample(mask_logits.float().flatten(0, 1), grid.flatten(0, 1)[:, :, None],
                                 align_corners=False).view(ll, b, q, p)  # fmt: skip
            # each target mask once, at its image's points of every layer
            tgt = F.grid_sample(targets.masks.float(), grid.transpose(0, 1).reshape(b, ll * p, 1, 2),
                                align_corners=False).view(b, m, ll, p).permute(2, 0, 1, 3)  # fmt: skip
            prob = cls_logits.float().softmax(-1)
            cls_cost = prob.gather(-1, targets.ids.clamp(min=0)[None, :, None, :].expand(ll, b, q, m))
            return (
                -self.w_cls * cls_cost
                + self.w_mask * bce_cost(pred, tgt)
                + self.w_dice * dice_cost(pred, tgt)
            )

    def cost(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor,
             masks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One image's cost (Q, M) from its classes and masks, with freshly drawn points (:meth:`costs`)."""
        ids = classes[None].long()
        targets = BatchTargets([classes.cpu().numpy()], ids, masks[None].float())
        points = torch.rand(1, 1, self.num_points, 2, device=mask_logits.device)
        return self.costs(cls_logits[None, None], mask_logits[None, None], targets, points)[0, 0]

    def losses(self, cls_logits: Sequence[torch.Tensor], mask_logits: Sequence[torch.Tensor],
               labels: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """The class / mask / Dice losses of every prediction layer, each a (L,) tensor (layer order)."""
        ll, (b, q, _), device = len(cls_logits), cls_logits[0].shape, cls_logits[0].device
        targets = self.targets(labels)
        n = self.normaliser(targets)  # before anything can differ between ranks: ranks reduce
        counts = targets.counts
        labelled = [i for i in range(b) if counts[i]]
        num_matched = sum(min(q, counts[i]) for i in labelled)  # per layer
        p, k = self.num_points, int(self.importance * self.num_points)
        # the random draws, in the order the per-layer computation made them
        cost_points = torch.zeros(ll, b, p, 2, device=device)
        candidates = torch.empty(ll, num_matched, int(p * self.oversample), 2, device=device)
        uniform = torch.empty(ll, num_matched, p - k, 2, device=device)
        for per_image, cand, unif in zip(cost_points.unbind(0), candidates.unbind(0), uniform.unbind(0)):
            images = per_image.unbind(0)
            for i in labelled:
                images[i].uniform_()
            if num_matched:
                cand.uniform_()
                unif.uniform_()
        cls_all, masks_all = torch.stack(list(cls_logits)), torch.stack(list(mask_logits))
        # every cost matrix of the step in one host copy; the matches back in one copy
        host = self.costs(cls_all.detach(), masks_all.detach(), targets, cost_points).cpu().numpy()
        m = targets.ids.shape[1]
        cls_targets = np.full((ll, b, q), self.num_classes, dtype=np.int64)
        where = []  # per match: flat index of its prediction (layer, image, query), of its target (image, class)
        for layer in range(ll):
            for i in labelled:
                rows, cols = assign(host[layer, i, :, : counts[i]])
                cls_targets[layer, i, rows] = targets.classes[i][cols]
                where.append(np.stack([(layer * b + i) * q + rows, i * m + cols, np.full_like(rows, layer)]))
        index = np.concatenate([cls_targets.reshape(-1), *(np.concatenate(where, 1) if where else [])])
        index = to_device(index, device)
        cls_t = index[: ll * b * q].view(ll, b * q)
        w = self.class_weight
        ce = F.cross_entropy(cls_all.flatten(0, 2).float(), cls_t.reshape(-1), weight=w, reduction="none")
        loss_cls = ce.view(ll, b * q).sum(1) / w[cls_t].sum(1)
        if not num_matched:  # nothing labelled in the batch: only the no-object term
            zero = masks_all.flatten(1).sum(1) * 0
            return {"loss_cls": self.w_cls * loss_cls, "loss_mask": zero, "loss_dice": zero}
        pred_at, tgt_at, layer_at = index[ll * b * q :].view(3, -1)
        pred = masks_all.flatten(0, 2)[pred_at].float()  # (L·N, h, w), layer by layer in match order
        points = uncertain_points(pred, candidates.flatten(0, 1), uniform.flatten(0, 1), k)
        pt = point_sample(pred, points)
        # every target mask sampled once, at the points of its match in each layer
        grid = torch.zeros(b * m, ll, p, 2, device=device, dtype=points.dtype)
        grid[tgt_at, layer_at] = points
        gt = point_sample(targets.masks.flatten(0, 1), grid.flatten(1, 2)).view(b * m, ll, p)[
            tgt_at, layer_at
        ]
        loss_mask = F.binary_cross_entropy_with_logits(pt, gt, reduction="none").view(ll, -1).sum(1) / (n * p)
        s = pt.sigmoid()
        dice = 1 - (2 * (s * gt).sum(-1) + 1) / (s.sum(-1) + gt.sum(-1) + 1)
        loss_dice = dice.view(ll, -1).sum(1) / n
        return {
            "loss_cls": self.w_cls * loss_cls,
            "loss_mask": self.w_mask * loss_mask,
            "loss_dice": self.w_dice * loss_dice,
        }

    def forward(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """The losses of one prediction layer."""
        return {k: v[0] for k, v in self.losses([cls_logits], [mask_logits], labels).items()}
