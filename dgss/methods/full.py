"""Full fine-tuning: every parameter trains; the backbone at 0.1 x the head's lr (Rein paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.options import register


@dataclass
class FullConfig(MethodConfig):
    _target_: str = "dgss.methods.full.FullFineTune"


class FullFineTune(SegmentationMethod):
    default_lr_mults = {"backbone": 0.1}


register(FullConfig, "method", "full_schema")
