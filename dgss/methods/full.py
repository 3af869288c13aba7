"""Full fine-tuning: every parameter trains; the backbone at 0.1 x the head's lr (Rein paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.options import register


@dataclass
class FullConfig(MethodConfig):
    _target_: str = "dgss.methods.full.FullFineTune"


class FullFineTune(SegmentationMethod):
    # Rein's full fine-tuning baseline: its 512 config plus backbone=dict(lr_mult=0.1) in custom_keys (w1oves/Rein
    # issue #97); mmengine tries the longer key first, so "backbone" (not "norm") decides for every backbone tensor
    recipe_custom_keys = {"backbone": {"lr_mult": 0.1}}


register(FullConfig, "method", "full_schema")
