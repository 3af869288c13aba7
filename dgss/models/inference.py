"""Whole-image and sliding-window inference (mmseg semantics: window logits averaged by overlap count)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dgss.errors import ConfigError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, h, w) -> logits (B, K, h, w)


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def whole(fn: LogitsFn, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a patch multiple, predict, crop back."""
    h, w = images.shape[-2:]
    return fn(pad_to_multiple(images, multiple))[..., :h, :w]


def slide(
    fn: LogitsFn, images: torch.Tensor, crop: Sequence[int], stride: Sequence[int], multiple: int
) -> torch.Tensor:
    """Windows of ``crop`` every ``stride`` (last window flush with the border), logits / overlap count."""
    ch, cw = crop
    sh, sw = stride
    h, w = images.shape[-2:]
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = count = None
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y1, x1 = min(y0 + ch, h), min(x0 + cw, w)
            win = whole(fn, images[..., y0:y1, x0:x1], multiple)
            if out is None:
                out = images.new_zeros((images.shape[0], win.shape[1], h, w))
                count = images.new_zeros((1, 1, h, w))
            out[..., y0:y1, x0:x1] += win
            count[..., y0:y1, x0:x1] += 1
    return out / count


def predict(
    fn: LogitsFn,
    images: torch.Tensor,
    out_size: Sequence[int],
    multiple: int,
    mode: str = "whole",
    crop: Sequence[int] | int = 512,
    stride: Sequence[int] | int = 341,
) -> torch.Tensor:
    """Logits at ``out_size`` (bilinear), e.g. the original label resolution."""
    if mode == "whole":
        logits = whole(fn, images, multiple)
    elif mode == "slide":
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        logits = slide(fn, images, pair(crop), pair(stride), multiple)
    else:
        raise ConfigError(f"method.inference.mode={mode!r}; choose 'whole' or 'slide'")
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits
