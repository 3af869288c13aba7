"""Frozen backbone: only the head trains; the backbone stays in eval mode (no dropout / drop-path)."""

from __future__ import annotations

from dgss.methods.base import SegmentationMethod


class FrozenBackbone(SegmentationMethod):
    def configure_tuning(self) -> None:
        self.freeze(self.backbone)
