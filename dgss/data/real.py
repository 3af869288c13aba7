"""The real DGSS data sets as image + trainId-label PNG pairs in the Rein on-disk layouts (https://github.com/w1oves/Rein ``configs/_base_/datasets``).

One root (``DGSS_DATA_ROOT`` or ``paths.data_dir``) holds every data set under its own folder. Labels are read as
converted trainId PNGs (0..18, 255 = ignore). Pairs are indexed once at construction: a missing root or split is a
one-line error naming the expected layout; at read time an unreadable file, an image / label size mismatch or a label
value outside {0..K−1, 255} is an error naming the file; with ``on_bad="skip"`` the loaders' wrapper
(``dgss.data.samples.Samples``) skips and counts it instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import loadmat

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """A split on disk: images matched by ``pattern`` under ``image_dir``; an image's label lies at the same relative
    folder under ``label_dir``, named by the image's base name (its name less ``image_suffix``) + ``label_suffix``."""

    image_dir: str
    pattern: str
    image_suffix: str
    label_dir: str
    label_suffix: str
    prepare: str = ""  # the command that produces the trainId labels
    subset: tuple[str, str] | None = None  # (a .mat file under the root, its key): the image numbers to keep

    def label_of(self, root: Path, image: Path) -> Path:
        rel = image.relative_to(root / self.image_dir)
        base = rel.name[: -len(self.image_suffix)]
        return root / self.label_dir / rel.parent / f"{base}{self.label_suffix}"

    def describe(self, root: Path) -> str:
        return f"{root}/{self.image_dir}/{self.pattern} with labels {root}/{self.label_dir}/**/*{self.label_suffix}"


def _convert(name: str) -> str:
    return f"dgss-convert {name} --root <data root>"


LAYOUTS: dict[str, dict[str, Layout]] = {
    "gta": {
        s: Layout(
            "gta/images",
            "*.png",
            ".png",
            "gta/labels",
            "_labelTrainIds.png",
            _convert("gta"),
            None if s == "all" else ("gta/split.mat", f"{s}Ids"),
        )
        for s in ("all", "train", "val", "test")  # Rein: all; the official split from the release's split.mat
    },  # fmt: skip
    "synthia": {
        "all": Layout(
            "synthia/RGB", "*.png", ".png", "synthia/GT/LABELS", "_labelTrainIds.png", _convert("synthia")
        )
    },
    "urbansyn": {  # SoMA's G+S+U settings; the release's ss/ labels (trainIds, 19 = unlabelled) converted
        "all": Layout(
            "urbansyn/rgb", "*.png", ".png", "urbansyn/labels", "_labelTrainIds.png", _convert("urbansyn")
        )
    },
    "cityscapes": {
        s: Layout(
            f"cityscapes/leftImg8bit/{s}",
            "*/*_leftImg8bit.png",
            "_leftImg8bit.png",
            f"cityscapes/gtFine/{s}",
            "_gtFine_labelTrainIds.png",
            _convert("cityscapes"),
        )
        for s in ("train", "val")
    },  # fmt: skip
    "bdd100k": {
        s: Layout(
            f"bdd100k/images/10k/{s}",
            "*.jpg",
            ".jpg",
            f"bdd100k/labels/sem_seg/masks/{s}",
            ".png",
            "nothing to convert: unpack bdd100k_images_10k.zip and bdd100k_sem_seg_labels_trainval.zip",
        )
        for s in ("train", "val")
    },  # fmt: skip
    "mapillary": {
        "train": Layout(
            "mapillary/training/images",
            "*.jpg",
            ".jpg",
            "mapillary/cityscapes_trainIdLabel/train/label",
            ".png",
            _convert("mapillary"),
        ),
        "val": Layout(
            "mapillary/half/val_img",
            "*.jpg",
            ".jpg",
            "mapillary/half/val_label",
            ".png",
            _convert("mapillary"),
        ),
    },  # fmt: skip
    "acdc": {
        f"{c}/{s}": Layout(
            "acdc/rgb_anon",
            f"{'*' if c == 'all' else c}/{s}/*/*_rgb_anon.png",
            "_rgb_anon.png",
            "acdc/gt",
            "_gt_labelTrainIds.png",
            "nothing to convert: unpack rgb_anon_trainvaltest.zip and gt_trainval.zip",
        )
        for c in ("fog", "night", "rain", "snow", "all")  # all: the four conditions as one set
        for s in ("train", "val")
    },  # fmt: skip
}


def read_array(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode) if mode == "RGB" else im)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"cannot read {path} ({reason}): unpack or convert it again, or leave bad files out with the data "
            "set's on_bad: skip"
        ) from None


