"""The 19 Cityscapes train classes and their palette (label-id maps come with the real data sets).

trainId 0..18, ignore = 255 everywhere (label padding, unmapped ids, the metric's ``ignore_index``).
Custom data sets pass their own ``ClassSet`` (names + palette); nothing else in the code assumes 19.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


@dataclass(frozen=True)
class ClassSet:
    """Names and colours of a label space; index = trainId."""

    names: tuple[str, ...] = CITYSCAPES_CLASSES
    palette: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(
                f"class set has {len(self.names)} names but {len(self.palette)} palette colours; give one colour per class"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """(H, W) trainIds -> (H, W, 3) uint8 colours; ignore (255) is black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[label]


CITYSCAPES = ClassSet()
