"""Embedded procedural street scenes: one synthetic source domain and several shifted target domains.

A scene *layout* (horizon, road, sidewalks, buildings, vegetation, poles with signs and lights, people,
riders on bikes and motorbikes, cars, trucks, buses and the odd tram) is a list of vector primitives in
normalised coordinates, drawn from ``rng(seed, index)`` alone. A *domain* only decides how that layout
looks (palette, texture, noise, blur, lighting, fog, night), so the label map of sample ``i`` is the same
in every domain and only appearance shifts. Everything is deterministic per ``(domain, index, seed)`` and
rendered on the fly at any resolution; no files are needed.

Domains:
  ``game``      the source: flat, saturated, sharp, like a game engine (GTAV / Synthia stand-in)
  ``photo``     realistic palette, textures, sensor noise and lens blur (Cityscapes stand-in)
  ``overcast``  other palette and lighting: dull warm light, low contrast, side light, hazy sky (BDD stand-in)
  ``fog``       the photo look seen through depth-dependent fog (ACDC-fog stand-in)
  ``night``     dark, blue cast, lit windows, head/tail lights and street lamps, strong noise (ACDC-night stand-in)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from dgss.data.classes import CITYSCAPES_CLASSES
from dgss.errors import ConfigError

C = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}
SPLIT_OFFSETS = {
    "train": 0,
    "val": 10_000_000,
    "test": 20_000_000,
    "unlabelled": 30_000_000,
}  # unlabelled: pretraining


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Prim:
    """One filled shape: ``kind`` in rect / ellipse / poly, ``pts`` normalised (x, y) pairs."""

    cls: int
    kind: str
    pts: tuple[float, ...]
    tone: float  # picks the colour inside a domain's palette, stable across domains
    base_y: float  # where the object touches the ground (for depth), 1 = image bottom
    part: str = ""  # window / marking / wheel / skin / lamp_r / lamp_y / lamp_g / head / tail
    ground: bool = False  # ground-plane surface: depth varies per row


@dataclass
class Layout:
    horizon: float
    prims: list[Prim] = field(default_factory=list)


class _Builder:
    def __init__(self, rng: np.random.Generator, aspect: float = 0.5):
        self.r = rng
        self.a = aspect  # height/width of the canonical frame: widths are given in height units × a
        self.yh = float(rng.uniform(0.36, 0.47))
        self.vx = float(rng.uniform(0.38, 0.62))
        self.layout = Layout(self.yh)
        self.objects: list[list[Prim]] = []  # standing objects, sorted by base_y before drawing

    # helpers ---------------------------------------------------------------------------------
    def tone(self) -> float:
        return float(self.r.uniform())

    def scale(self, y: float) -> float:
        return max((y - self.yh) / (1.0 - self.yh), 0.02)

    def bg(self, cls, kind, pts, part="", ground=False, tone=None, base_y=None):
        self.layout.prims.append(
            Prim(cls, kind, tuple(pts), self.tone() if tone is None else tone,
                 self.yh + 0.02 if base_y is None else base_y, part, ground)
        )  # fmt: skip

    def road_x(self, y: float, u: float) -> float:
        """x at row ``y`` for lateral position u in [-1, 1] across the road (0 = centre)."""
        return self.vx + u * (0.012 + (self.half_road - 0.012) * self.scale(y))

    # scene -----------------------------------------------------------------------------------
    def build(self) -> Layout:
        r, yh, vx = self.r, self.yh, self.vx
        self.bg(C["sky"], "rect", (0, 0, 1, 1), base_y=0.0)
        self.bg(C["terrain"], "rect", (0, yh, 1, 1), ground=True)
        self.half_road = float(r.uniform(0.3, 0.55))
        xl, xr = vx - self.half_road, vx + self.half_road
        self.sidewalk = [float(r.uniform(0.1, 0.3)) if r.uniform() < 0.9 else 0.0 for _ in range(2)]
        self._buildings()
        self.bg(C["road"], "poly", (vx - 0.012, yh, vx + 0.012, yh, xr, 1.0, xl, 1.0), ground=True)
        for side, sw in zip((-1, 1), self.sidewalk):
            if sw:
                x_in = xl if side < 0 else xr
                self.bg(C["sidewalk"], "poly",
                        (vx + side * 0.012, yh, vx + side * 0.03, yh, x_in + side * sw, 1.0, x_in, 1.0),
                        ground=True)  # fmt: skip
        self._markings()
        for _ in range(r.integers(1, 5)):
            self._tree()
        if r.uniform() < 0.5:
            self._fence()
        for _ in range(r.integers(2, 6)):
            self._pole()
        for _ in range(r.integers(1, 6)):
            self._person()
        for _ in range(r.integers(0, 3)):
            self._rider()
        for _ in range(r.integers(2, 6)):
            self._car()
        if r.uniform() < 0.4:
            self._truck()
        if r.uniform() < 0.3:
            self._bus()
        if r.uniform() < 0.08:
            self._train()
        for obj in sorted(self.objects, key=lambda o: o[0].base_y):
            self.layout.prims.extend(obj)
        return self.layout

    def _buildings(self):
        r, yh, vx = self.r, self.yh, self.vx
        x = float(-r.uniform(0, 0.1))
        while x < 1.0:
            w = float(r.uniform(0.07, 0.22))
            x0, x1 = x, x + w
            x += w + (float(r.uniform(0.0, 0.05)) if r.uniform() < 0.3 else 0.0)
            if x1 > vx - 0.05 and x0 < vx + 0.05:  # keep the end of the street open
                continue
            top = float(r.uniform(0.02, yh - 0.1))
            bottom = yh + 0.02
            kind = "building"
            if r.uniform() < 0.15:  # a low wall instead of a facade
                kind, top = "wall", float(r.uniform(yh - 0.09, yh - 0.04))
            tone = self.tone()
            self.bg(C[kind], "rect", (x0, top, x1, bottom), tone=tone)
            if kind == "building" and r.uniform() < 0.85:
                nx, ny = int(r.integers(2, 6)), int(r.integers(2, 8))
                ww, wh = (x1 - x0) / nx, (bottom - 0.03 - top) / ny
                for i in range(nx):
                    for j in range(ny):
                        cx0, cy0 = x0 + (i + 0.25) * ww, top + 0.01 + (j + 0.2) * wh
                        self.bg(C["building"], "rect", (cx0, cy0, cx0 + 0.5 * ww, cy0 + 0.55 * wh),
                                part="window")  # fmt: skip
            if kind == "building" and r.uniform() < 0.3:  # wall segment in front of it
                self.bg(C["wall"], "rect", (x0, yh - 0.04, x1, yh + 0.025))
        if r.uniform() < 0.7:  # hedges / bushes along the horizon
            for _ in range(r.integers(1, 4)):
                cx = float(r.uniform(0, 1))
                if abs(cx - vx) < 0.08:
                    continue
                w = float(r.uniform(0.05, 0.15))
                self.bg(C["vegetation"], "ellipse", (cx - w, yh - 0.05, cx + w, yh + 0.035))

    def _markings(self):
        if self.r.uniform() < 0.2:
            return
        y = self.yh + 0.03
        while y < 1.0:
            y1 = min(y + 0.05 * self.scale(y) + 0.005, 1.0)
            w0, w1 = 0.002 + 0.012 * self.scale(y), 0.002 + 0.012 * self.scale(y1)
            self.bg(C["road"], "poly", (self.vx - w0, y, self.vx + w0, y, self.vx + w1, y1, self.vx - w1, y1),
                    part="marking")  # fmt: skip
            y = y1 + 0.04 * self.scale(y1) + 0.005

    def _side_x(self, y: float) -> tuple[float, int]:
        """A random x on a sidewalk (or the verge) at row y, and the side."""
        side = int(self.r.choice((-1, 1)))
        edge = self.road_x(y, side)
        sw = self.sidewalk[(side + 1) // 2] * self.scale(y)
        return edge + side * float(self.r.uniform(0.15, 0.9)) * max(sw, 0.02), side

    def _tree(self):
        r = self.r
        y = float(r.uniform(self.yh + 0.03, 0.9))
        s = self.scale(y)
        x, _ = self._side_x(y)
        h, cw = 0.55 * s + 0.08, (0.22 * s + 0.05) * self.a
        tone = self.tone()
        trunk = Prim(
            C["vegetation"], "rect", (x - 0.012 * s, y - 0.5 * h, x + 0.012 * s, y), tone, y, "trunk"
        )
        crown = Prim(C["vegetation"], "ellipse", (x - cw, y - h, x + cw, y - 0.35 * h), tone, y)
        self.objects.append([trunk, crown])

    def _fence(self):
        r = self.r
        y = float(r.uniform(self.yh + 0.05, 0.8))
        s = self.scale(y)
        side = int(r.choice((-1, 1)))
        x_in = self.road_x(y, side) + side * self.sidewalk[(side + 1) // 2] * s
        x_out = 0.0 if side < 0 else 1.0
        h = 0.12 * s + 0.02
        self.objects.append([Prim(C["fence"], "rect", (min(x_in, x_out), y - h, max(x_in, x_out), y),
                                  self.tone(), y)])  # fmt: skip

    def _pole(self):
        r = self.r
        y = float(r.uniform(self.yh + 0.04, 0.92))
        s = self.scale(y)
        x, _ = self._side_x(y)
        h, w = 0.7 * s + 0.08, (0.02 * s + 0.004) * self.a
        top = y - h
        obj = [Prim(C["pole"], "rect", (x - w, top, x + w, y), self.tone(), y)]
        kind = r.uniform()
        if kind < 0.45:  # traffic sign: disc, square or triangle at the top
            sz = 0.09 * s + 0.018
            sx = sz * self.a
            t = self.tone()
            shape = r.integers(0, 3)
            if shape == 0:
                obj.append(
                    Prim(C["traffic sign"], "ellipse", (x - sx, top, x + sx, top + 2 * sz * 0.9), t, y)
                )
            elif shape == 1:
                obj.append(Prim(C["traffic sign"], "rect", (x - sx, top, x + sx, top + 1.8 * sz), t, y))
            else:
                obj.append(
                    Prim(C["traffic sign"], "poly", (x - sx, top, x + sx, top, x, top + 1.8 * sz), t, y)
                )
        elif kind < 0.75:  # traffic light: box with three lamps
            bw, bh = (0.045 * s + 0.01) * self.a, 0.14 * s + 0.03
            obj.append(Prim(C["traffic light"], "rect", (x - bw, top, x + bw, top + bh), self.tone(), y))
            lit = int(r.integers(0, 3))
            for k, lamp in enumerate(("lamp_r", "lamp_y", "lamp_g")):
                cy = top + bh * (k + 0.5) / 3
                rr = bh / 8
                obj.append(Prim(C["traffic light"], "ellipse", (x - rr * self.a * 1.6, cy - rr, x + rr * self.a * 1.6, cy + rr),
                                1.0 if k == lit else 0.0, y, lamp))  # fmt: skip
        else:  # street lamp head (pole class)
            obj.append(Prim(C["pole"], "rect", (x - 0.06 * s * self.a, top, x + 0.06 * s * self.a, top + 0.012 * s + 0.003),
                            self.tone(), y, "streetlamp"))  # fmt: skip
        self.objects.append(obj)

    def _human(self, x: float, y: float, s: float, cls: int, legs: bool) -> list[Prim]:
        h = 0.32 * s + 0.04
        w = 0.06 * s * self.a + 0.003
        t = self.tone()
        prims = []
        if legs:
            prims.append(Prim(cls, "rect", (x - 0.8 * w, y - 0.5 * h, x - 0.1 * w, y), t, y))
            prims.append(Prim(cls, "rect", (x + 0.1 * w, y - 0.5 * h, x + 0.8 * w, y), t, y))
        prims.append(Prim(cls, "ellipse", (x - w, y - 0.85 * h, x + w, y - 0.4 * h), t, y))
        prims.append(Prim(cls, "ellipse", (x - 0.55 * w, y - h, x + 0.55 * w, y - 0.82 * h), t, y, "skin"))
        return prims

    def _person(self):
        y = float(self.r.uniform(self.yh + 0.04, 1.0))
        x, _ = self._side_x(y)
        self.objects.append(self._human(x, y, self.scale(y), C["person"], legs=True))

    def _rider(self):
        r = self.r
        y = float(r.uniform(self.yh + 0.06, 1.0))
        s = self.scale(y)
        x = self.road_x(y, float(r.uniform(-0.9, 0.9)))
        cls = C["motorcycle"] if r.uniform() < 0.5 else C["bicycle"]
        wr = 0.055 * s + 0.01
        span = 0.16 * s * self.a + 0.004
        t = self.tone()
        obj = [
            Prim(
                cls, "ellipse", (x - span - wr * self.a, y - 2 * wr, x - span + wr * self.a, y), t, y, "wheel"
            ),
            Prim(
                cls, "ellipse", (x + span - wr * self.a, y - 2 * wr, x + span + wr * self.a, y), t, y, "wheel"
            ),
            Prim(
                cls,
                "poly",
                (
                    x - span,
                    y - wr,
                    x + span,
                    y - wr,
                    x + 0.6 * span,
                    y - 3.2 * wr,
                    x - 0.4 * span,
                    y - 2.6 * wr,
                ),
                t,
                y,
            ),  # fmt: skip
        ]
        if cls == C["motorcycle"]:
            obj.append(Prim(cls, "rect", (x - 0.5 * span, y - 3 * wr, x + 0.5 * span, y - 1.2 * wr), t, y))
        obj += self._human(x, y - 2.2 * wr, s, C["rider"], legs=False)
        self.objects.append(obj)

    def _vehicle(self, cls: int, y: float, u: float, length: float, height: float, windows: str):
        s = self.scale(y)
        x = self.road_x(y, u)
        w, h = length * s * self.a + 0.01, height * s + 0.01
        t = self.tone()
        wr = 0.09 * h + 0.3 * w * 0.1
        obj = [Prim(cls, "rect", (x - w, y - h, x + w, y - 0.12 * h), t, y)]
        if windows == "cabin":  # car: cabin on top of the body
            obj = [Prim(cls, "rect", (x - w, y - 0.6 * h, x + w, y - 0.12 * h), t, y),
                   Prim(cls, "poly", (x - 0.7 * w, y - 0.6 * h, x + 0.7 * w, y - 0.6 * h, x + 0.5 * w, y - h, x - 0.5 * w, y - h), t, y),
                   Prim(cls, "poly", (x - 0.6 * w, y - 0.62 * h, x + 0.6 * w, y - 0.62 * h, x + 0.45 * w, y - 0.93 * h, x - 0.45 * w, y - 0.93 * h),
                        t, y, "window")]  # fmt: skip
            obj.append(
                Prim(cls, "rect", (x - 0.95 * w, y - 0.42 * h, x - 0.75 * w, y - 0.32 * h), t, y, "head")
            )
            obj.append(
                Prim(cls, "rect", (x + 0.75 * w, y - 0.42 * h, x + 0.95 * w, y - 0.32 * h), t, y, "head")
            )
        elif windows == "row":  # bus / train: a row of windows
            n = 6
            for k in range(n):
                wx0 = x - w + (k + 0.15) * 2 * w / n
                obj.append(
                    Prim(cls, "rect", (wx0, y - 0.85 * h, wx0 + 1.4 * w / n, y - 0.55 * h), t, y, "window")
                )
        elif windows == "cab":  # truck: cab window on one end
            side = -1 if self.r.uniform() < 0.5 else 1
            cab_x = x + side * 0.75 * w
            obj.append(
                Prim(
                    cls, "rect", (cab_x - 0.2 * w, y - 0.8 * h, cab_x + 0.2 * w, y - 0.55 * h), t, y, "window"
                )
            )
        for wx in (x - 0.65 * w, x + 0.65 * w):
            obj.append(
                Prim(
                    cls,
                    "ellipse",
                    (wx - wr * self.a * 1.5, y - 2 * wr, wx + wr * self.a * 1.5, y),
                    t,
                    y,
                    "wheel",
                )
            )
        self.objects.append(obj)

    def _car(self):
        r = self.r
        self._vehicle(
            C["car"], float(r.uniform(self.yh + 0.04, 1.05)), float(r.uniform(-0.8, 0.8)), 0.24, 0.24, "cabin"
        )

    def _truck(self):
        r = self.r
        self._vehicle(
            C["truck"], float(r.uniform(self.yh + 0.05, 0.95)), float(r.uniform(-0.7, 0.7)), 0.36, 0.42, "cab"
        )

    def _bus(self):
        r = self.r
        self._vehicle(
            C["bus"], float(r.uniform(self.yh + 0.05, 0.9)), float(r.uniform(-0.6, 0.6)), 0.5, 0.45, "row"
        )

    def _train(self):
        r = self.r
        self._vehicle(
            C["train"], float(r.uniform(self.yh + 0.05, 0.7)), float(r.uniform(-0.4, 0.4)), 0.9, 0.4, "row"
        )


def make_layout(index: int, seed: int = 0) -> Layout:
    """The scene layout of sample ``index``: identical in every domain."""
    return _Builder(np.random.default_rng([seed, index])).build()


# ----------------------------------------------------------------------------------------------- styles
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


# ----------------------------------------------------------------------------------------------- dataset
class SyntheticDomain:
    """``length`` samples of one embedded domain at ``height`` x ``width``, rendered on the fly (a
    ``dgss.data.samples.SegmentationData``).

    ``split`` selects a disjoint index range (train / val / test), so validation scenes are never trained on;
    the same (split, index) has the same layout in every domain.
    """

    on_bad = "error"  # rendered, never unreadable

    def __init__(self, domain: str, split: str = "train", length: int = 1000, height: int = 256, width: int = 512,
                 seed: int = 0, paired: Sequence[str] = ()):  # fmt: skip
        if domain not in DOMAINS:
            raise ConfigError(
                f"synthetic domain={domain!r} does not exist; choose one of {', '.join(DOMAINS)}"
            )
        if split not in SPLIT_OFFSETS:
            raise ConfigError(f"synthetic split={split!r}; choose one of {', '.join(SPLIT_OFFSETS)}")
        if length <= 0 or height <= 0 or width <= 0:
            raise ConfigError(
                f"synthetic length/height/width must be positive, got {length}/{height}/{width}"
            )
        self.domain, self.split, self.length = domain, split, int(length)
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        bad = [d for d in paired if d not in DOMAINS]
        if bad:
            raise ConfigError(
                f"synthetic paired={list(paired)}: {bad} are not domains; choose from {', '.join(DOMAINS)}"
            )
        # the same scenes rendered in these domains (an oracle x′ for FisherTune: method.perturb.type=paired_render)
        self.paired_domains = tuple(paired)

    def __len__(self) -> int:
        return self.length

    def read_label(self, i: int) -> np.ndarray:
        return np.array(
            render_sample(self.domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed)[1]
        )

    @property
    def cache_key(self) -> str:
        return f"synthetic/{self.domain}/{self.split}/{self.length}/{self.height}x{self.width}/{self.seed}"

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 (3, H, W) and trainId label uint8 (H, W) of scene ``i`` (rendered, deterministic)."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        img, lab = render_sample(
            self.domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed
        )
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), torch.from_numpy(np.array(lab))

    def name(self, i: int) -> str:
        return f"{self.domain}/{self.split}/{i:06d}"

    def load_paired(self, i: int) -> torch.Tensor:
        """Scene ``i`` rendered in ``paired_domains[i % len(paired_domains)]``: the same layout and label."""
        if not self.paired_domains:
            raise ConfigError(
                f"synthetic domain {self.domain!r} has no paired domains (synthetic paired=[...])"
            )
        domain = self.paired_domains[i % len(self.paired_domains)]
        img, _ = render_sample(domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
