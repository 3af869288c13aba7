"""Whole-image and sliding-window inference with optional flip / multi-scale test-time augmentation.

Sliding windows follow mmseg: windows of ``crop`` every ``stride``, the last one flush with the border, logits
averaged by the number of windows covering each pixel. The windows of a batch are cut once and run through the
model ``window_batch`` at a time. TTA averages softmax probabilities over scales × flips, each resized to the
output size first; without TTA the raw logits are returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from dgss.errors import ConfigError
from dgss.options import Options, option_path

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, h, w) -> logits (B, K, h, w)
Box = tuple[int, int, int, int]  # y0, x0, y1, x1


@dataclass
class InferenceOptions(Options):
    """``method.inference``: how validation, ``dgss-eval`` and ``dgss-predict`` run the model."""

    mode: Literal["whole", "slide"] = "whole"  # slide: windows of ``crop`` every ``stride``, logits averaged
    crop: int = 512
    stride: int = 341
    window_batch: int = 8  # slide: windows per forward pass
    flip: bool = False  # TTA: also the mirrored image
    scales: list[float] = field(default_factory=lambda: [1.0])  # TTA, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

    def __post_init__(self) -> None:
        super().__post_init__()
        where = option_path(self)
        for name in ("crop", "stride", "window_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"{where}.scales={self.scales} must be positive factors, e.g. [1.0]")


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def whole(fn: LogitsFn, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a patch multiple, predict, crop back."""
    h, w = images.shape[-2:]
    return fn(pad_to_multiple(images, multiple))[..., :h, :w]


def windows(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[Box]:
    """The sliding-window boxes over a ``height`` × ``width`` image (all of one size, at most ``crop``)."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, max(height - ch, 0)), min(c * sw, max(width - cw, 0))
            boxes.append((y0, x0, min(y0 + ch, height), min(x0 + cw, width)))
    return boxes


def slide(fn: LogitsFn, images: torch.Tensor, crop: Sequence[int], stride: Sequence[int], multiple: int,
          window_batch: int = 8) -> torch.Tensor:  # fmt: skip
    """Windows of every image, ``window_batch`` windows per forward; logits summed and divided by overlap."""
    b, _, h, w = images.shape
    boxes = windows(h, w, crop, stride)
    crops = torch.cat(
        [images[..., y0:y1, x0:x1] for y0, x0, y1, x1 in boxes]
    )  # (n·B, 3, ch, cw), window-major
    logits = torch.cat([whole(fn, chunk, multiple) for chunk in crops.split(max(window_batch, 1))])
    out = images.new_zeros((b, logits.shape[1], h, w))
    count = images.new_zeros((1, 1, h, w))
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        out[..., y0:y1, x0:x1] += logits[k * b : (k + 1) * b]
        count[..., y0:y1, x0:x1] += 1
    return out / count


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def predict(
    fn: LogitsFn,
    images: torch.Tensor,
    out_size: Sequence[int],
    multiple: int,
    mode: str = "whole",
    crop: Sequence[int] | int = 512,
    stride: Sequence[int] | int = 341,
    window_batch: int = 8,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """Scores at ``out_size`` (bilinear), e.g. the original label resolution: logits, or with TTA (``flip`` or
    several ``scales``) the mean softmax probabilities."""
    if mode not in ("whole", "slide"):
        raise ConfigError(f"method.inference.mode={mode!r}; choose 'whole' or 'slide'")
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise ConfigError(
            f"method.inference.scales={scales} must be positive factors, e.g. [0.75, 1.0, 1.25]"
        )

    def once(x: torch.Tensor) -> torch.Tensor:
        logits = (whole(fn, x, multiple) if mode == "whole"
                  else slide(fn, x, _pair(crop), _pair(stride), multiple, window_batch))  # fmt: skip
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    if not flip and scales == [1.0]:
        return once(images)
    h, w = images.shape[-2:]
    total = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(round(h * s), round(w * s)), mode="bilinear",
                                                  align_corners=False)  # fmt: skip
        for flipped in (False, True) if flip else (False,):
            probs = once(x.flip(-1) if flipped else x).softmax(1)
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
