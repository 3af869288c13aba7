"""The Rein train pipeline (scales, cat_max_ratio crop, photometric distortion, backbone normalisation) and
DAFormer rare-class sampling."""

import functools
import math

import numpy as np
import pytest
import torch

from dgss.data.datamodule import DGSSDataModule
from dgss.data.rare_class import RareClassSampler, class_pixel_counts
from dgss.data.synthetic import SyntheticDomain
from dgss.data.transforms import (
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    TestPipeline,
    TrainPipeline,
    resize_image,
    resize_label,
    shortest_edges,
)
from dgss.errors import ConfigError

REIN_SCALES = [int(512 * k * 0.1) for k in range(5, 21)]


def test_rein_scales_in_every_real_data_config(compose_cfg):
    assert shortest_edges((256, 1024), 16) == REIN_SCALES
    for name in ("gta2cbm", "gtasyn2cbm", "cs2bm", "cs2acdc"):
        tp = compose_cfg(
            [f"data={name}"]
        ).data.train_pipeline  # composed: the shared data/_real.yaml included
        assert tp["scales"] == REIN_SCALES and tp["crop"] == [512, 512] and tp["cat_max_ratio"] == 0.75
        assert tp["max_long_edge"] == 2048 and tp["flip"] == 0.5 and tp["photometric"]
    pipe = TrainPipeline(
        crop=(4096, 4096), scales=REIN_SCALES, flip=0.0, photometric=False, cat_max_ratio=1.0
    )
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        img, _ = pipe(torch.zeros(3, 263, 478, dtype=torch.uint8), torch.zeros(263, 478, dtype=torch.uint8))
        seen.add(min(img.shape[-2:]))
    assert seen <= set(REIN_SCALES) and len(seen) >= 10  # long edges stay <= 2048 for GTAV's 1.82 ratio
    with pytest.raises(ConfigError, match="sets both scales and short_edge"):
        TrainPipeline(scales=[256], short_edge=[256, 512])


def _ok(crop: torch.Tensor, ratio: float) -> bool:
    counts = torch.bincount(crop.flatten(), minlength=256)[:255]
    counts = counts[counts > 0]
    return len(counts) > 1 and bool(counts.max() < ratio * counts.sum())


def test_cat_max_ratio_retries_up_to_ten_crops():
    label = torch.zeros(60, 60, dtype=torch.long)
    label[:20, :20] = 1  # only crops near the top-left corner mix classes enough
    label[40:, 40:] = 255
    crop = CatMaxRatioCrop((30, 30), cat_max_ratio=0.75)
    offsets = [(y, x) for y in range(31) for x in range(31)]
    p = sum(_ok(label[y : y + 30, x : x + 30], 0.75) for y, x in offsets) / len(offsets)
    torch.manual_seed(0)
    n = 2000
    hits = sum(_ok(crop(label[None].clone(), label)[1], 0.75) for _ in range(n)) / n
    assert 0.02 < p < 0.2
    # mmseg: 10 checked crops, then an 11th drawn and used unchecked
    assert abs(hits - (1 - (1 - p) ** 11)) < 3 * math.sqrt(0.25 / n)
    plain = CatMaxRatioCrop((30, 30), cat_max_ratio=1.0)
    assert abs(sum(_ok(plain(label[None], label)[1], 0.75) for _ in range(n)) / n - p) < 3 * math.sqrt(
        0.25 / n
    )


def test_a_crop_of_a_small_image_stays_small_for_the_model_to_pad():
    img, lab = torch.full((3, 20, 25), 7, dtype=torch.uint8), torch.ones(20, 25, dtype=torch.long)
    out_img, out_lab = CatMaxRatioCrop((32, 32))(img, lab)
    assert torch.equal(out_img, img) and torch.equal(
        out_lab, lab
    )  # padding is the model's (after normalising)
    big = torch.arange(40 * 50).view(40, 50) % 19
    crop_img, crop_lab = CatMaxRatioCrop((32, 32), cat_max_ratio=1.0)(big[None].expand(3, -1, -1), big)
    assert crop_img.shape == (3, 32, 32) and crop_lab.shape == (32, 32) and torch.equal(crop_img[0], crop_lab)


