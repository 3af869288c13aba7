#!/usr/bin/env python
"""Render a PNG grid of embedded synthetic samples: one row per scene, one column per domain + the labels.

python scripts/render_synthetic.py [--out docs/images/synthetic_domains.png] [--scenes 4] [--height 192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dgss.data.classes import CITYSCAPES
from dgss.data.synthetic import DOMAINS, SPLIT_OFFSETS, render_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images/synthetic_domains.png")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=list(SPLIT_OFFSETS))
    p.add_argument("--true-color", dest="palette", action="store_false", help="keep 24-bit colour")
    a = p.parse_args()
    h, w = a.height, 2 * a.height
    header = np.full((24, w * (len(DOMAINS) + 1), 3), 255, np.uint8)
    head = Image.fromarray(header)
    draw = ImageDraw.Draw(head)
    for k, name in enumerate([*DOMAINS, "label"]):
        draw.text((k * w + 8, 6), name, fill=(0, 0, 0))
    rows = [np.asarray(head)]
    for i in range(a.scenes):
        cells = []
        for d in DOMAINS:
            img, lab = render_sample(d, SPLIT_OFFSETS[a.split] + i, h, w, a.seed)
            cells.append(img)
        cells.append(CITYSCAPES.colorize(lab))
        rows.append(np.concatenate(cells, axis=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    if a.palette:  # 256-colour PNG: the noise textures make a true-colour grid ~1.5 MB
        grid = grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
