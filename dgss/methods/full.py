"""Full fine-tuning: every parameter trains; the backbone at 0.1 x the head's lr (Rein paper's baseline)."""

from __future__ import annotations

from dgss.methods.base import SegmentationMethod


class FullFineTune(SegmentationMethod):
    default_lr_mults = {"backbone": 0.1}
