"""Mask2Former's set criterion for semantic segmentation: one target mask per class present in the label, Hungarian
matching on point-sampled costs, class cross-entropy with a down-weighted no-object class, and mask BCE + Dice on
importance-sampled points (mmdet ``Mask2FormerHead.loss_by_feat`` semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def point_sample(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks (N, 1, H, W) or (N, H, W) at points (N, P, 2) in [0, 1] (x, y) -> (N, P), bilinear."""
    masks = masks[:, None] if masks.dim() == 3 else masks
    return F.grid_sample(masks, 2 * points[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float, importance: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """PointRend sampling: ``importance`` of the points where |logit| is smallest among ``oversample`` × as many
    random ones, the rest uniform. logits (N, H, W) -> points (N, num_points, 2)."""
    n = logits.shape[0]
    cand = torch.rand(n, int(num_points * oversample), 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits.detach(), cand).abs()
    k = int(importance * num_points)
    idx = uncertainty.topk(k, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=logits.device, generator=generator)
    return torch.cat([chosen, rest], dim=1)


def semantic_targets(
    label: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per class present (ignored pixels belong to none): (classes (M,), masks (M, H, W) float)."""
    classes = torch.unique(label)
    classes = classes[(classes != ignore_index) & (classes < num_classes)]
    return classes, (label[None] == classes[:, None, None]).float()


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of targets (columns) to queries (rows): (query indices, target indices)."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def dice_cost(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(Q, P) logits vs (M, P) binary -> (Q, M) 1 − naive Dice."""
    p = pred.sigmoid()
    return 1 - (2 * p @ target.T + eps) / (p.sum(-1)[:, None] + target.sum(-1)[None] + eps)


def bce_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits vs (M, P) binary -> (Q, M) mean binary cross-entropy over the points."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.T + neg @ (1 - target).T) / pred.shape[-1]


def mask_normaliser(avg_factor: int, device: torch.device) -> float:
    """The divisor of the mask BCE and Dice losses, as mmdet's ``Mask2FormerHead._loss_by_feat_single``:
    ``max(reduce_mean(Σ_images max(matched_i, 1)), 1)`` — the per-image count floored at one (an image with nothing
    labelled still counts once), averaged over the ranks of a distributed run."""
    n = torch.tensor(float(avg_factor), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return max(float(n), 1.0)


class SetCriterion:
    """Losses of one prediction set (class logits (B, Q, K+1), mask logits (B, Q, h, w)) against semantic labels."""

    def __init__(self, num_classes: int, ignore_index: int = 255, num_points: int = 12544, oversample: float = 3.0,
                 importance: float = 0.75, no_object_weight: float = 0.1, weight_cls: float = 2.0,
                 weight_mask: float = 5.0, weight_dice: float = 5.0):  # fmt: skip
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_points, self.oversample, self.importance = num_points, oversample, importance
        self.class_weight = torch.ones(num_classes + 1)
        self.class_weight[-1] = no_object_weight
        self.w_cls, self.w_mask, self.w_dice = weight_cls, weight_mask, weight_dice

    @torch.no_grad()
    def match(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor,
              masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """One image: Hungarian matching on class 2.0 / mask BCE 5.0 / Dice 5.0 costs over shared random points."""
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        pred = point_sample(mask_logits, points.expand(mask_logits.shape[0], -1, -1))
        tgt = point_sample(masks, points.expand(masks.shape[0], -1, -1))
        cost = (-self.w_cls * cls_logits.softmax(-1)[:, classes] + self.w_mask * bce_cost(pred, tgt)
                + self.w_dice * dice_cost(pred, tgt))  # fmt: skip
        return hungarian(cost)

    def normaliser(self, labels: torch.Tensor) -> float:
        """:func:`mask_normaliser` of a batch: every prediction layer matches every target, so one value serves all
        layers (one all-reduce and one host sync per batch, not per layer). mmdet's ``SamplingResult.avg_factor``:
        max(matched, 1) per image."""
        count = sum(
            max(len(semantic_targets(lab, self.num_classes, self.ignore_index)[0]), 1) for lab in labels
        )
        return mask_normaliser(count, labels.device)

    def __call__(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                 normaliser: float | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The losses of one prediction layer; ``normaliser``: the batch's :meth:`normaliser` (computed if None)."""
        b, q, _ = cls_logits.shape
        targets = torch.full((b, q), self.num_classes, dtype=torch.long, device=cls_logits.device)
        preds, gts = [], []
        n = (
            self.normaliser(labels) if normaliser is None else normaliser
        )  # before any early return: ranks reduce
        for i in range(b):
            classes, masks = semantic_targets(labels[i], self.num_classes, self.ignore_index)
            if not len(classes):
                continue
            rows, cols = self.match(cls_logits[i].float(), mask_logits[i].float(), classes, masks)
            targets[i, rows.to(targets.device)] = classes[cols.to(classes.device)]
            preds.append(mask_logits[i][rows])
            gts.append(masks[cols])
        loss_cls = F.cross_entropy(cls_logits.transpose(1, 2).float(), targets,
                                   weight=self.class_weight.to(cls_logits.device))  # fmt: skip
        if not preds:  # nothing labelled in the batch: only the no-object term
            zero = mask_logits.sum() * 0
            return {"loss_cls": self.w_cls * loss_cls, "loss_mask": zero, "loss_dice": zero}
        pred, gt = torch.cat(preds).float(), torch.cat(gts)
        points = uncertain_points(pred, self.num_points, self.oversample, self.importance)
        p, t = point_sample(pred, points), point_sample(gt, points)
        loss_mask = F.binary_cross_entropy_with_logits(p, t, reduction="sum") / (n * self.num_points)
        s = p.sigmoid()
        loss_dice = (1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)).sum() / n
        return {
            "loss_cls": self.w_cls * loss_cls,
            "loss_mask": self.w_mask * loss_mask,
            "loss_dice": self.w_dice * loss_dice,
        }
