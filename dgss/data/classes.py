"""The 19 Cityscapes train classes and their palette (label-id maps come with the real data sets).

trainId 0..18, ignore = 255 everywhere (label padding, unmapped ids, the metric's ``ignore_index``).
Custom data sets pass their own ``ClassSet`` (names + palette); nothing else in the code assumes 19.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgss.errors import ConfigError

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

    @classmethod
    def build(cls, num_classes: int | None = None, class_names=None, palette=None) -> ClassSet:
        """The label space of a data config: Cityscapes by default; custom names (or ``class_<i>``) with their
        palette, or fixed pseudo-random colours where none is given."""
        if class_names:
            names = tuple(class_names)
        elif num_classes in (None, len(CITYSCAPES_CLASSES)):
            names = CITYSCAPES_CLASSES
        else:
            names = tuple(f"class_{i}" for i in range(num_classes))
        if num_classes is not None and num_classes != len(names):
            raise ConfigError(
                f"data.num_classes={num_classes} but data.class_names has {len(names)} names; make them agree"
            )
        if palette is None and len(names) == len(CITYSCAPES_CLASSES):
            palette = CITYSCAPES_PALETTE
        elif palette is None:
            palette = np.random.default_rng(0).integers(0, 256, (len(names), 3)).tolist()
        return cls(names, tuple(tuple(int(v) for v in c) for c in palette))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """(H, W) trainIds -> (H, W, 3) uint8 colours; ignore (255) is black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[label]


CITYSCAPES = ClassSet()
