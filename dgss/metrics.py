"""Per-domain, per-class IoU from one confusion matrix per target (exact under DDP: states are summed)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from dgss.data.classes import IGNORE_INDEX


class DomainIoU(nn.Module):
    """One ``MulticlassJaccardIndex`` (per-class, NaN where a class is absent from label and prediction) per domain,
    and per domain the number of images scored and of images skipped (unreadable, ``on_bad: skip``)."""

    def __init__(self, domains: Sequence[str], num_classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.domains = list(domains)
        self.metrics = nn.ModuleList(
            MulticlassJaccardIndex(
                num_classes=num_classes, ignore_index=ignore_index, average=None,
                zero_division=float("nan"), validate_args=False,
            )
            for _ in self.domains
        )  # fmt: skip
        self.images = nn.ModuleList(SumMetric() for _ in self.domains)
        self.skipped = nn.ModuleList(SumMetric() for _ in self.domains)

    def update(self, domain_idx: int, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.metrics[domain_idx].update(preds, target)
        self.images[domain_idx].update(float(preds.shape[0]))

    def skip(self, domain_idx: int, n: int) -> None:
        self.skipped[domain_idx].update(float(n))

    def counts(self) -> dict[str, dict[str, int]]:
        """``{domain: {"images": scored, "skipped": left out}}`` (summed over ranks)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
            return {d: {"images": int(i.compute()), "skipped": int(k.compute())}
                    for d, i, k in zip(self.domains, self.images, self.skipped)}  # fmt: skip

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-class IoU in [0, 1] for every domain (all ranks compute all of them: the sync is collective)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
            return {d: m.compute() for d, m in zip(self.domains, self.metrics)}

    def reset(self) -> None:
        for m in (*self.metrics, *self.images, *self.skipped):
            m.reset()


def summarize(per_class: dict[str, torch.Tensor], mean_over: Sequence[str] | None = None) -> dict[str, float]:
    """``{<domain>/mIoU: ..., mean_mIoU: ...}`` in percent; mIoU is the nanmean over classes, the mean is
    the arithmetic mean of the per-domain mIoUs over ``mean_over`` (default: all domains)."""
    out = {f"{d}/mIoU": float(iou.nanmean()) * 100 for d, iou in per_class.items()}
    names = list(per_class) if mean_over is None else list(mean_over)
    vals = [out[f"{d}/mIoU"] for d in names if f"{d}/mIoU" in out and not math.isnan(out[f"{d}/mIoU"])]
    out["mean_mIoU"] = sum(vals) / len(vals) if vals else float("nan")
    return out
