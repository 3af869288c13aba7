"""A light segmentation head: multi-level features -> per-pixel class logits (SegFormer-style MLP decoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError
from dgss.schemas import register_signature


class LightHead(nn.Module):
    """Project each level to ``channels``, resize to the finest level, fuse, classify.

    ``forward(features, queries=None) -> logits`` at the finest feature resolution;
    ``loss(output, labels)`` is cross-entropy (ignore 255) on logits upsampled to the label size;
    ``logits(output, size)`` resizes to any size.

    Args:
        in_channels: channels of the backbone features (from the method).
        num_classes: K (from the method).
        channels: the width every level is projected to.
        dropout: before the classifier.
        upsample: learned x2 upsampling steps after the fusion (a power of two; for small patch grids).
        loss_weight: the cross-entropy's weight.
        ignore_index: the label value left out of the loss.
        tiny: accepted for ``debug=tiny`` (this head is small already).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        upsample: int = 1,
        loss_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        tiny: bool = False,  # accepted for debug=tiny; this head is small already
    ):
        super().__init__()
        if upsample < 1 or upsample & (upsample - 1):
            raise ConfigError(f"head.upsample={upsample} must be a power of two (1, 2, 4, ...)")
        self.num_classes, self.ignore_index, self.loss_weight = num_classes, ignore_index, loss_weight
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels * len(in_channels), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(True),
        )
        # optional learned ×2 steps: finer logits for small patch grids (the embedded data on CPU)
        self.up = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True))
            for _ in range(int(upsample).bit_length() - 1)
        ])  # fmt: skip
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], queries: torch.Tensor | None = None) -> torch.Tensor:
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        maps = [
            F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
            if f.shape[-2:] != size
            else p(f)
            for p, f in zip(self.proj, features)
        ]
        x = self.up(self.fuse(torch.cat(maps, dim=1)))
        return self.classifier(self.dropout(x))

    def logits(self, output: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(output.shape[-2:]) == tuple(size):
            return output
        return F.interpolate(output, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(output, labels.shape[-2:])
        return {
            "loss_ce": self.loss_weight
            * F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index)
        }


# head=light: the method supplies in_channels and num_classes (a partial node)
register_signature(LightHead, "head", "light_schema", supplied=("in_channels", "num_classes"), partial=True)
