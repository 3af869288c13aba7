"""Convert the released DGSS data sets to the trainId PNGs that ``dgss.data.real`` reads (the layouts of https://github.com/w1oves/Rein ``tools/convert_datasets``).

    dgss-convert {gta,synthia,urbansyn,cityscapes,mapillary} [--root DIR] [--workers N]
    dgss-convert check [--root DIR]          # counts, sizes, label values per split

Every converter writes next to the release, in the Rein layouts:

- ``gta``: ``gta/labels/<n>.png`` (Cityscapes labelIds, palettised) → ``gta/labels/<n>_labelTrainIds.png``.
- ``synthia``: ``synthia/GT/LABELS/<n>.png`` (16-bit, class id = first channel) → ``<n>_labelTrainIds.png``.
- ``urbansyn``: ``urbansyn/ss/<n>.png`` (trainIds 0..18, 19 = unlabelled; ``ss_<k>.png`` beside ``rgb/rgb_<k>.png``
  as released, or the image's own name) → ``urbansyn/labels/<image name>_labelTrainIds.png`` with 19 (and anything
  above 18) → 255, as SoMA's ``tools/convert_datasets/urbansyn.py`` does in place (here the release is left as is).
- ``cityscapes``: ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` → ``*_gtFine_labelTrainIds.png`` (the same
  map cityscapesscripts' ``createTrainIdLabelImgs`` applies when it rasterises the polygons).
- ``mapillary``: ``{training,validation}/v1.2/labels/<n>.png`` → ``cityscapes_trainIdLabel/{train,val}/label/<n>.png``;
  then the validation images halved (bicubic) → ``half/val_img/<n>.jpg`` and their labels halved (nearest) →
  ``half/val_label/<n>.png``.

BDD100K and ACDC ship trainId labels: unpack them in place (README). A file is converted when its output is missing
or older than its input, so a rerun is a no-op and an interrupted run resumes; outputs are written to a hidden
temporary name and renamed when complete, so an interruption never leaves a half-written file under a real name
(stale temporaries are removed at the next start). ``--workers`` processes convert in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.io import ImageReadMode, decode_png, read_file
from tqdm import tqdm

from dgss.data.folder import FolderDataset, read_classes
from dgss.data.label_maps import (
    CITYSCAPES_ID_TO_TRAIN,
    MAPILLARY_V12_TO_TRAIN,
    SYNTHIA_ID_TO_TRAIN,
    lookup_table,
    to_train_ids,
)
from dgss.data.real import LAYOUTS, RealDataset
from dgss.errors import ConfigError
from dgss.io import atomic_path, remove_cut_off

TRAIN_SUFFIX = "_labelTrainIds.png"
CITYSCAPES_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAIN)
SYNTHIA_TABLE = lookup_table(SYNTHIA_ID_TO_TRAIN, 65536)
URBANSYN_TABLE = lookup_table({i: i for i in range(19)})  # trainIds kept; 19 (unlabelled) and above -> 255
MAPILLARY_TABLE = lookup_table(MAPILLARY_V12_TO_TRAIN)


class ConvertError(Exception):
    """A problem with the release on disk; printed as one line."""


@dataclass(frozen=True)
class Task:
    """Make ``dst`` from ``src`` with ``kind`` (a key of ``WORK``)."""

    kind: str
    src: Path
    dst: Path

    def done(self) -> bool:
        """``dst`` was made from ``src`` as it is now: ``run_task`` stamps ``dst`` with ``src``'s modification time,
        so any replaced ``src`` (newer, or older as unzip and tar restore it) differs and is converted again."""
        return self.dst.is_file() and self.dst.stat().st_mtime_ns == self.src.stat().st_mtime_ns


# ------------------------------------------------------------------------------------------------- file work
def _save(array: np.ndarray, dst: Path, **kwargs) -> None:
    """Write atomically: a hidden temporary in the same folder, renamed when complete."""
    with atomic_path(dst) as tmp:
        Image.fromarray(array).save(tmp, format="JPEG" if dst.suffix == ".jpg" else "PNG", **kwargs)


def _index_label(path: Path) -> np.ndarray:
    """An 8-bit id label (palettised or grey) as its indices, never converted to colours."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ConvertError(f"{path}: expected a palettised or grey id PNG, got mode {im.mode}")
        return np.array(im)


