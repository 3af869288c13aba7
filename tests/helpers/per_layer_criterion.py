"""The Mask2Former criterion as it was before issue 26 (commit 95c7aca): one prediction layer at a time, targets
by ``torch.unique`` per image, one host copy of the cost matrices and one of the matches per layer. Kept, unchanged
but for this header and the names, as the reference the batched criterion must equal (losses and every gradient
within rtol 1e-6, from the same random draws); at that commit it passed the mmdet re-derivation test."""

from __future__ import annotations

from dataclasses import dataclass

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
    return hungarian_many([cost])[0]


def hungarian_many(costs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`hungarian` of several cost matrices from one device-to-host copy (all of them flattened into one
    tensor): one synchronisation per prediction layer, not one per image. The matrices and the assignments are
    the ones a copy per matrix gives."""
    flat = torch.cat([c.detach().float().reshape(-1) for c in costs]).cpu().numpy()
    out, start = [], 0
    for c in costs:
        rows, cols = linear_sum_assignment(flat[start : start + c.numel()].reshape(c.shape))
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        start += c.numel()
    return out


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


@dataclass
class BatchTargets:
    """The semantic targets of a batch, made once and shared by every prediction layer: per image the classes
    present and their masks (views into ``masks``), and all of them concatenated (``classes``, ``masks``) with
    each image's ``offsets`` into them."""

    per_image: list[tuple[torch.Tensor, torch.Tensor]]
    classes: torch.Tensor  # (ΣM,)
    masks: torch.Tensor  # (ΣM, H, W) float
    offsets: list[int]

    @classmethod
    def build(cls, labels: torch.Tensor, num_classes: int, ignore_index: int) -> BatchTargets:
        found = [semantic_targets(lab, num_classes, ignore_index) for lab in labels]
        classes, masks = torch.cat([c for c, _ in found]), torch.cat([m for _, m in found])
        offsets, at = [], 0
        for c, _ in found:
            offsets.append(at)
            at += len(c)
        per_image = [(classes[o : o + len(c)], masks[o : o + len(c)]) for o, (c, _) in zip(offsets, found)]
        return cls(per_image, classes, masks, offsets)


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
    def cost(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor,
             masks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One image's matching cost (Q, M): class 2.0 / mask BCE 5.0 / Dice 5.0 over shared random points, in
        float32 with autocast off, as the official matcher computes it (under ``bf16-mixed`` the cost matmuls would
        otherwise run in bf16 and the matches could differ from the paper's)."""
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        with torch.autocast(mask_logits.device.type, enabled=False):
            cls_logits, mask_logits, masks = cls_logits.float(), mask_logits.float(), masks.float()
            pred = point_sample(mask_logits, points.expand(mask_logits.shape[0], -1, -1))
            tgt = point_sample(masks, points.expand(masks.shape[0], -1, -1))
            return (-self.w_cls * cls_logits.softmax(-1)[:, classes] + self.w_mask * bce_cost(pred, tgt)
                    + self.w_dice * dice_cost(pred, tgt))  # fmt: skip

    def targets(self, labels: torch.Tensor) -> BatchTargets:
        """The batch's targets (one ``torch.unique`` per image), shared by every layer's call."""
        return BatchTargets.build(labels, self.num_classes, self.ignore_index)

    def normaliser(self, targets: BatchTargets) -> float:
        """:func:`mask_normaliser` of a batch: every prediction layer matches every target, so one value serves all
        layers (one all-reduce and one host sync per batch, not per layer). mmdet's ``SamplingResult.avg_factor``:
        max(matched, 1) per image."""
        count = sum(max(len(c), 1) for c, _ in targets.per_image)
        return mask_normaliser(count, targets.masks.device)

    def __call__(self, cls_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                 normaliser: float | None = None, targets: BatchTargets | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The losses of one prediction layer; ``normaliser`` / ``targets``: the batch's :meth:`normaliser` and
        :meth:`targets` (made here if None). Every image's cost matrix is made first (the random points drawn in
        image order), then one host copy matches them all."""
        b, q, _ = cls_logits.shape
        device = cls_logits.device
        targets = self.targets(labels) if targets is None else targets
        n = (
            self.normaliser(targets) if normaliser is None else normaliser
        )  # before any early return: ranks reduce
        labelled = [i for i, (c, _) in enumerate(targets.per_image) if len(c)]
        costs = [
            self.cost(cls_logits[i].float(), mask_logits[i].float(), *targets.per_image[i]) for i in labelled
        ]
        matches = hungarian_many(costs) if costs else []
        # (image, query, target) of every match, moved to the device in one copy
        index = torch.cat([torch.stack([torch.full_like(rows, i), rows, cols + targets.offsets[i]])
                           for i, (rows, cols) in zip(labelled, matches)], dim=1).to(device) if matches else None  # fmt: skip
        cls_targets = torch.full((b, q), self.num_classes, dtype=torch.long, device=device)
        if index is not None:
            cls_targets[index[0], index[1]] = targets.classes[index[2]]
        if self.class_weight.device != device:
            self.class_weight = self.class_weight.to(device)
        loss_cls = F.cross_entropy(cls_logits.transpose(1, 2).float(), cls_targets, weight=self.class_weight)
        if index is None:  # nothing labelled in the batch: only the no-object term
            zero = mask_logits.sum() * 0
            return {"loss_cls": self.w_cls * loss_cls, "loss_mask": zero, "loss_dice": zero}
        pred, gt = mask_logits[index[0], index[1]].float(), targets.masks[index[2]]
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


def per_layer_head_loss(
    criterion: SetCriterion, output: dict, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``Mask2FormerHead.loss`` as it was: the batch's targets once, then each layer's criterion in turn."""
    targets = criterion.targets(labels)
    n = criterion.normaliser(targets)
    per_layer = [criterion(c, m, labels, n, targets) for c, m in zip(output["cls"], output["masks"])]
    out = dict(per_layer[-1])
    out["loss_aux"] = sum(sum(d.values()) for d in per_layer[:-1])
    return out
