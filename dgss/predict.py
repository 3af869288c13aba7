"""``dgss-predict ckpt_path=<file> input=<folder> output=<folder>``: segment a folder of images (or a video).

For every image (found recursively, the folder structure kept) it writes

- ``masks/<name>.png``: a palettised PNG whose pixel values are the trainIds and whose palette is the class
  colours, so it is both the prediction and its colourisation;
- ``overlays/<name>.jpg``: the image blended with the colourised mask (``alpha``);
- with ``label_ids=true`` also ``label_ids/<name>.png`` in Cityscapes labelIds (the evaluation server's format);
- with ``submission=acdc`` also the ACDC test server's upload (:func:`check_acdc`, :func:`write_acdc`): ``acdc/`` and
  ``acdc.zip``, one single-channel trainId PNG per test image named as the image, at its 1920×1080.

Images are resized to fit ``size`` first: ``auto`` (default) is the test size of the checkpoint's first target (the
Rein protocol: Cityscapes 1024×512, BDD100K 1280×720, ACDC 960×540), so the masks are the ones ``dgss-eval``
scores; a target's name takes that target's size; ``[long, short]`` any size; ``null`` native resolution (a large
photo then takes many windows: a warning says how many). They are predicted with the checkpoint's inference setting
(or ``inference=...``), and the logits resized back to the image's own size.

A video file (``input=clip.mp4``), or a folder of frames with ``as_video=true`` (name order, at ``fps``), gives
``<name>_mask.mp4`` and ``<name>_overlay.mp4`` at the source's frame rate, ``batch`` frames per forward
(:mod:`dgss.video`).
"""

from __future__ import annotations

import logging
import zipfile
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from dgss.cli import entry_point, run_cli
from dgss.config import check_types
from dgss.data.classes import ClassSet
from dgss.data.label_maps import CITYSCAPES_ID_TO_TRAIN
from dgss.data.transforms import TestPipeline
from dgss.errors import ConfigError
from dgss.io import atomic_path, check_output_folder
from dgss.models.inference import windows
from dgss.restore import load_method
from dgss.video import VIDEO_SUFFIXES, frame_folder, open_video, predict_video

log = logging.getLogger("dgss.predict")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def find_images(folder: Path) -> list[Path]:
    """Every image under ``folder`` (sorted), or ``folder`` itself when it is one image file."""
    if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
        return [folder]
    if not folder.is_dir():
        raise ConfigError(f"input={str(folder)!r} is not an image file, a video or a folder of images (images: "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))})")  # fmt: skip
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ConfigError(f"input={str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def _save(image: Image.Image, dst: Path, **kwargs) -> None:
    with atomic_path(dst) as tmp:
        image.save(tmp, format="JPEG" if dst.suffix == ".jpg" else "PNG", **kwargs)


def write_prediction(pred: np.ndarray, rgb: np.ndarray, classes: ClassSet, out: Path, rel: Path, alpha: float,
                     label_ids: bool) -> None:  # fmt: skip
    mask = Image.fromarray(pred.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: classes.num_classes] = np.asarray(classes.palette, dtype=np.uint8)
    mask.putpalette(palette.ravel().tolist())
    _save(mask, out / "masks" / rel.with_suffix(".png"))
    blend = (1 - alpha) * rgb.astype(np.float32) + alpha * classes.colorize(pred).astype(np.float32)
    _save(
        Image.fromarray(blend.round().astype(np.uint8)),
        out / "overlays" / rel.with_suffix(".jpg"),
        quality=90,
    )
    if label_ids:
        lut = np.zeros(256, dtype=np.uint8)  # unlabelled (0) for ignore
        for label_id, train_id in CITYSCAPES_ID_TO_TRAIN.items():
            lut[train_id] = label_id
        _save(Image.fromarray(lut[pred]), out / "label_ids" / rel.with_suffix(".png"))


ACDC_SIZE = (1920, 1080)  # (width, height) of every ACDC image
ACDC_SUFFIX = "_rgb_anon.png"  # the anonymised test images (the reference images are *_rgb_ref_anon.png)
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


def check_acdc(images: list[Path], root: Path, classes: ClassSet) -> None:
    """Refuse, before any prediction, what the ACDC test server cannot score: a model without the 19 Cityscapes
    classes (trainIds 0-18 are the server's id space), an image that is not an ACDC test image (named
    ``*_rgb_anon.png``, 1920×1080, not under a ``train`` / ``val`` folder), or two images with the same name (the
    upload is one flat folder)."""
    if classes.num_classes != len(CITYSCAPES_ID_TO_TRAIN):
        raise ConfigError(f"submission=acdc needs the 19 Cityscapes classes (ACDC is scored in their trainIds); "
                          f"this model has {classes.num_classes}")  # fmt: skip
    seen: dict[str, Path] = {}
    for path in images:
        rel = path.relative_to(root)
        where = f"input={str(root)!r} holds {rel}"
        if not path.name.endswith(ACDC_SUFFIX):
            raise ConfigError(f"submission=acdc: {where}, not an ACDC test image (*{ACDC_SUFFIX}); point input= at "
                              "acdc/rgb_anon/<condition>/test or a folder holding only those images")  # fmt: skip
        parts = path.absolute().parts[:-1]  # input= may name a val folder itself (acdc/rgb_anon/fog/val)
        parts = parts[len(parts) - parts[::-1].index("rgb_anon") :] if "rgb_anon" in parts else parts
        if {"train", "val", "train_ref", "val_ref"} & set(parts):
            raise ConfigError(f"submission=acdc: {where}, a train / val image; the server scores the test images "
                              "only: point input= at acdc/rgb_anon/<condition>/test")  # fmt: skip
        if path.name in seen:
            raise ConfigError(f"submission=acdc: {where} and {seen[path.name].relative_to(root)}, the same name "
                              "twice; the upload is one flat folder of unique names")  # fmt: skip
        seen[path.name] = path
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"cannot read {path} ({e}); ACDC's test images are PNGs from rgb_anon.zip"
            ) from None
        if size != ACDC_SIZE:
            raise ConfigError(f"submission=acdc: {where} at {size[0]}×{size[1]}; ACDC images are "
                              f"{ACDC_SIZE[0]}×{ACDC_SIZE[1]} and so must the predictions be: use the original test "
                              "images, not resized copies")  # fmt: skip


