"""Your own data (``data=folder``): any folder of images and label PNGs with a ``classes.yaml``, read through the same
pipelines, rare-class sampling and evaluation as the real data sets. How-to: docs/custom-data.md.

Layout (``<split>`` is ``train``, ``val`` or any name; sub-folders are kept, so cities or sequences may nest)::

    <root>/classes.yaml
    <root>/images/<split>/**/<name>.{png,jpg,jpeg,bmp,tif,tiff,webp}
    <root>/labels/<split>/**/<name>.png          # one channel, the same size as its image

``classes.yaml``::

    names: [road, person, car]                  # trainId i = names[i]; at most 254 classes
    colors: [[128, 64, 128], [220, 20, 60], [0, 0, 142]]   # optional; default: fixed pseudo-random colours
    ignore_index: 255                           # optional: the label value not scored (dgss stores it as 255)
    id_to_train: {7: 0, 24: 1, 26: 2}           # optional: label value -> trainId, every other value ignored;
                                                # absent: the labels hold trainIds already

The file is data, not code: read with ``yaml.safe_load``, every field checked, one line naming the field otherwise.
The class count, names and colours flow from it into the config (``data.num_classes`` and so the head, the IoU
tables, dgss-predict's colours) through the ``folder_classes`` resolver, and so into every checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from dgss.data.classes import IGNORE_INDEX, ClassSet
from dgss.data.real import file_stamp, read_array
from dgss.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_CLASSES_FILE = 1 << 20  # a class list is a few kB; a larger file is not one


@dataclass(frozen=True)
class FolderClasses:
    """A folder's label space: names, colours, and the 256-entry table from label values to trainIds (255 =
    ignored)."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    lut: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def field(self, key: str):
        """What the config takes (``${folder_classes:<root>,<key>}``): num_classes, names or palette."""
        if key == "num_classes":
            return self.num_classes
        if key == "names":
            return list(self.names)
        if key == "palette":
            return [list(c) for c in self.palette]
        raise ConfigError(f"folder_classes: no field {key!r}; use num_classes, names or palette")