class RealDataset:
    """One split of a real data set (a ``dgss.data.protocols.SegmentationData``).

    Args:
        dataset: gta | synthia | urbansyn | cityscapes | bdd100k | mapillary | acdc.
        split: ``all`` (GTAV, Synthia; GTAV also ``train`` / ``val`` / ``test`` from ``gta/split.mat``), ``train`` / ``val`` (Cityscapes, BDD100K, Mapillary) or ``<condition>/<split>``
            (ACDC: fog, night, rain, snow or all).
        root: the data root.
        num_classes: label values must lie in 0..num_classes−1 or be 255.
        on_bad: ``error`` (default) or ``skip``: a training sample is replaced by the next good one, an evaluation
            sample is left out; either way counted (``dgss.data.samples.Samples``), so an evaluation scores every
            readable image once and no image twice.
        test_size: (long, short) the image is resized to fit at evaluation (Rein protocol: Cityscapes 1024×512,
            BDD100K 1280×720); the label keeps its full resolution. ``None``: the DataModule's test pipeline.
    """

    def __init__(self, dataset: str, split: str, root: str | Path, num_classes: int = 19, on_bad: str = "error",
                 test_size: tuple[int, int] | None = None):  # fmt: skip
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
        self.num_classes, self.on_bad = num_classes, on_bad
        self.test_size = tuple(test_size) if test_size else None
        expected = self.layout.describe(self.root)
        if not self.root.is_dir():
            raise ConfigError(
                f"data root {self.root} does not exist; set DGSS_DATA_ROOT or paths.data_dir ({expected})"
            )
        images = sorted(self.root.glob(f"{self.layout.image_dir}/{self.layout.pattern}"))
        if not images:
            raise ConfigError(
                f"{dataset} split {split!r}: no images; expected {expected} (prepare: {self.layout.prepare})"
            )
        if self.layout.subset is not None:
            images = self._subset(images)
        self.pairs = [(img, self.layout.label_of(self.root, img)) for img in images]
        missing = [str(lab) for _, lab in self.pairs if not lab.is_file()]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(
                f"{dataset} split {split!r}: {len(missing)} of {len(images)} images have no trainId label, e.g. "
                f"{missing[0]}{more}; expected {expected} (prepare: {self.layout.prepare})"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 (3, H, W), label uint8 (H, W)), checked."""
        image, label = self.load_arrays(i)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(
            label
        )  # channels-last view: faster resize

    def load_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HWC uint8, label HW uint8), checked."""
        img_path, lab_path = self.pairs[i]
        image, label = read_array(img_path, "RGB"), read_array(lab_path, "L")
        if label.ndim != 2:
            raise ConfigError(f"{lab_path}: a trainId label must have one channel, got shape {label.shape}")
        if image.shape[:2] != label.shape:
            raise ConfigError(
                f"{img_path} is {image.shape[1]}x{image.shape[0]} but its label {lab_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        if label.max() >= self.num_classes:  # one max over the label; the full check only when it is needed
            outside = (label >= self.num_classes) & (label != IGNORE_INDEX)
            if outside.any():
                raise ConfigError(
                    f"{lab_path} has label values {np.unique(label[outside])[:5].tolist()} outside "
                    f"0..{self.num_classes - 1} and {IGNORE_INDEX}: not converted to trainIds?"
                )
        return image, label.astype(np.uint8)

    def name(self, i: int) -> str:
        return f"{self.dataset}/{self.pairs[i][0].name}"

    def _subset(self, images: list[Path]) -> list[Path]:
        file, key = self.layout.subset
        path = self.root / file
        if not path.is_file():
            raise ConfigError(f"{self.dataset} split {self.split!r} needs {path} (in the release's read_mapping.zip); "
                              "or use split=all")  # fmt: skip
        ids = {int(v) for v in np.asarray(loadmat(path)[key]).ravel()}
        kept = [p for p in images if p.stem.isdigit() and int(p.stem) in ids]
        if not kept:
            raise ConfigError(
                f"{self.dataset} split {self.split!r}: none of the images is listed in {path}[{key!r}]"
            )
        return kept

    def read_label(self, i: int) -> np.ndarray:
        """The trainId label alone (rare-class statistics)."""
        return read_array(self.pairs[i][1], "L")

    @property
    def cache_key(self) -> str:
        # names, sizes and modification times: labels re-converted in place give other counts, so another key
        files = "\n".join(f"{p[1].relative_to(self.root)}|{file_stamp(p[1])}" for p in self.pairs)
        return f"{self.dataset}/{self.split}/{len(self.pairs)}/{hashlib.sha256(files.encode()).hexdigest()}"


def file_stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"