def write_acdc(pred: np.ndarray, out: Path, name: str) -> None:
    """One prediction in the ACDC server's form: ``acdc/<image name>``, a single-channel 8-bit PNG of trainIds
    (road = 0) at the image's 1920×1080."""
    _save(Image.fromarray(pred.astype(np.uint8)), out / "acdc" / name)  # 2-D uint8: mode L


def zip_acdc(out: Path, names: list[str]) -> Path:
    """``acdc.zip``: the predictions at the archive's root (PNGs are compressed already: stored, not deflated)."""
    dst = out / "acdc.zip"
    with atomic_path(dst) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(names):
            z.write(out / "acdc" / name, arcname=name)
    return dst


NATIVE_WINDOWS_WARN = 24  # windows per image above which a native-size prediction is announced as slow
OUTPUT_FOLDERS = ("masks", "overlays", "label_ids", "acdc")  # what dgss-predict writes under output=


def warn_native(path: Path, hw: tuple[int, int], inf, num_classes: int, asked: bool) -> None:
    """A photo predicted at its native size costs windows (slide) or one forward of that many pixels (whole):
    announce it above :data:`NATIVE_WINDOWS_WARN` crops' worth, whichever the mode."""
    passes = len(inf.scales) * (2 if inf.flip else 1)
    if inf.mode == "slide":
        n = len(windows(*hw, (inf.crop,) * 2, (inf.stride,) * 2)) * passes
        work = f"{n} windows of {inf.crop}"
    else:
        n = hw[0] * hw[1] / inf.crop**2 * passes
        work = f"one whole-image forward of {hw[1]}×{hw[0]} ({n:.0f}× a {inf.crop}² crop)"
    if n > NATIVE_WINDOWS_WARN:
        hint = ("size=auto predicts at the checkpoint's test size" if asked else "size=[long, short] (e.g. "
                "[2048, 1024]) predicts smaller")  # fmt: skip
        log.warning(f"dgss-predict: {path} is {hw[1]}×{hw[0]} at native size: {work} for this image (slow, and the "
                    f"logits alone take {num_classes * hw[0] * hw[1] * 4 / 2**30:.1f} GiB); {hint}")  # fmt: skip


def check_names(images: list[Path], root: Path) -> None:
    """Two images whose predictions would share a file (``street.png`` and ``street.jpg`` both give
    ``masks/street.png``): one line, before anything is predicted."""
    seen: dict[Path, Path] = {}
    for path in images:
        rel = path.relative_to(root)
        stem = rel.with_suffix("")
        if stem in seen:
            raise ConfigError(f"input={str(root)!r} holds {seen[stem].relative_to(root)} and {rel}, whose predictions "
                              f"would share the name masks/{stem}.png; rename one of them or predict them "
                              "separately")  # fmt: skip
        seen[stem] = path


