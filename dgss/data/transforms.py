"""Train and test pipelines on torchvision.transforms.v2 (image and label transformed together), uint8 in and out.

Train (Rein's 512 recipe, https://github.com/w1oves/Rein ``configs/_base_/datasets``): random shortest edge from a list (long edge capped), random crop with
``cat_max_ratio``, horizontal flip, mmseg's photometric distortion. A crop of an image smaller than the crop size
stays smaller: the model pads the batch, after normalising (``SegmentationMethod.prepare_batch``, as mmseg's
``SegDataPreProcessor``), so padding never enters the flip or the photometric distortion.
Test: keep-ratio resize of the image only to fit ``size`` (long, short); the label keeps its original
resolution, and logits are upsampled to it (Rein's protocol).

Resizing follows mmcv / mmseg (the Rein pipeline): sizes from ``ResizeShortestEdge._get_output_shape`` and
``mmcv.rescale_size`` (``int(x · scale + 0.5)``), images bilinear without antialiasing (cv2 ``INTER_LINEAR``; torch's
bilinear with ``antialias=False`` agrees within a grey level), labels nearest (cv2 ``INTER_NEAREST``'s indices, computed in double
as cv2 does). ``antialias=True`` is an option, off in the paper protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from dgss.data.classes import IGNORE_INDEX
from dgss.data.opencv_hsv import hsv_to_rgb, rgb_to_hsv
from dgss.errors import ConfigError


def mmcv_rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """(new_h, new_w) of ``mmcv.imrescale(img, scale)`` for a (long, short) target: the factor
    ``min(max(scale) / max(h, w), min(scale) / min(h, w))``, each side ``int(side · factor + 0.5)``."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def shortest_edge_size(h: int, w: int, short: int, max_long: int) -> tuple[int, int]:
    """(new_h, new_w) of mmseg's ``ResizeShortestEdge(scale=short, max_size=max_long)``: the shortest edge to
    ``short`` (the long edge capped at ``max_long``), rounded ``int(x + 0.5)``, then handed to mmcv's keep-ratio
    ``Resize`` as its (w, h) scale, which rescales once more (:func:`mmcv_rescale_size`)."""
    factor = short / min(h, w)
    new_h, new_w = (short, factor * w) if h < w else (factor * h, short)
    if max(new_h, new_w) > max_long:
        cap = max_long / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return mmcv_rescale_size(h, w, (int(new_w + 0.5), int(new_h + 0.5)))


