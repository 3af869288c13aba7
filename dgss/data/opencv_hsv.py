"""OpenCV's 8-bit RGB ↔ HSV conversions (``cv2.cvtColor`` with ``COLOR_RGB2HSV`` / ``COLOR_HSV2RGB`` on uint8,
H in 0..179), re-derived in numpy so that mmseg's ``PhotoMetricDistortion`` (which goes through ``mmcv.bgr2hsv`` /
``hsv2bgr``) can be reproduced exactly without OpenCV in the stack.

Forward (OpenCV ``RGB2HSV_b``, integer arithmetic with 12-bit fixed-point tables): v = max, diff = v − min,
s = (diff·sdiv[v] + 2¹¹) >> 12 with sdiv[i] = round(255·2¹²/i); h from the dominant channel, (h·hdiv[diff] + 2¹¹) >> 12
with hdiv[i] = round(180·2¹²/(6i)), + 180 when negative. Backward (``HSV2RGB_b``): float32 h·(6/180), its sector and
fraction, the four values v, v(1−s), v(1−s·f), v(1−s(1−f)) with s, v scaled by 1/255 (1 − s·f and 1 − s(1−f) by a
fused multiply-add: one rounding), then x·255 saturated to 0..255 — truncated in OpenCV's vector blocks (32 pixels of a
row in OpenCV 4.x on x86), rounded to nearest even in the scalar rest of each row: the same HSV value can come back
one grey level apart depending on its column. (mmseg's own result therefore depends on OpenCV's version and the CPU's
vector width; dgss follows OpenCV 4.x on AVX2, what mmcv runs.) Source: opencv/modules/imgproc/src/color_hsv.simd.hpp. Checked against ``cv2`` 4.10 (mmcv's era; 32-pixel blocks) and
5.1 (64 here, AVX-512) on every 8-bit RGB colour and on random HSV images: equal; ``tests/test_train_pipeline.py``
keeps the check against the installed ``cv2`` (a test-only dependency), probing its block width.
"""

from __future__ import annotations

import numpy as np

_SHIFT = 12
_I = np.arange(1, 256, dtype=np.float64)
SDIV = np.concatenate([[0], np.rint((255 << _SHIFT) / _I)]).astype(np.int32)
HDIV180 = np.concatenate([[0], np.rint((180 << _SHIFT) / (6.0 * _I))]).astype(np.int32)
# (b, g, r) of each sector from the table (v, v(1−s), v(1−s·f), v(1−s(1−f)))
SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
SIMD_PIXELS = (
    32  # pixels per vector block of HSV2RGB_b in OpenCV 4.x on x86 (4 x 8 float lanes, AVX2): mmcv's
)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 HSV as ``cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)``: H 0..179, S and V 0..255.

    >>> rgb_to_hsv(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=np.uint8)).tolist()
    [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]
    """
    x = rgb.astype(np.int32)  # (every product below fits: |h| · hdiv <= 1,020 · 122,880)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    out = np.empty(rgb.shape, dtype=np.uint8)
    out[..., 1] = (diff * SDIV[v] + (1 << (_SHIFT - 1))) >> _SHIFT
    out[..., 2] = v
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * HDIV180[diff] + (1 << (_SHIFT - 1))) >> _SHIFT
    h[h < 0] += 180
    out[..., 0] = h
    return out


def hsv_to_rgb(hsv: np.ndarray, simd_pixels: int = SIMD_PIXELS) -> np.ndarray:
    """uint8 (H, W, 3) (or (..., W, 3)) HSV, H 0..179 -> uint8 RGB as ``cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)``.

    OpenCV converts row by row: blocks of ``simd_pixels`` pixels through its vector code, which truncates x·255, and
    the rest of the row through its scalar code, which rounds it (to nearest even); both compute 1 − s·f with a fused
    multiply-add. The block is 32 pixels in OpenCV 4.x on x86 (AVX2; mmcv's OpenCV), 64 in OpenCV 5 on AVX-512; a
    pixel's value depends on its column.

    >>> hsv_to_rgb(np.array([[[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]], dtype=np.uint8)).tolist()
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]]
    """
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(f32(6.0) / f32(180.0))
    s = hsv[..., 1].astype(f32) * f32(f32(1.0) / f32(255.0))
    v = hsv[..., 2].astype(f32) * f32(f32(1.0) / f32(255.0))
    sector = np.trunc(h).astype(np.int64)  # h < 6: OpenCV's floor (scalar) and trunc (vector) agree
    h = h - sector.astype(f32)
    one = f32(1.0)

    def fma_one_minus(
        a: np.ndarray, b: np.ndarray
    ) -> np.ndarray:  # 1 − a·b rounded once, as a fused multiply-add
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)

    tab = np.stack([v, v * (one - s), v * fma_one_minus(s, h), v * fma_one_minus(s, one - h)], axis=-1)
    x = np.take_along_axis(tab, SECTORS[sector], axis=-1)[..., ::-1] * f32(255.0)
    width = hsv.shape[-2]
    vector = width - width % simd_pixels  # columns [0, vector) go through the vector code
    out = np.rint(x)
    out[..., :vector, :] = np.trunc(x[..., :vector, :])
    return np.clip(out, 0, 255).astype(np.uint8)
