"""Tiny image + label pairs in the Rein on-disk layout of every real data set (one per split a data config names)."""

import numpy as np
from PIL import Image


def write_pair(root, image_rel, label_rel, size=(8, 6), values=(0, 5, 18, 255)):
    w, h = size
    img = root / image_rel
    lab = root / label_rel
    img.parent.mkdir(parents=True, exist_ok=True)
    lab.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img)
    label = np.resize(np.array(values, dtype=np.uint8), h * w).reshape(h, w)
    Image.fromarray(label).save(lab)
    return label


FIXTURES = {
    ("gta", "all"): ("gta/images/00001.png", "gta/labels/00001_labelTrainIds.png"),
    ("synthia", "all"): ("synthia/RGB/0000001.png", "synthia/GT/LABELS/0000001_labelTrainIds.png"),
    ("urbansyn", "all"): ("urbansyn/rgb/rgb_0001.png", "urbansyn/labels/rgb_0001_labelTrainIds.png"),
    ("cityscapes", "val"): ("cityscapes/leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png",
                            "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"),
    ("bdd100k", "val"): ("bdd100k/images/10k/val/7d2f7975-e0c1c5a7.jpg", "bdd100k/labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png"),
    ("mapillary", "train"): ("mapillary/training/images/abc.jpg", "mapillary/cityscapes_trainIdLabel/train/label/abc.png"),
    ("mapillary", "val"): ("mapillary/half/val_img/xyz.jpg", "mapillary/half/val_label/xyz.png"),
    ("acdc", "night/val"): ("acdc/rgb_anon/night/val/GOPR0351/GOPR0351_frame_000159_rgb_anon.png",
                            "acdc/gt/night/val/GOPR0351/GOPR0351_frame_000159_gt_labelTrainIds.png"),
}  # fmt: skip


def write_all_fixtures(root):
    """One pair per split that a data config names."""
    for img, lab in FIXTURES.values():
        write_pair(root, img, lab)
    write_pair(
        root,
        "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "cityscapes/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
    )
    for c in ("fog", "rain", "snow"):
        write_pair(
            root,
            f"acdc/rgb_anon/{c}/val/GP1/GP1_frame_000001_rgb_anon.png",
            f"acdc/gt/{c}/val/GP1/GP1_frame_000001_gt_labelTrainIds.png",
        )
