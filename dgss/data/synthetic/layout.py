"""The synthetic scenes' *layout*: horizon, road, sidewalks, buildings, vegetation, poles with signs and lights,
people, riders on bikes and motorbikes, cars, trucks, buses and the odd tram, as a list of vector primitives in
normalised coordinates drawn from ``rng(seed, index)`` alone, so that a scene's label map is the same in every
domain (:mod:`dgss.data.synthetic`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dgss.data.classes import CITYSCAPES_CLASSES

C = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}


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
