"""Frozen backbone: only the head trains; the backbone stays in eval mode (no dropout / drop-path)."""

from __future__ import annotations

from dataclasses import dataclass

from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.options import register


@dataclass
class FrozenConfig(MethodConfig):
    _target_: str = "dgss.methods.frozen.FrozenBackbone"


class FrozenBackbone(SegmentationMethod):
    # configs/frozen_vfms/dinov2-L_mask2former.py adds query_feat to the keys without decay
    recipe_custom_keys = {"query_feat": {"decay_mult": 0.0}}

    def configure_tuning(self) -> None:
        self.freeze(self.backbone)


register(FrozenConfig, "method", "frozen_schema")