def _int(v, where: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ConfigError(f"{where}={v!r}: an integer in {low}..{high}")
    return v


def read_classes(root: str | Path) -> FolderClasses:
    """``<root>/classes.yaml`` checked field by field (one line naming the file and the field otherwise)."""
    path = Path(root).expanduser() / "classes.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: a folder data set names its classes there (docs/custom-data.md)"
        )
    if path.stat().st_size > MAX_CLASSES_FILE:
        raise ConfigError(f"{path} is {path.stat().st_size:,} bytes: not a class list")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must be a mapping with names: [...] (and optionally colors, ignore_index, "
                          "id_to_train)")  # fmt: skip
    unknown = sorted(set(doc) - {"names", "colors", "ignore_index", "id_to_train"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown field {unknown[0]!r}; the fields are names, colors, ignore_index, id_to_train"
        )
    names = doc.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: names must be a non-empty list of class names")
    if len(names) >= IGNORE_INDEX:
        raise ConfigError(f"{path}: {len(names)} names; at most {IGNORE_INDEX - 1} classes (255 is ignore)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{path}: the class name {dup!r} appears twice")
    colors = doc.get("colors")
    if colors is not None:
        if not isinstance(colors, list) or len(colors) != len(names):
            raise ConfigError(f"{path}: colors must list one [r, g, b] per name ({len(names)})")
        for i, c in enumerate(colors):
            if not isinstance(c, list) or len(c) != 3:
                raise ConfigError(f"{path}: colors[{i}]={c!r}: give [r, g, b]")
            for v in c:
                _int(v, f"{path}: colors[{i}]", 0, 255)
    palette = ClassSet.build(len(names), names, colors).palette
    ignore = _int(doc.get("ignore_index", IGNORE_INDEX), f"{path}: ignore_index", 0, 255)
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    mapping = doc.get("id_to_train")
    if mapping is None:
        lut[: len(names)] = np.arange(len(names))
    elif not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{path}: id_to_train must map label values to trainIds, e.g. {{7: 0, 26: 1}}")
    else:
        for k, v in mapping.items():
            value = _int(k, f"{path}: id_to_train key", 0, 255)
            lut[value] = _int(v, f"{path}: id_to_train[{k}]", 0, len(names) - 1) if v != IGNORE_INDEX else v
    lut[ignore] = IGNORE_INDEX
    return FolderClasses(tuple(names), palette, tuple(int(v) for v in lut))


def folder_classes(root: str, key: str):
    """The ``folder_classes`` resolver: ``${folder_classes:${folder.root},num_classes}``."""
    return read_classes(root).field(key)


class FolderDataset:
    """One split of a folder data set (a ``dgss.data.protocols.SegmentationData``): image / label pairs matched by
    relative path and name, labels mapped to trainIds through ``classes.yaml``.

    Args:
        root: the folder holding ``classes.yaml``, ``images/`` and ``labels/``.
        split: the sub-folder of both (``train``, ``val``, ...).
        on_bad: ``error`` or ``skip`` (as :class:`~dgss.data.real.RealDataset`).
        test_size: (long, short) the images are resized to fit at evaluation; ``None``: the test pipeline's.
        name: what logs and the IoU tables call it (default: the folder's name).
        class_names: the classes the config (or a checkpoint's config) was made with: ``classes.yaml`` must still
            name them, in order (a class file edited after training would score other classes under old names).
    """

    def __init__(self, root: str | Path, split: str, on_bad: str = "error",
                 test_size: tuple[int, int] | None = None, name: str | None = None,
                 class_names: list[str] | None = None):  # fmt: skip
        if on_bad not in ("error", "skip"):
            raise ConfigError(f"on_bad={on_bad!r}; choose error or skip")
        self.root, self.split, self.on_bad = Path(root).expanduser(), split, on_bad
        self.dataset = name or self.root.name
        self.test_size = tuple(test_size) if test_size else None
        self.classes = read_classes(self.root)
        self.num_classes = self.classes.num_classes
        if class_names is not None and tuple(class_names) != self.classes.names:
            raise ConfigError(f"{self.root}/classes.yaml names {list(self.classes.names)}, but the config (or the "
                              f"checkpoint) was made with {list(class_names)}; restore the class file or retrain")  # fmt: skip
        self._lut = np.asarray(self.classes.lut, dtype=np.uint8)
        image_dir, label_dir = self.root / "images" / split, self.root / "labels" / split
        expected = f"{image_dir}/**/<name>.png|jpg with labels {label_dir}/**/<name>.png"
        if not image_dir.is_dir():
            raise ConfigError(f"folder data set {self.root}: no split {split!r} ({expected})")
        images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ConfigError(f"folder data set {self.root} split {split!r}: no images ({expected})")
        self.pairs = [(p, (label_dir / p.relative_to(image_dir)).with_suffix(".png")) for p in images]
        missing = [str(lab) for _, lab in self.pairs if not lab.is_file()]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"folder data set {self.root} split {split!r}: {len(missing)} of {len(images)} images "
                              f"have no label, e.g. {missing[0]}{more} ({expected})")  # fmt: skip

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load_arrays(i)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label)

    def load_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HWC uint8, trainId label HW uint8), checked."""
        img_path, lab_path = self.pairs[i]
        image, label = read_array(img_path, "RGB"), self.read_label(i)
        if image.shape[:2] != label.shape:
            raise ConfigError(f"{img_path} is {image.shape[1]}x{image.shape[0]} but its label {lab_path} is "
                              f"{label.shape[1]}x{label.shape[0]}")  # fmt: skip
        return image, label

    def read_label(self, i: int) -> np.ndarray:
        """The label mapped to trainIds (rare-class statistics read this alone)."""
        path = self.pairs[i][1]
        raw = read_array(path, "L")
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise ConfigError(f"{path}: a label must be one 8-bit channel (a palettised or grey PNG), got "
                              f"{raw.dtype} of shape {raw.shape}")  # fmt: skip
        return self._lut[raw]

    def name(self, i: int) -> str:
        return f"{self.dataset}/{self.pairs[i][0].name}"

    @property
    def cache_key(self) -> str:
        files = "\n".join(f"{p[1].relative_to(self.root)}|{file_stamp(p[1])}" for p in self.pairs)
        table = hashlib.sha256(bytes(self._lut)).hexdigest()[:12]
        return f"folder/{self.root}/{self.split}/{len(self.pairs)}/{table}/{hashlib.sha256(files.encode()).hexdigest()}"
