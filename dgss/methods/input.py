"""The model's input, as mmseg's ``SegDataPreProcessor`` does it: the data hands out uint8 RGB images and labels, the
model normalises them with its backbone's mean / std and pads a training batch to the training crop. The crop is a
data fact linked into the method's config when it is composed (``method.input.crop: ${data.train_pipeline.crop}``,
conf/method/_common.yaml), not read from the data module at run time.

mmseg: https://github.com/open-mmlab/mmsegmentation/blob/main/mmseg/models/data_preprocessor.py
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError
from dgss.options import Options, option_path


@dataclass
class InputOptions(Options):
    """``method.input``.

    Args:
        crop: [height, width] every training batch is padded to (bottom / right); empty pads a batch to its largest
            image. The recipes link it to ``data.train_pipeline.crop``.
    """

    crop: list[int] = field(default_factory=list)  # (not Optional: OmegaConf resolves those while merging)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop and (len(self.crop) != 2 or min(self.crop) < 1):
            raise ConfigError(
                f"{option_path(self)}.crop={list(self.crop)} must be [height, width], both >= 1"
            )


class SegInput(nn.Module):
    """uint8 RGB in, normalised float out; a training batch padded to ``crop`` and stacked.

    Args:
        mean, std: the normalisation in [0, 1] units (the backbone's), per RGB channel.
        crop: [height, width] of a training batch (:class:`InputOptions`).

    >>> pre = SegInput((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop=(4, 4))
    >>> images, labels = pre({"image": [torch.full((3, 2, 4), 255, dtype=torch.uint8)],
    ...                       "label": [torch.zeros(2, 4, dtype=torch.uint8)]})
    >>> images.shape, images[0, 0, :, 0].tolist(), labels[0, :, 0].tolist()
    (torch.Size([1, 3, 4, 4]), [1.0, 1.0, 0.0, 0.0], [0, 0, 255, 255])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop: Sequence[int] | None = None):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(3, 1, 1) * 255, persistent=False)
        self.crop: tuple[int, int] | None = tuple(crop) if crop else None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images (..., 3, H, W) -> float32 normalised with the backbone's mean / std."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"the model takes uint8 RGB images and normalises them itself; got {images.dtype}"
            )
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch as the model takes it: every uint8 image normalised, then images and labels padded
        bottom / right to the crop (image 0, label 255; mmseg's order, so padding never enters the flip or the
        photometric distortion) and stacked; labels as int64."""
        images, labels = list(batch["image"]), list(batch["label"])
        h, w = self.crop or (max(x.shape[-2] for x in images), max(x.shape[-1] for x in images))
        if all(
            tuple(x.shape[-2:]) == (h, w) for x in images
        ):  # nothing to pad: the whole batch in a few kernels
            return self.normalize(torch.stack(images)), torch.stack(labels).long()
        x = torch.stack([F.pad(self.normalize(im), (0, w - im.shape[-1], 0, h - im.shape[-2]), value=0.0)
                         for im in images])  # fmt: skip
        y = torch.stack([F.pad(lab.long(), (0, w - lab.shape[-1], 0, h - lab.shape[-2]), value=IGNORE_INDEX)
                         for lab in labels])  # fmt: skip
        return x, y