def resize_image(image: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """uint8 CHW bilinear to (h, w), half-pixel centres, rounded; ``antialias=False`` = cv2 ``INTER_LINEAR``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return v2.functional.resize(image, list(size), v2.InterpolationMode.BILINEAR, antialias=antialias)


def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """cv2 ``resizeNN``'s source index per output index: ``min(floor(d · (1 / (out / in))), in − 1)`` in double
    (torch's ``nearest`` uses a float32 ratio and lands one pixel lower where ``d · in / out`` is an integer)."""
    ratio = 1.0 / (n_out / n_in)
    return (torch.arange(n_out, dtype=torch.float64) * ratio).floor().long().clamp_(max=n_in - 1)


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Labels (…, H, W) nearest to (h, w) as cv2 ``INTER_NEAREST`` (mmcv ``imrescale(..., 'nearest')``)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    ys, xs = _nearest_index(label.shape[-2], size[0]), _nearest_index(label.shape[-1], size[1])
    return label[..., ys[:, None], xs[None, :]]


def shortest_edges(short_edge: Sequence[int], num_scales: int) -> list[int]:
    """``num_scales`` evenly spaced shortest edges from ``short_edge`` = [low, high] (ints, truncated)."""
    lo, hi = (int(v) for v in short_edge)
    if not 0 < lo <= hi:
        raise ConfigError(f"data.train_pipeline.short_edge=[{lo}, {hi}] must satisfy 0 < low <= high")
    n = max(int(num_scales), 1)
    return sorted({int(lo + (hi - lo) * k / max(n - 1, 1) + 1e-6) for k in range(n)})


class CatMaxRatioCrop:
    """mmseg's ``RandomCrop`` with ``cat_max_ratio``: up to ``tries`` random crops until one has more than one class
    and none covering ``cat_max_ratio`` or more of its labelled pixels; after ``tries`` failures one more crop,
    unchecked (as mmseg). An image smaller than the crop gives a smaller crop (the model pads it).

    With ``prefer`` (rare-class sampling) the rule is instead: the first crop holding ≥ ``min_prefer_pixels`` of
    that class, else the try that held most of it.
    """

    def __init__(
        self, size: Sequence[int], cat_max_ratio: float = 0.75, tries: int = 10, min_prefer_pixels: int = 1500
    ):
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio, self.tries, self.min_prefer_pixels = (
            float(cat_max_ratio),
            int(tries),
            int(min_prefer_pixels),
        )

    def _box(self, h: int, w: int) -> tuple[int, int]:
        y = int(torch.randint(max(h - self.size[0], 0) + 1, ()))
        x = int(torch.randint(max(w - self.size[1], 0) + 1, ()))
        return y, x

    def _crop(self, t: torch.Tensor, box: tuple[int, int]) -> torch.Tensor:
        return t[..., box[0] : box[0] + self.size[0], box[1] : box[1] + self.size[1]]

    def choose(self, label: torch.Tensor, prefer: int | None = None) -> tuple[int, int]:
        h, w = label.shape[-2:]
        box, best = self._box(h, w), (-1, None)
        if prefer is None and self.cat_max_ratio >= 1.0:
            return box
        for _ in range(self.tries):
            crop = self._crop(label, box)
            if prefer is not None:
                n = int((crop == prefer).sum())
                if n >= self.min_prefer_pixels:
                    return box
                best = max(best, (n, box), key=lambda b: b[0])
            else:
                counts = torch.bincount(crop.flatten().long(), minlength=256)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                    return box
            box = self._box(h, w)
        return best[1] if prefer is not None else box

    def __call__(self, image: torch.Tensor, label: torch.Tensor, prefer: int | None = None):
        box = self.choose(label, prefer)
        return self._crop(image, box), self._crop(label, box)


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on uint8 CHW, each step with probability 0.5: additive brightness
    ±``brightness`` (of 255), contrast ×[lo, hi] (mmseg scales the pixel values), then saturation ×[lo, hi] and a
    hue shift drawn from [−``hue``, ``hue`` − 1] (numpy's ``randint(-18, 18)``: 18 excluded) on OpenCV's 0-180 scale,
    each through its own 8-bit HSV round trip as ``mmcv.bgr2hsv`` / ``hsv2bgr`` make it (OpenCV's fixed-point
    conversion, :mod:`dgss.data.opencv_hsv`: equal to cv2's); contrast first or last at random. Each value step is
    ``clip(x·α + β, 0, 255)`` truncated to uint8, as mmseg's ``convert``. The draws come from torch's generator in
    mmseg's order (brightness, mode, contrast, saturation, hue)."""

    def __init__(self, brightness: int = 32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: int = 18):
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness,
            tuple(contrast),
            tuple(saturation),
            hue,
        )

    @staticmethod
    def _coin() -> bool:
        return bool(torch.rand(()) < 0.5)

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return float(torch.empty(()).uniform_(lo, hi))

    @staticmethod
    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        """mmseg's ``convert``: float32 x·α + β, clipped to 0..255, truncated to uint8."""
        return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        if self._coin():
            img = self.convert(img, alpha=self._uniform(*self.contrast))
        return img

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        img = image.permute(1, 2, 0).numpy()  # HWC view
        if self._coin():
            img = self.convert(img, beta=self._uniform(-self.brightness, self.brightness))
        contrast_first = self._coin()
        if contrast_first:
            img = self._contrast(img)
        if self._coin():  # saturation
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = self.convert(hsv[..., 1], alpha=self._uniform(*self.saturation))
            img = hsv_to_rgb(hsv)
        if self._coin():  # hue
            hsv = rgb_to_hsv(img)
            shift = int(torch.randint(-self.hue, self.hue, ()))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = self._contrast(img)
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


class TrainPipeline:
    """Rein's 512 recipe by default: a random shortest edge from ``scales`` (long edge ≤ ``max_long_edge``),
    a ``crop`` with ``cat_max_ratio``, horizontal flip, photometric distortion; uint8 image and label out.

    Args:
        scales: the shortest edges to draw from (Rein: int(512·k·0.1), k = 5..20); or ``short_edge`` = [low, high]
            with ``num_scales`` evenly spaced values; neither = no resize.
        crop: [height, width]; the model pads smaller crops to it (``SegmentationMethod.prepare_batch``).
        antialias: antialiased downscaling; off = mmcv's cv2 bilinear (the paper protocol).
    """

    def __init__(
        self,
        crop: Sequence[int] = (512, 512),
        scales: Sequence[int] | None = None,
        short_edge: Sequence[int] | None = None,
        num_scales: int = 16,
        max_long_edge: int = 2048,
        cat_max_ratio: float = 0.75,
        flip: float = 0.5,
        photometric: bool = True,
        min_prefer_pixels: int = 1500,
        antialias: bool = False,
    ):
        crop = (int(crop), int(crop)) if isinstance(crop, int) else tuple(int(c) for c in crop)
        if len(crop) != 2 or min(crop) <= 0:
            raise ConfigError(
                f"data.train_pipeline.crop={list(crop)} must be [height, width] with positive sizes"
            )
        if scales is not None and short_edge is not None:
            raise ConfigError(
                "data.train_pipeline sets both scales and short_edge; keep one (null the other)"
            )
        if short_edge is not None:
            scales = shortest_edges(short_edge, num_scales)
        if scales is not None and (not scales or min(int(s) for s in scales) <= 0):
            raise ConfigError(f"data.train_pipeline.scales={list(scales)} must be positive shortest edges")
        self.scales = [int(s) for s in scales] if scales is not None else None
        self.max_long_edge, self.antialias = int(max_long_edge), bool(antialias)
        self.crop = crop
        self.cropper = CatMaxRatioCrop(crop, cat_max_ratio, min_prefer_pixels=min_prefer_pixels)
        self.flip = float(flip)
        self.photometric = PhotoMetricDistortion() if photometric else None

    def __call__(self, image: torch.Tensor, label: torch.Tensor, prefer: int | None = None):
        if self.scales:  # mmseg RandomChoiceResize(ResizeShortestEdge): one shortest edge drawn uniformly
            short = self.scales[int(torch.randint(len(self.scales), ()))]
            size = shortest_edge_size(*image.shape[-2:], short, self.max_long_edge)
            image, label = resize_image(image, size, self.antialias), resize_label(label, size)
        image, label = self.cropper(image, label, prefer)
        if self.flip and torch.rand(()) < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric is not None:
            image = self.photometric(image)
        return image.contiguous(), label.contiguous()


class TestPipeline:
    """Resize the image (keep ratio) to fit ``size`` = (long, short), or leave it; the label keeps its resolution."""

    __test__ = False  # not a pytest class

    def __init__(self, size: Sequence[int] | None = None, antialias: bool = False):
        self.size = tuple(size) if size is not None else None
        self.antialias = bool(antialias)

    def with_size(self, size: Sequence[int]) -> TestPipeline:
        return TestPipeline(size, self.antialias)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, prefer: int | None = None):
        if self.size is not None:  # mmcv Resize(scale=size, keep_ratio=True): imrescale's size, cv2 bilinear
            image = resize_image(image, mmcv_rescale_size(*image.shape[-2:], self.size), self.antialias)
        return image.contiguous(), label
