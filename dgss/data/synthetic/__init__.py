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

The package: the scenes' layout (:mod:`.layout`), the domains' styles and the renderer (:mod:`.style`), the data set
(:mod:`.dataset`).
"""

from dgss.data.synthetic.dataset import SPLIT_OFFSETS, SyntheticDomain
from dgss.data.synthetic.layout import Layout, Prim, make_layout
from dgss.data.synthetic.style import (
    DOMAINS,
    SOURCE_DOMAINS,
    TARGET_DOMAINS,
    DomainStyle,
    render,
    render_sample,
)

__all__ = ["DOMAINS", "SOURCE_DOMAINS", "SPLIT_OFFSETS", "TARGET_DOMAINS", "DomainStyle", "Layout", "Prim",
           "SyntheticDomain", "make_layout", "render", "render_sample"]  # fmt: skip