def test_photometric_distortion_is_mmseg_like():
    torch.manual_seed(0)
    img = torch.randint(40, 200, (3, 16, 16), dtype=torch.uint8)
    pmd = PhotoMetricDistortion()
    outs = [pmd(img) for _ in range(800)]
    assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in outs)
    unchanged = sum(torch.equal(o, img) for o in outs) / len(outs)
    assert abs(unchanged - 1 / 16) < 0.03  # each of the four steps with probability 1/2
    diffs = [float((o.float() - img.float()).mean()) for o in outs]
    assert max(diffs) > 25 and min(diffs) < -25  # brightness ±32 and contrast 0.5-1.5 reach that far


def test_the_model_normalises_with_its_backbones_mean_and_std_unless_set():
    """The data hands out uint8; the method normalises with its backbone's pretrained mean / std (CLIP's for CLIP),
    or the backbone's ``mean`` / ``std`` when set (Rein's ImageNet values for every backbone)."""
    from helpers.builders import make_method

    from dgss.methods.full import FullFineTune
    from dgss.models.backbone import Backbone
    from dgss.models.heads.light import LightHead

    clip = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert Backbone("vit_large_patch14_clip_224.openai", tiny=True, img_size=28).normalization == clip
    x = SyntheticDomain("game", "train", 4, 32, 32).load(0)[0]
    m = make_method(FullFineTune)
    imagenet = m.backbone.normalization
    want = (x.float() / 255 - torch.tensor(imagenet[0])[:, None, None]) / torch.tensor(imagenet[1])[
        :, None, None
    ]
    assert torch.allclose(m.normalize(x), want, atol=1e-5)
    half = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    m2 = FullFineTune(half, functools.partial(LightHead, channels=8), num_classes=19)
    assert torch.allclose(m2.normalize(x), x.float() / 127.5 - 1, atol=1e-5)
    with pytest.raises(TypeError, match="the model takes uint8 RGB images"):
        m2.normalize(x.float())
    with pytest.raises(ConfigError, match=r"backbone.mean=\(0.5,\) and backbone.std=None: give both"):
        Backbone("vit_small_patch14_reg4_dinov2", tiny=True, mean=(0.5,))


def test_rare_class_sampling_probabilities_images_and_cache(tmp_path, monkeypatch):
    counts = np.array([[900, 100, 0], [1000, 0, 0], [500, 0, 500], [800, 200, 0]])
    s = RareClassSampler(counts, temperature=0.1, min_pixels=150, generator=torch.Generator().manual_seed(0))
    f = counts.sum(0) / counts.sum()  # 0.8, 0.075, 0.125
    z = np.exp((1 - f) / 0.1)
    assert s.class_probabilities() == pytest.approx({0: z[0] / z.sum(), 1: z[1] / z.sum(), 2: z[2] / z.sum()})
    pairs = list(s)
    assert len(pairs) == 4 and all(counts[i, c] >= 150 for i, c in pairs)
    s.num_samples = 4000
    drawn = np.bincount([c for _, c in s], minlength=3) / 4000
    assert np.allclose(drawn, z / z.sum(), atol=0.03)
    assert {i for i, c in s if c == 1} == {3}  # image 0 holds only 100 < 150 pixels of class 1

    ds = SyntheticDomain("game", "train", 12, 32, 48)
    got = class_pixel_counts(ds, 19, tmp_path)
    want = np.stack(
        [np.bincount(np.asarray(ds.read_label(i)).ravel(), minlength=256)[:19] for i in range(12)]
    )
    assert np.array_equal(got, want) and len(list(tmp_path.glob("class_pixels_*.npy"))) == 1
    monkeypatch.setattr(SyntheticDomain, "read_label", lambda *a: pytest.fail("cache not used"))
    assert np.array_equal(class_pixel_counts(ds, 19, tmp_path), want)


