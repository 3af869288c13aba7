"""Train and test pipelines on torchvision.transforms.v2 (image and label transformed together).

Train (Rein's 512 recipe by default): random shortest-edge resize (16 scales in ``short_edge``, long edge
capped), random crop padded with image 0 / label 255, horizontal flip, photometric distortion, normalise.
Test: keep-ratio resize of the image only to fit ``size`` (long, short); the label keeps its original
resolution, and logits are upsampled to it (Rein protocol, data spec §4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainPipeline:
    def __init__(
        self,
        crop: Sequence[int] = (512, 512),
        short_edge: Sequence[int] | None = (256, 1024),
        max_long_edge: int = 2048,
        num_scales: int = 16,
        flip: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        crop = (int(crop), int(crop)) if isinstance(crop, int) else tuple(int(c) for c in crop)
        if len(crop) != 2 or min(crop) <= 0:
            raise ConfigError(
                f"data.train_pipeline.crop={list(crop)} must be [height, width] with positive sizes"
            )
        steps: list[v2.Transform] = []
        if short_edge is not None:
            lo, hi = (int(v) for v in short_edge)
            if not 0 < lo <= hi:
                raise ConfigError(f"data.train_pipeline.short_edge=[{lo}, {hi}] must satisfy 0 < low <= high")
            n = max(int(num_scales), 1)
            sizes = sorted({round(lo + (hi - lo) * k / max(n - 1, 1)) for k in range(n)})
            steps.append(v2.RandomShortestSize(min_size=sizes, max_size=max_long_edge, antialias=True))
        steps.append(
            v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
        )
        if flip:
            steps.append(v2.RandomHorizontalFlip(flip))
        if (
            photometric
        ):  # mmseg PhotoMetricDistortion ranges: brightness ±32/255, contrast/saturation 0.5-1.5, hue ±18°
            steps.append(v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05))
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                  v2.Normalize(mean, std)]  # fmt: skip
        self.crop = crop
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))
        return img.as_subclass(torch.Tensor), lab.as_subclass(torch.Tensor)


class TestPipeline:
    """Resize the image (keep ratio) to fit ``size`` = (long, short) — or leave it — and normalise."""

    __test__ = False  # not a pytest class

    def __init__(self, size: Sequence[int] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = tuple(size) if size is not None else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def with_size(self, size: Sequence[int]) -> TestPipeline:
        return TestPipeline(size, self.mean, self.std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size is not None:
            h, w = image.shape[-2:]
            long_t, short_t = max(self.size), min(self.size)
            scale = min(long_t / max(h, w), short_t / min(h, w))
            image = v2.functional.resize(image, [round(h * scale), round(w * scale)], antialias=True)
        return self.normalize(image), label.long()
