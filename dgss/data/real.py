"""The real DGSS data sets as image + trainId-label PNG pairs in the Rein on-disk layouts (spec data.md §2).

One root (``DGSS_DATA_ROOT`` or ``paths.data_dir``) holds every data set under its own folder. Labels are read as
converted trainId PNGs (0..18, 255 = ignore). Pairs are indexed once at construction: a missing root or split is a
one-line error naming the expected layout; at read time an unreadable file, an image / label size mismatch or a label
value outside {0..K−1, 255} is an error naming the file — or, with ``on_bad="skip"``, the sample is replaced by the
next good one and counted in ``skipped`` (never silently other data: the count is logged by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where a split's images are (a glob under the root) and how an image path gives its label path."""

    images: str
    image_suffix: str  # removed from the image file name to get the sample's base name
    labels: str  # label path pattern with {dir} (image's parent relative to the image root) and {base}


LAYOUTS: dict[str, dict[str, Layout]] = {
    "gta": {"all": Layout("gta/images/*.png", ".png", "gta/labels/{base}_labelTrainIds.png")},
    "synthia": {"all": Layout("synthia/RGB/*.png", ".png", "synthia/GT/LABELS/{base}_labelTrainIds.png")},
    "cityscapes": {
        s: Layout(
            f"cityscapes/leftImg8bit/{s}/*/*_leftImg8bit.png",
            "_leftImg8bit.png",
            f"cityscapes/gtFine/{s}/{{dir}}/{{base}}_gtFine_labelTrainIds.png",
        )
        for s in ("train", "val")
    },  # fmt: skip
    "bdd100k": {
        s: Layout(f"bdd100k/images/10k/{s}/*.jpg", ".jpg", f"bdd100k/labels/sem_seg/masks/{s}/{{base}}.png")
        for s in ("train", "val")
    },
    "mapillary": {
        "train": Layout(
            "mapillary/training/images/*.jpg",
            ".jpg",
            "mapillary/cityscapes_trainIdLabel/train/label/{base}.png",
        ),
        "val": Layout("mapillary/half/val_img/*.jpg", ".jpg", "mapillary/half/val_label/{base}.png"),
    },  # fmt: skip
    "acdc": {
        f"{c}/{s}": Layout(
            f"acdc/rgb_anon/{c}/{s}/*/*_rgb_anon.png",
            "_rgb_anon.png",
            f"acdc/gt/{c}/{s}/{{dir}}/{{base}}_gt_labelTrainIds.png",
        )
        for c in ("fog", "night", "rain", "snow")
        for s in ("train", "val")
    },  # fmt: skip
}


def _read(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode) if mode == "RGB" else im)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"cannot read {path}: {e}") from None


class RealDataset(torch.utils.data.Dataset):
    """One split of a real data set.

    Args:
        dataset: gta | synthia | cityscapes | bdd100k | mapillary | acdc.
        split: ``all`` (GTAV, Synthia), ``train`` / ``val`` (Cityscapes, BDD100K, Mapillary) or ``<condition>/<split>``
            (ACDC: fog, night, rain, snow).
        root: the data root.
        num_classes: label values must lie in 0..num_classes−1 or be 255.
        on_bad: ``error`` (default) or ``skip`` (count in ``skipped``, serve the next good sample).
        test_size: (long, short) the image is resized to fit at evaluation (Rein protocol: Cityscapes 1024×512,
            BDD100K 1280×720); the label keeps its full resolution. ``None``: the DataModule's test pipeline.
        transform: ``transform(image, label)`` on uint8 CHW / HW tensors.
    """

    def __init__(self, dataset: str, split: str, root: str | Path, num_classes: int = 19, on_bad: str = "error",
                 test_size: tuple[int, int] | None = None, transform=None):  # fmt: skip
        if dataset not in LAYOUTS:
            raise ConfigError(f"dataset={dataset!r} is not known; choose one of {', '.join(LAYOUTS)}")
        if split not in LAYOUTS[dataset]:
            raise ConfigError(
                f"{dataset} has no split {split!r}; choose one of {', '.join(LAYOUTS[dataset])}"
            )
        if on_bad not in ("error", "skip"):
            raise ConfigError(f"on_bad={on_bad!r}; choose error or skip")
        self.dataset, self.split, self.root = dataset, split, Path(root).expanduser()
        self.layout = LAYOUTS[dataset][split]
        self.num_classes, self.on_bad, self.transform = num_classes, on_bad, transform
        self.test_size = tuple(test_size) if test_size else None
        self.skipped = 0
        expected = f"{self.root}/{self.layout.images} with labels {self.root}/{self.layout.labels}"
        if not self.root.is_dir():
            raise ConfigError(
                f"data root {self.root} does not exist; set DGSS_DATA_ROOT or paths.data_dir ({expected})"
            )
        images = sorted(self.root.glob(self.layout.images))
        if not images:
            raise ConfigError(f"{dataset} split {split!r}: no images; expected {expected}")
        self.pairs = [(img, self._label_path(img)) for img in images]
        missing = [str(lab) for _, lab in self.pairs if not lab.is_file()]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(
                f"{dataset} split {split!r}: {len(missing)} of {len(images)} images have no trainId label, e.g. "
                f"{missing[0]}{more}; expected {expected}"
            )

    def _label_path(self, image: Path) -> Path:
        base = image.name[: -len(self.layout.image_suffix)]
        return self.root / self.layout.labels.format(dir=image.parent.name, base=base)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HWC uint8, label HW uint8), checked."""
        img_path, lab_path = self.pairs[i]
        image, label = _read(img_path, "RGB"), _read(lab_path, "L")
        if label.ndim != 2:
            raise ConfigError(f"{lab_path}: a trainId label must have one channel, got shape {label.shape}")
        if image.shape[:2] != label.shape:
            raise ConfigError(
                f"{img_path} is {image.shape[1]}x{image.shape[0]} but its label {lab_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes), IGNORE_INDEX])
        if bad.size:
            raise ConfigError(
                f"{lab_path} has label values {bad[:5].tolist()} outside 0..{self.num_classes - 1} and "
                f"{IGNORE_INDEX}: not converted to trainIds?"
            )
        return image, label.astype(np.uint8)

    def __getitem__(self, i: int) -> dict:
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                image, label = self.load(j)
                break
            except ConfigError:
                if self.on_bad == "error":
                    raise
                self.skipped += 1
        else:
            raise ConfigError(f"{self.dataset} split {self.split!r}: no readable sample (on_bad=skip)")
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        lab = torch.from_numpy(label)
        if self.transform is not None:
            img, lab = self.transform(img, lab)
        return {"image": img, "label": lab, "name": f"{self.dataset}/{self.pairs[j][0].name}"}