def test_rare_class_sampling_in_the_datamodule_prefers_crops_with_the_class(tmp_path):
    src = SyntheticDomain("game", "train", 16, 64, 96)
    pipe = TrainPipeline(crop=(24, 24), photometric=False, flip=0, min_prefer_pixels=30)
    dm = DGSSDataModule({"g": src}, {"v": SyntheticDomain("game", "val", 2, 64, 96)}, pipe, batch_size=4, num_workers=0,
                        pin_memory=False, rare_class_sampling={"temperature": 0.05, "min_pixels": 60, "cache_dir": tmp_path})  # fmt: skip
    loader = dm.train_dataloader()
    pairs = [draw.item for draw in loader.sampler]  # (index, class), each with its augmentation seed
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    samples = dm.train_samples["g"]
    held = [int((samples[p]["label"] == p[1]).sum()) for p in pairs]
    torch.manual_seed(0)
    plain = [int((samples[p[0]]["label"] == p[1]).sum()) for p in pairs]
    assert np.mean([h >= 30 for h in held]) > np.mean([h >= 30 for h in plain]) + 0.2
    batch = next(iter(loader))
    assert len(batch["image"]) == 4 and all(x.shape == (3, 24, 24) for x in batch["image"])
    with pytest.raises(ConfigError, match="rare_class_sampling and data.source_weights both set"):
        DGSSDataModule(
            {"g": src}, {"v": src}, source_weights={"g": 1.0}, rare_class_sampling={"temperature": 0.01}
        )


# ------------------------------------------------------------------ resizing as mmseg / mmcv (cv2) do it
def mmseg_shortest_edge_shape(h, w, short, max_size):
    """mmseg 1.x ``ResizeShortestEdge._get_output_shape`` then mmcv 2.x ``Resize(keep_ratio=True)`` =
    ``mmcv.imrescale`` / ``rescale_size`` / ``_scale_size``, re-derived from their source: (h, w) out."""
    size = short * 1.0
    scale = size / min(h, w)
    new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    target_w, target_h = int(new_w + 0.5), int(new_h + 0.5)  # Resize.scale = (w, h)
    factor = min(max(target_w, target_h) / max(h, w), min(target_w, target_h) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def cv2_inter_linear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR) on uint8 HW, in float64 (cv2 uses 11-bit fixed point, within one grey level):
    per axis ``f = (d + 0.5) · in / out − 0.5``, ``s = floor(f)``; ``s < 0`` -> (0, weight 0), ``s >= in − 1`` ->
    (in − 1, weight 0); ``v = (1 − a) · src[s] + a · src[min(s + 1, in − 1)]``; rounded."""

    def taps(n_in, n_out):
        f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        s = np.floor(f).astype(int)
        a = f - s
        a[s < 0], s[s < 0] = 0, 0
        hi = s >= n_in - 1
        a[hi], s[hi] = 0, n_in - 1
        return s, np.minimum(s + 1, n_in - 1), a

    y0, y1, ay = taps(img.shape[0], out_h)
    x0, x1, ax = taps(img.shape[1], out_w)
    x = img.astype(np.float64)
    rows = (1 - ay)[:, None] * x[y0] + ay[:, None] * x[y1]
    out = (1 - ax)[None] * rows[:, x0] + ax[None] * rows[:, x1]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def cv2_inter_nearest(lab: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2 ``resizeNN``: ``inv_scale = (double) out / in``, ``ifx = 1. / inv_scale``, source index
    ``min(cvFloor(d · ifx), in − 1)`` per axis."""
    ys = np.minimum(np.floor(np.arange(out_h) * (1.0 / (out_h / lab.shape[0]))).astype(int), lab.shape[0] - 1)
    xs = np.minimum(np.floor(np.arange(out_w) * (1.0 / (out_w / lab.shape[1]))).astype(int), lab.shape[1] - 1)
    return lab[ys][:, xs]


NATIVE = {"gtav": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048), "bdd100k": (720, 1280),
          "acdc": (1080, 1920)}  # fmt: skip


def test_train_sizes_are_mmsegs_for_every_data_set_and_scale():
    from dgss.data.transforms import shortest_edge_size

    truncating = 0  # torchvision's RandomShortestSize (dgss before issue 17) floors the long side
    for h, w in NATIVE.values():
        for short in REIN_SCALES:
            assert shortest_edge_size(h, w, short, 2048) == mmseg_shortest_edge_shape(h, w, short, 2048), (
                h,
                w,
            )
            f = short / min(h, w)
            old = (short, int(w * f)) if h < w else (int(h * f), short)
            old = old if max(old) <= 2048 else None
            truncating += old is not None and old != mmseg_shortest_edge_shape(h, w, short, 2048)
    assert (
        shortest_edge_size(1052, 1914, 256, 2048) == (256, 466) and truncating >= 20
    )  # GTAV at 256: not 465
    # the 1024 recipe (shortest 512-2048, long <= 4096) and a portrait image
    assert shortest_edge_size(1052, 1914, 2048, 4096) == mmseg_shortest_edge_shape(1052, 1914, 2048, 4096)
    assert shortest_edge_size(1914, 1052, 307, 2048) == mmseg_shortest_edge_shape(1914, 1052, 307, 2048)


