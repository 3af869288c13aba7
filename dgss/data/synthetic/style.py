"""The synthetic domains' *styles*: how a layout looks in each domain (palette, texture, noise, blur, lighting, fog,
night), and the renderer that draws a layout in one (:mod:`dgss.data.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dgss.data.classes import CITYSCAPES_CLASSES
from dgss.data.synthetic.layout import C, Layout, make_layout

_GAME = {  # flat, saturated, game-engine colours
    "road": [(95, 92, 105), (75, 75, 88)], "sidewalk": [(205, 175, 125), (185, 185, 195)],
    "building": [(205, 65, 50), (235, 205, 85), (85, 125, 210), (155, 95, 205), (240, 240, 228)],
    "wall": [(110, 195, 190), (175, 135, 85)], "fence": [(165, 105, 45), (125, 125, 125)],
    "pole": [(60, 60, 66), (130, 130, 140)], "traffic light": [(30, 30, 30), (235, 195, 0)],
    "traffic sign": [(25, 85, 225), (235, 35, 35), (250, 220, 10)], "vegetation": [(35, 200, 45), (70, 175, 30)],
    "terrain": [(155, 225, 75), (190, 165, 95)], "sky": [(65, 155, 255), (115, 195, 255)],
    "person": [(240, 65, 65), (45, 200, 230), (250, 150, 35), (155, 65, 220)],
    "rider": [(250, 250, 60), (255, 90, 200), (40, 230, 150)],
    "car": [(255, 45, 45), (45, 65, 255), (255, 220, 10), (45, 220, 85), (250, 250, 250), (35, 35, 35)],
    "truck": [(255, 125, 10), (230, 230, 230), (0, 155, 145)], "bus": [(250, 205, 10), (225, 35, 35), (35, 165, 65)],
    "train": [(185, 35, 185), (220, 220, 232)], "motorcycle": [(205, 10, 10), (25, 25, 25)],
    "bicycle": [(10, 185, 255), (255, 10, 125)],
}  # fmt: skip
_REAL = {  # muted, natural colours
    "road": [(108, 105, 102), (88, 88, 92), (122, 117, 112)], "sidewalk": [(162, 157, 150), (142, 132, 122)],
    "building": [(152, 122, 102), (177, 167, 152), (122, 112, 107), (192, 182, 167), (112, 92, 82)],
    "wall": [(167, 162, 152), (142, 127, 112)], "fence": [(122, 112, 97), (152, 152, 147)],
    "pole": [(112, 112, 107), (82, 87, 82)], "traffic light": [(42, 42, 37), (60, 58, 40)],
    "traffic sign": [(42, 82, 162), (182, 52, 47), (212, 202, 72)], "vegetation": [(72, 102, 47), (57, 87, 42), (92, 112, 62)],
    "terrain": [(122, 132, 82), (142, 127, 97)], "sky": [(152, 182, 212), (192, 207, 222)],
    "person": [(62, 62, 72), (142, 52, 52), (72, 92, 122), (162, 142, 112)],
    "rider": [(52, 52, 57), (102, 72, 52), (132, 132, 142)],
    "car": [(152, 32, 32), (42, 52, 92), (182, 182, 177), (52, 52, 52), (202, 202, 202), (92, 102, 112)],
    "truck": [(192, 192, 187), (122, 62, 42)], "bus": [(172, 152, 62), (162, 62, 52), (202, 202, 202)],
    "train": [(162, 162, 167), (120, 130, 120)], "motorcycle": [(92, 22, 22), (42, 42, 42)],
    "bicycle": [(62, 62, 92), (122, 42, 42)],
}  # fmt: skip
_PARTS_GAME = {"window": (130, 205, 255), "marking": (255, 255, 255), "wheel": (20, 20, 20), "skin": (245, 195, 155),
               "trunk": (120, 70, 20), "lamp_r": (255, 0, 0), "lamp_y": (255, 210, 0), "lamp_g": (0, 255, 60),
               "head": (255, 255, 200), "streetlamp": (90, 90, 95)}  # fmt: skip
_PARTS_REAL = {"window": (55, 62, 70), "marking": (205, 205, 200), "wheel": (30, 30, 32), "skin": (190, 150, 125),
               "trunk": (80, 62, 45), "lamp_r": (200, 40, 30), "lamp_y": (210, 160, 30), "lamp_g": (40, 190, 90),
               "head": (200, 200, 185), "streetlamp": (90, 90, 88)}  # fmt: skip


@dataclass(frozen=True)
class DomainStyle:
    palette: dict
    parts: dict
    texture: float = 0.0  # amplitude of low-frequency multiplicative texture
    grain: float = 0.0  # amplitude of per-pixel texture on vegetation / terrain / road
    noise: float = 0.0  # sensor noise sigma (in [0, 1] units)
    blur: float = 0.0  # Gaussian blur radius at 256 px image height
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gain: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    side_light: float = 0.0  # horizontal brightness ramp
    sky: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None  # top, horizon colours
    fog: float = 0.0  # extinction coefficient
    fog_color: tuple[float, float, float] = (0.78, 0.8, 0.82)
    night: bool = False


DOMAINS: dict[str, DomainStyle] = {
    "game": DomainStyle(_GAME, _PARTS_GAME),
    "photo": DomainStyle(_REAL, _PARTS_REAL, texture=0.12, grain=0.08, noise=0.025, blur=0.8,
                         sky=((120, 160, 205), (205, 215, 225))),
    "overcast": DomainStyle(_REAL, _PARTS_REAL, texture=0.08, grain=0.05, noise=0.02, blur=0.6,
                            tint=(1.12, 0.98, 0.78), gain=0.85, gamma=1.25, contrast=0.7, side_light=0.35,
                            sky=((215, 170, 130), (235, 215, 190))),
    "fog": DomainStyle(_REAL, _PARTS_REAL, texture=0.1, grain=0.06, noise=0.02, blur=1.0, fog=2.2,
                       sky=((190, 195, 200), (200, 204, 208))),
    "night": DomainStyle(_REAL, _PARTS_REAL, texture=0.1, grain=0.05, noise=0.05, blur=0.8, tint=(0.7, 0.8, 1.15),
                         gain=0.3, gamma=1.1, sky=((8, 10, 22), (30, 32, 48)), night=True),
}  # fmt: skip
SOURCE_DOMAINS = ("game",)
TARGET_DOMAINS = ("photo", "overcast", "fog", "night")


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int = 8) -> np.ndarray:
    small = rng.standard_normal((cells, cells * 2)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC)
    return np.asarray(img)


def _draw(layout: Layout, height: int, width: int) -> np.ndarray:
    """Instance map (H, W) int32: index into ``layout.prims``."""
    canvas = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    sx, sy = width, height
    for k, p in enumerate(layout.prims):
        pts = [(p.pts[i] * sx, p.pts[i + 1] * sy) for i in range(0, len(p.pts), 2)]
        if p.kind in ("rect", "ellipse"):
            (x0, y0), (x1, y1) = pts
            box = [
                min(x0, x1),
                min(y0, y1),
                max(max(x0, x1) - 1, min(x0, x1)),
                max(max(y0, y1) - 1, min(y0, y1)),
            ]
            (draw.rectangle if p.kind == "rect" else draw.ellipse)(box, fill=k)
        else:
            draw.polygon(pts, fill=k)
    return np.asarray(canvas, dtype=np.int32)


def render(
    layout: Layout, domain: str, height: int, width: int, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), label uint8 (H, W)) of ``layout`` in ``domain``."""
    style = DOMAINS[domain]
    rng = np.random.default_rng([seed, index, 1 + list(DOMAINS).index(domain)])
    inst = _draw(layout, height, width)
    prims = layout.prims
    cls_lut = np.array([p.cls for p in prims], dtype=np.uint8)
    label = cls_lut[inst]

    colors = np.empty((len(prims), 3), dtype=np.float32)
    for k, p in enumerate(prims):
        if p.part in ("lamp_r", "lamp_y", "lamp_g"):
            base = np.asarray(style.parts[p.part], np.float32) * (1.0 if p.tone > 0.5 else 0.3)
        elif p.part:
            base = np.asarray(style.parts[p.part], np.float32)
        else:
            options = style.palette[CITYSCAPES_CLASSES[p.cls]]
            base = np.asarray(options[int(p.tone * len(options)) % len(options)], np.float32)
            base = base * (0.9 + 0.2 * ((p.tone * 7.3) % 1.0))  # per-instance shade
        colors[k] = base / 255.0
    img = colors[inst]

    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    sky = label == C["sky"]
    if style.sky is not None:
        top, hor = (np.asarray(c, np.float32) / 255.0 for c in style.sky)
        t = np.clip(ys / max(layout.horizon, 1e-3), 0, 1)[:, None, None]
        grad = top * (1 - t) + hor * t
        img = np.where(sky[..., None], np.broadcast_to(grad, img.shape), img)

    # depth: ground rows by perspective, standing objects by their foot point, sky at infinity
    yh = layout.horizon
    base_y = np.array([p.base_y for p in prims], dtype=np.float32)
    ground = np.array([p.ground for p in prims], dtype=bool)
    obj_dist = 0.12 / np.maximum(base_y - yh, 0.01)
    row_dist = 0.12 / np.maximum(ys - yh, 0.01)
    dist = np.where(ground[inst], row_dist[:, None], obj_dist[inst])
    dist = np.where(sky, 50.0, dist)

    if style.texture:
        tex = 1.0 + style.texture * _lowfreq(rng, height, width)[..., None]
        img = img * np.where(sky[..., None], 1.0, tex)
    if style.grain:
        amp = np.zeros(len(CITYSCAPES_CLASSES), np.float32)
        amp[[C["vegetation"], C["terrain"]]] = 2.0
        amp[[C["road"], C["sidewalk"], C["building"], C["wall"]]] = 0.6
        g = rng.standard_normal((height, width)).astype(np.float32)
        img = img * (1.0 + style.grain * amp[label] * g)[..., None]

    if style.night:
        glow = np.zeros((height, width), np.float32)
        lights = np.zeros((height, width, 3), np.float32)
        for k, p in enumerate(prims):
            lit = (p.part == "window" and p.cls == C["building"] and p.tone < 0.35) or p.part in (
                "head",
                "streetlamp",
            )
            if lit or (p.part.startswith("lamp") and p.tone > 0.5):
                m = inst == k
                if not m.any():
                    continue
                col = np.asarray((1.0, 0.85, 0.5) if p.part != "head" else (1.0, 0.97, 0.85), np.float32)
                if p.part.startswith("lamp"):
                    col = colors[k] / max(colors[k].max(), 1e-3)
                lights[m] = col * 4.0
                yy, xx = np.nonzero(m)
                cy, cx = yy.mean() / height, xx.mean() / width
                rad = 0.04 + 0.1 * (1 - min(dist[yy[0], xx[0]], 5) / 5) if p.part != "window" else 0.02
                glow += np.exp(-(((ys[:, None] - cy) / rad) ** 2 + ((xs[None, :] - cx) / (rad * 0.5)) ** 2))
        img = img * style.gain * np.asarray(style.tint, np.float32)
        img = img + 0.25 * np.clip(glow, 0, 2)[..., None] * np.asarray((1.0, 0.8, 0.5), np.float32)
        img = np.where(lights.any(-1, keepdims=True), np.minimum(lights, 1.0) * 0.9, img)
    else:
        img = img * style.gain * np.asarray(style.tint, np.float32)
    if style.side_light:
        direction = 1.0 if rng.uniform() < 0.5 else -1.0
        img = img * (1.0 + style.side_light * direction * (xs - 0.5))[None, :, None]
    if style.fog:
        trans = np.exp(-style.fog * np.minimum(dist, 50.0) / 6.0)[..., None]
        img = img * trans + np.asarray(style.fog_color, np.float32) * (1 - trans)
    if style.contrast != 1.0:
        img = (img - 0.5) * style.contrast + 0.5
    img = np.clip(img, 0, 1)
    if style.gamma != 1.0:
        img = img**style.gamma
    if style.noise:
        img = img + rng.normal(0, style.noise, img.shape).astype(np.float32)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if style.blur:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(style.blur * height / 256)))
    return out, label


def render_sample(
    domain: str, index: int, height: int, width: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image and trainId label of sample ``index`` of ``domain``, deterministic per (domain, index, seed)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return render(make_layout(index, seed), domain, height, width, seed, index)