def _synthia_ids(path: Path) -> np.ndarray:
    """Synthia's 16-bit multi-channel label, read unchanged: the class id is the first channel in file order."""
    try:
        label = decode_png(read_file(str(path)), ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    return label[0].numpy().astype(np.int64)


def _halve(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(int(v * 0.5 + 0.5), 1) for v in size)


def _halve_image(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        _save(np.array(im.convert("RGB").resize(_halve(im.size), Image.BICUBIC)), dst, quality=95)


def _halve_label(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        _save(np.array(im.resize(_halve(im.size), Image.NEAREST)), dst)


WORK: dict[str, Callable[[Path, Path], None]] = {
    "cityscapes_ids": lambda s, d: _save(to_train_ids(_index_label(s), CITYSCAPES_TABLE), d),
    "synthia_ids": lambda s, d: _save(to_train_ids(_synthia_ids(s), SYNTHIA_TABLE), d),
    "mapillary_ids": lambda s, d: _save(to_train_ids(_index_label(s), MAPILLARY_TABLE), d),
    "urbansyn_ids": lambda s, d: _save(to_train_ids(_index_label(s), URBANSYN_TABLE), d),
    "halve_image": _halve_image,
    "halve_label": _halve_label,
}


def run_task(task: Task) -> str:
    stamp = (
        task.src.stat().st_mtime_ns
    )  # before reading: a src replaced meanwhile is converted again next time
    WORK[task.kind](task.src, task.dst)
    os.utime(task.dst, ns=(time.time_ns(), stamp))
    return str(task.dst)


# ---------------------------------------------------------------------------------------------- the plans
def _need(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist: {what}")
    return path


def _raw(folder: Path, pattern: str, exclude: str = TRAIN_SUFFIX) -> list[Path]:
    return sorted(
        p for p in folder.glob(pattern) if not p.name.endswith(exclude) and not p.name.startswith(".")
    )


def plan_gta(root: Path) -> Iterator[tuple[str, list[Task]]]:
    labels = _need(root / "gta/labels", "unpack the GTAV labels (01_labels.zip ...) into gta/labels/")
    yield (
        f"{labels}/*.png",
        [Task("cityscapes_ids", p, p.with_name(p.stem + TRAIN_SUFFIX)) for p in _raw(labels, "*.png")],
    )


def plan_synthia(root: Path) -> Iterator[tuple[str, list[Task]]]:
    labels = _need(
        root / "synthia/GT/LABELS", "unpack RAND_CITYSCAPES so that synthia/RGB and synthia/GT/LABELS exist"
    )
    yield (
        f"{labels}/*.png",
        [Task("synthia_ids", p, p.with_name(p.stem + TRAIN_SUFFIX)) for p in _raw(labels, "*.png")],
    )


def plan_urbansyn(root: Path) -> Iterator[tuple[str, list[Task]]]:
    rgb = _need(root / "urbansyn/rgb", "unpack UrbanSyn so that urbansyn/rgb and urbansyn/ss exist")
    ss = _need(root / "urbansyn/ss", "unpack UrbanSyn's semantic labels into urbansyn/ss/")
    tasks, missing = [], []
    for image in _raw(rgb, "*.png"):
        src = next(
            (p for p in (ss / image.name, ss / image.name.replace("rgb_", "ss_", 1)) if p.is_file()), None
        )
        if src is None:
            missing.append(image.name)
            continue
        tasks.append(Task("urbansyn_ids", src, root / "urbansyn/labels" / (image.stem + TRAIN_SUFFIX)))
    if missing:
        raise ConvertError(f"{len(missing)} UrbanSyn images have no label in {ss} (e.g. {missing[0]}: expected "
                           f"{missing[0]} or {missing[0].replace('rgb_', 'ss_', 1)})")  # fmt: skip
    yield f"{ss}/*.png", tasks


def plan_cityscapes(root: Path) -> Iterator[tuple[str, list[Task]]]:
    gt = _need(root / "cityscapes/gtFine", "unpack gtFine_trainvaltest.zip into cityscapes/")
    raw = sorted(gt.glob("*/*/*_gtFine_labelIds.png"))
    yield (
        f"{gt}/*/*/*_gtFine_labelIds.png",
        [Task("cityscapes_ids", p, p.with_name(p.name.replace("_labelIds.png", TRAIN_SUFFIX))) for p in raw],
    )


def plan_mapillary(root: Path) -> Iterator[tuple[str, list[Task]]]:
    base = _need(root / "mapillary", "unpack the Mapillary Vistas release into mapillary/")
    config = base / "config_v1.2.json"
    if config.is_file():
        n = len(json.loads(config.read_text())["labels"])
        if n != len(MAPILLARY_V12_TO_TRAIN):
            raise ConvertError(
                f"{config} lists {n} labels, v1.2 has {len(MAPILLARY_V12_TO_TRAIN)}: not a v1.2 config"
            )
    for split, out in (("training", "train"), ("validation", "val")):
        labels = _need(
            base / split / "v1.2/labels",
            f"expected the v1.2 labels of {split} under {base / split}/v1.2/labels",
        )
        dst = base / "cityscapes_trainIdLabel" / out / "label"
        yield f"{labels}/*.png", [Task("mapillary_ids", p, dst / p.name) for p in _raw(labels, "*.png")]
    images = _need(
        base / "validation/images", f"expected the validation images under {base}/validation/images"
    )
    yield (
        f"{images}/*.jpg",
        [Task("halve_image", p, base / "half/val_img" / p.name) for p in _raw(images, "*.jpg")]
        + [
            Task("halve_label", p, base / "half/val_label" / p.name)
            for p in _raw(base / "cityscapes_trainIdLabel/val/label", "*.png")
        ],
    )


PLANS = {"gta": plan_gta, "synthia": plan_synthia, "urbansyn": plan_urbansyn, "cityscapes": plan_cityscapes,
         "mapillary": plan_mapillary}  # fmt: skip


def _clean_stale(tasks: list[Task]) -> int:
    return sum(len(remove_cut_off(folder)) for folder in {t.dst.parent for t in tasks})


def convert(dataset: str, root: str | Path, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Convert one data set under ``root``; returns counts of files converted and already up to date."""
    if dataset not in PLANS:
        raise ConvertError(f"unknown data set {dataset!r}; choose one of {', '.join(PLANS)}")
    root = Path(root).expanduser()
    counts = {"converted": 0, "up_to_date": 0, "stale_temporaries_removed": 0}
    for inputs, step in PLANS[dataset](root):  # steps run in order: halving reads the converted labels
        if not step:
            raise ConvertError(f"{dataset}: no input files {inputs}")
        counts["stale_temporaries_removed"] += _clean_stale(step)
        todo = [t for t in step if not t.done()]
        counts["up_to_date"] += len(step) - len(todo)
        bar = tqdm(
            total=len(todo), desc=f"{dataset}: {todo[0].kind if todo else 'up to date'}", disable=not progress
        )
        if workers > 1 and len(todo) > 1:
            with get_context().Pool(workers) as pool:
                for _ in pool.imap_unordered(run_task, todo, chunksize=8):
                    counts["converted"] += 1
                    bar.update()
        else:
            for t in todo:
                run_task(t)
                counts["converted"] += 1
                bar.update()
        bar.close()
    return counts


# ---------------------------------------------------------------------------------------------------- check
def check_split(ds, row: dict, samples: int | None = None, shown: int = 10) -> dict:
    """One split's row: image count, image sizes, label values seen (trainIds), every bad pair counted and the first
    ``shown`` quoted. ``samples``: read only that many pairs."""
    values, sizes, bad = set(), set(), []
    for i in range(len(ds) if samples is None else min(samples, len(ds))):
        try:
            image, label = ds.load_arrays(i)
        except ConfigError as e:
            bad.append(str(e))
            continue
        values |= set(np.unique(label).tolist())
        sizes.add(f"{image.shape[1]}x{image.shape[0]}")
    row.update(images=len(ds), sizes=sorted(sizes), label_values=sorted(values))
    if bad:
        row.update(error=f"{len(bad)} bad pairs", bad=bad[:shown])
    return row


def check_folder(root: Path, samples: int | None = None, shown: int = 10) -> list[dict]:
    """A folder data set (``classes.yaml``, ``images/<split>``, ``labels/<split>``): every split, its labels read
    through the class file's map (so label values are trainIds, 255 ignored)."""
    try:
        read_classes(root)
    except ConfigError as e:
        return [{"dataset": root.name, "split": "classes.yaml", "error": str(e)}]
    splits = (
        sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
        if (root / "images").is_dir()
        else []
    )
    if not splits:
        return [{"dataset": root.name, "split": "-", "error": f"{root}/images/ holds no split folders"}]
    rows = []
    for split in splits:
        row = {"dataset": root.name, "split": split}
        try:
            ds = FolderDataset(root, split)
        except ConfigError as e:
            rows.append({**row, "error": str(e)})
            continue
        rows.append(check_split(ds, row, samples, shown))
    return rows


def check(root: str | Path, samples: int | None = None, shown: int = 10) -> list[dict]:
    """Every split present under ``root``: image count, image sizes, label values seen, and every bad pair (an
    unreadable file, a size mismatch, label values outside the classes) — all of them, the first ``shown`` with
    their message. ``samples``: read only that many pairs per split. A root with a ``classes.yaml`` is a folder data
    set (``data=folder``: :func:`check_folder`). A missing root, or one that holds none of the data sets, is a
    :class:`ConvertError`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConvertError(
            f"data root {root} does not exist; set DGSS_DATA_ROOT or --root (layouts: README, Real data)"
        )
    if (root / "classes.yaml").is_file():
        return check_folder(root, samples, shown)
    folders = sorted(
        {layout.image_dir.split("/")[0] for splits in LAYOUTS.values() for layout in splits.values()}
    )
    if not any((root / f).is_dir() for f in folders):
        raise ConvertError(f"{root} holds none of the data sets: expected one of {', '.join(f + '/' for f in folders)} "
                           "or a classes.yaml (your own data; docs/custom-data.md) (layouts: README, Real data)")  # fmt: skip
    rows = []
    for dataset, splits in LAYOUTS.items():
        for split, layout in splits.items():
            absent = not (root / layout.image_dir.split("/")[0]).is_dir()
            if (
                absent
                or split.startswith("all/")
                or (layout.subset and not (root / layout.subset[0]).is_file())
            ):
                continue
            row = {"dataset": dataset, "split": split}
            try:
                ds = RealDataset(dataset, split, root)
            except ConfigError as e:
                rows.append({**row, "error": str(e)})
                continue
            rows.append(check_split(ds, row, samples, shown))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgss-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=[*PLANS, "check"])
    parser.add_argument(
        "--root", default=os.environ.get("DGSS_DATA_ROOT", "data"), help="data root (DGSS_DATA_ROOT)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument(
        "--samples", type=int, default=None, help="check: read only this many pairs per split"
    )
    args = parser.parse_args(argv)
    try:
        if args.dataset == "check":
            rows = check(args.root, args.samples)
            for r in rows:
                print(json.dumps(r))
            failed = [f"{r['dataset']} {r['split']}: {r['error']}" for r in rows if "error" in r]
            if failed:
                print(
                    f"error: {len(failed)} of {len(rows)} splits have problems: {'; '.join(failed)}",
                    file=sys.stderr,
                )
            return 1 if failed else 0
        print(json.dumps(convert(args.dataset, args.root, args.workers)))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