def test_train_and_test_resizing_equal_cv2_bilinear_and_nearest_within_a_grey_level():
    gen = np.random.default_rng(0)
    h, w = 105, 191  # GTAV's ratio, scaled down
    smooth = np.kron(gen.integers(0, 256, (21, 39)), np.ones((5, 5)))[:h, :w]
    noise = gen.integers(0, 256, (h, w))
    img = np.clip(0.7 * smooth + 0.3 * noise, 0, 255).astype(np.uint8)  # edges and fine texture
    lab = gen.integers(0, 19, (h, w)).astype(np.uint8)
    t_img = torch.from_numpy(np.repeat(img[None], 3, 0))
    for size in [(40, 73), (64, 116), (200, 364), (105, 191)]:  # down, down, up, same
        ours = resize_image(t_img, size)[0].numpy().astype(int)
        assert np.abs(ours - cv2_inter_linear(img, *size).astype(int)).max() <= 1, size
        assert np.array_equal(
            resize_label(torch.from_numpy(lab), size).numpy(), cv2_inter_nearest(lab, *size)
        )
    blurred = resize_image(t_img, (40, 73), antialias=True)[0].numpy().astype(int)
    assert np.abs(blurred - cv2_inter_linear(img, 40, 73).astype(int)).max() > 20  # what antialiasing changed
    # the whole train step: resize (drawn scale) -> crop (the whole image here); the label follows nearest
    pipe = TrainPipeline(crop=(4096, 4096), scales=[40], max_long_edge=2048, flip=0.0, photometric=False,
                         cat_max_ratio=1.0)  # fmt: skip
    out_img, out_lab = pipe(t_img, torch.from_numpy(lab))
    size = mmseg_shortest_edge_shape(h, w, 40, 2048)
    assert tuple(out_img.shape[-2:]) == size == (40, int(191 * 40 / 105 + 0.5))
    assert np.abs(out_img[0].numpy().astype(int) - cv2_inter_linear(img, *size).astype(int)).max() <= 1
    assert np.array_equal(out_lab.numpy(), cv2_inter_nearest(lab, *size))
    # test time: mmcv Resize(scale=(1024, 512), keep_ratio=True) on a Cityscapes-shaped image -> 512 x 1024
    city = torch.zeros(3, 1024, 2048, dtype=torch.uint8)
    assert tuple(TestPipeline((1024, 512))(city, torch.zeros(1024, 2048))[0].shape) == (3, 512, 1024)
    small = TestPipeline((96, 50))(t_img, torch.from_numpy(lab))[0]  # factor min(96/191, 50/105)
    f = min(96 / 191, 50 / 105)
    assert tuple(small.shape[-2:]) == (int(105 * f + 0.5), int(191 * f + 0.5))
    assert (
        np.abs(small[0].numpy().astype(int) - cv2_inter_linear(img, *small.shape[-2:]).astype(int)).max() <= 1
    )


def _opencv_block(cv2) -> int:
    """The pixels per vector block of the installed OpenCV's HSV2RGB (its CPU dispatch): the width our emulation
    needs to equal it on a long row."""
    from dgss.data.opencv_hsv import hsv_to_rgb

    rng = np.random.default_rng(1)
    row = np.stack(
        [rng.integers(0, 180, (8, 127)), rng.integers(0, 256, (8, 127)), rng.integers(0, 256, (8, 127))], -1
    ).astype(np.uint8)  # fmt: skip  (127: a different tail per width)
    want = cv2.cvtColor(row, cv2.COLOR_HSV2RGB)
    found = [b for b in (8, 16, 32, 64) if np.array_equal(hsv_to_rgb(row, b), want)]
    assert found, "no vector block width reproduces this OpenCV"
    return found[0]