def resolve_device(device: str) -> torch.device:
    """``device=`` (auto | cpu | cuda | cuda:<n>) as a device this machine has, or one line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:<n>") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(
            f"device={device!r}: this machine has {have} CUDA device(s); use device=auto or cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:<n>")
    return dev


def resolve_size(size, data: dict) -> tuple[tuple[int, int] | None, str]:
    """``size`` (auto | a target's name | [long, short] | None) -> (long, short) or None (native), and a phrase
    saying where it came from."""
    targets = dict(data.get("targets") or {})
    if size is None:
        return None, "native resolution (size=null)"
    if isinstance(size, str):
        if size != "auto" and size not in targets:
            raise ConfigError(f"size={size!r}: use auto, a target of the checkpoint ({', '.join(targets) or 'none'}), "
                              "[long, short] or null (native)")  # fmt: skip
        name = next(iter(targets), None) if size == "auto" else size
        spec = (targets.get(name) or {}) if name else {}
        found = spec.get("test_size") or (data.get("test_pipeline") or {}).get("size")
        if not found:
            return None, f"native resolution (the checkpoint's target {name} is evaluated at its native size)"
        return tuple(
            int(v) for v in found
        ), f"{found[0]}×{found[1]}, the test size of the checkpoint's target {name}"
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ConfigError(f"size={list(size)}: use [long, short] (positive pixels), auto or null")
    return (int(size[0]), int(size[1])), f"{size[0]}×{size[1]} (size=)"


@torch.no_grad()
def predict(cfg: DictConfig) -> dict:
    check_types(cfg)
    if cfg.submission not in (None, "acdc"):
        raise ConfigError(f"submission={cfg.submission!r}: use acdc (the ACDC test server) or null; for the "
                          "Cityscapes server use label_ids=true")  # fmt: skip
    src = Path(cfg.input).expanduser()
    video = src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES
    if (video or cfg.as_video) and (cfg.label_ids or cfg.submission):
        raise ConfigError("label_ids= and submission= write one file per image; for a video drop them (or give the "
                          "frames as a folder without as_video=true)")  # fmt: skip
    if video:
        source = open_video(src)
    else:
        images = find_images(src)
        root = src if src.is_dir() else src.parent  # an image file: its outputs are named after it
        check_names(images, root)
        source = frame_folder(src, images, cfg.fps) if cfg.as_video else None
    out = check_output_folder(cfg.output, "output", {"input": cfg.input}, writes=OUTPUT_FOLDERS)
    device = resolve_device(cfg.device)
    method, saved = load_method(cfg.ckpt_path, cfg.get("backbone_weights"), cfg.get("inference"))
    data = saved.get("data") or {}
    classes = ClassSet.build(data.get("num_classes"), data.get("class_names"), data.get("palette"))
    if source is not None:
        method.to(device).eval()
        size, where = resolve_size(cfg.size, data)
        log.info(f"dgss-predict: {source.name}, frames fitted into {where}")
        return predict_video(method, source, out, classes, size, cfg.alpha, cfg.batch, device, cfg.progress)
    if cfg.label_ids and classes.num_classes != len(CITYSCAPES_ID_TO_TRAIN):
        raise ConfigError(
            f"label_ids=true needs the 19 Cityscapes classes; this model has {classes.num_classes}"
        )
    if cfg.submission == "acdc":
        check_acdc(images, root, classes)
    method.to(device).eval()
    size, where = resolve_size(cfg.size, data)
    log.info(f"dgss-predict: images fitted into {where}")
    pipeline = TestPipeline(size)
    inf = method.inference_options
    bar = tqdm(images, desc="dgss-predict", disable=not cfg.progress)
    for path in bar:
        try:
            with Image.open(path) as im:
                rgb = np.array(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"cannot read {path} ({e}); remove it from input= or convert it to PNG / JPEG"
            ) from None
        bar.set_postfix_str(f"{path.name} {rgb.shape[1]}×{rgb.shape[0]}")
        if size is None:
            warn_native(path, rgb.shape[:2], inf, method.num_classes, cfg.size is None)
        x, _ = pipeline(torch.from_numpy(rgb).permute(2, 0, 1), torch.zeros(rgb.shape[:2]))
        scores = method.predict_logits(x[None].to(device), rgb.shape[:2])
        pred = scores[0].argmax(0).cpu().numpy()
        write_prediction(pred, rgb, classes, out, path.relative_to(root), cfg.alpha, cfg.label_ids)
        if cfg.submission == "acdc":
            write_acdc(pred, out, path.name)
    log.info(f"{len(images)} predictions in {out}")
    result = {"images": len(images), "output": str(out)}
    if cfg.submission == "acdc":
        result["submission"] = str(zip_acdc(out, [p.name for p in images]))
        per = Counter(next((c for c in ACDC_CONDITIONS if c in p.relative_to(root).parts[:-1]), "other")
                      for p in images)  # fmt: skip
        log.info(f"ACDC upload: {result['submission']} ({len(images)} trainId PNGs at 1920×1080: "
                 + ", ".join(f"{c} {n}" for c, n in sorted(per.items())) + ")")  # fmt: skip
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    run_cli(predict, cfg, "dgss-predict")


main = entry_point(hydra_main, "dgss-predict", "predict")

if __name__ == "__main__":
    main()