def test_opencvs_8bit_hsv_conversions_are_re_derived_exactly():
    """Issue 27 (3): :mod:`dgss.data.opencv_hsv` equals ``cv2.cvtColor`` (RGB2HSV / HSV2RGB on uint8) on 2M random
    colours, and on HSV images of several widths (OpenCV truncates in its vector blocks and rounds in each row's
    scalar rest, with a fused multiply-add in both: plain float32 rounding is a grey level off on ~1 in 27,000
    triples). With the OpenCV of mmcv's era (the dev extra: <= 4.10) on x86, the block is the default, 32 pixels."""
    import doctest
    import platform

    import dgss.data.opencv_hsv as opencv_hsv
    from dgss.data.opencv_hsv import SIMD_PIXELS, hsv_to_rgb, rgb_to_hsv

    assert doctest.testmod(opencv_hsv).failed == 0  # (runs without OpenCV)
    cv2 = pytest.importorskip("cv2")

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2000, 1000, 3), dtype=np.uint8)
    assert np.array_equal(rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    block = _opencv_block(cv2)
    for h, w in ((500, 1914), (3, 37), (40, 512), (9, 31), (1, 1)):
        hsv = np.stack([rng.integers(0, 180, (h, w)), rng.integers(0, 256, (h, w)),
                        rng.integers(0, 256, (h, w))], -1).astype(np.uint8)  # fmt: skip
        assert np.array_equal(hsv_to_rgb(hsv, block), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)), (h, w)
    if platform.machine() in ("x86_64", "AMD64") and tuple(map(int, cv2.__version__.split(".")[:2])) <= (
        4,
        10,
    ):
        assert block == SIMD_PIXELS == 32


def _mmseg_photometric(cv2, img_bgr: np.ndarray, pmd: PhotoMetricDistortion) -> tuple[np.ndarray, int | None]:
    """mmseg 1.x ``PhotoMetricDistortion.transform`` (re-derived from its source, on a BGR image through
    ``mmcv.bgr2hsv`` = ``cv2.cvtColor(.., COLOR_BGR2HSV)``), its numpy random calls replaced by the same torch draws in
    the same order as dgss's; returns the image and the hue shift drawn (None: no hue step)."""

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        return np.clip(img, 0, 255).astype(np.uint8)

    def coin():
        return bool(torch.rand(()) < 0.5)

    def uniform(lo, hi):
        return float(torch.empty(()).uniform_(lo, hi))

    img, shift = img_bgr, None
    if coin():  # brightness
        img = convert(img, beta=uniform(-pmd.brightness, pmd.brightness))
    mode = coin()  # contrast first
    if mode and coin():
        img = convert(img, alpha=uniform(*pmd.contrast))
    if coin():  # saturation
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=uniform(*pmd.saturation))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if coin():  # hue: numpy's randint(-hue_delta, hue_delta) excludes the upper bound
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        shift = int(torch.randint(-pmd.hue, pmd.hue, ()))
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + shift) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not mode and coin():
        img = convert(img, alpha=uniform(*pmd.contrast))
    return img, shift


def test_photometric_distortion_equals_mmsegs_through_opencv():
    """Issue 27 (3): 300 random images and draws: dgss's distortion (RGB) equals mmseg's computed with OpenCV on the
    BGR image, pixel for pixel (the float HSV before differed by up to 8 grey levels on up to 9 % of pixels); the hue
    shifts span [-18, 17], as numpy's randint(-18, 18)."""
    cv2 = pytest.importorskip("cv2")
    from dgss.data.opencv_hsv import SIMD_PIXELS

    if _opencv_block(cv2) != SIMD_PIXELS:
        pytest.skip(f"this OpenCV's vector block is not mmcv-era x86's {SIMD_PIXELS} pixels")
    pmd = PhotoMetricDistortion()
    g = torch.Generator().manual_seed(0)
    shifts = set()
    for seed in range(300):
        img = torch.randint(
            0, 256, (3, 24, 45), generator=g, dtype=torch.uint8
        )  # a vector block + a scalar rest
        torch.manual_seed(seed)
        got = pmd(img).permute(1, 2, 0).numpy()
        torch.manual_seed(seed)
        want, shift = _mmseg_photometric(
            cv2, np.ascontiguousarray(img.permute(1, 2, 0).numpy()[..., ::-1]), pmd
        )
        assert np.array_equal(got, want[..., ::-1]), seed
        shifts.add(shift)
    for _ in range(2000):
        shifts.add(int(torch.randint(-18, 18, ())))
    assert shifts - {None} == set(range(-18, 18))
