"""``dgss-predict ckpt_path=<file> input=<folder> output=<folder>``: segment a folder of images.

For every image (found recursively, the folder structure kept) it writes

- ``masks/<name>.png``: a palettised PNG whose pixel values are the trainIds and whose palette is the class
  colours, so it is both the prediction and its colourisation;
- ``overlays/<name>.jpg``: the image blended with the colourised mask (``alpha``);
- with ``label_ids=true`` also ``label_ids/<name>.png`` in Cityscapes labelIds (the evaluation server's format).

Images are resized to fit ``size`` first: ``auto`` (default) is the test size of the checkpoint's first target (the
Rein protocol: Cityscapes 1024×512, BDD100K 1280×720, ACDC 960×540), so the masks are the ones ``dgss-eval``
scores; a target's name takes that target's size; ``[long, short]`` any size; ``null`` native resolution (a large
photo then takes many windows: a warning says how many). They are predicted with the checkpoint's inference setting
(or ``inference=...``), and the logits resized back to the image's own size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from dgss.checkpoint import load_method
from dgss.cli import entry_point, run_cli
from dgss.config import check_types
from dgss.data.classes import ClassSet
from dgss.data.label_maps import CITYSCAPES_ID_TO_TRAIN
from dgss.data.transforms import TestPipeline
from dgss.errors import ConfigError
from dgss.io import atomic_path
from dgss.models.inference import windows

log = logging.getLogger("dgss.predict")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"input={str(folder)!r} is not a folder of images")
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


NATIVE_WINDOWS_WARN = 24  # windows per image above which a native-size prediction is announced as slow


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
    if len(size) != 2:
        raise ConfigError(f"size={list(size)}: use [long, short], auto or null")
    return (int(size[0]), int(size[1])), f"{size[0]}×{size[1]} (size=)"


@torch.no_grad()
def predict(cfg: DictConfig) -> dict:
    check_types(cfg)
    images = find_images(Path(cfg.input).expanduser())
    method, saved = load_method(cfg.ckpt_path, cfg.get("backbone_weights"), cfg.get("inference"))
    data = saved.get("data") or {}
    classes = ClassSet.build(data.get("num_classes"), data.get("class_names"), data.get("palette"))
    if cfg.label_ids and classes.num_classes != len(CITYSCAPES_ID_TO_TRAIN):
        raise ConfigError(
            f"label_ids=true needs the 19 Cityscapes classes; this model has {classes.num_classes}"
        )
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    method.to(device).eval()
    size, where = resolve_size(cfg.size, data)
    log.info(f"dgss-predict: images fitted into {where}")
    pipeline = TestPipeline(size)
    out, root = Path(cfg.output).expanduser(), Path(cfg.input).expanduser()
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
        if size is None and inf.mode == "slide":
            n = len(windows(*rgb.shape[:2], (inf.crop,) * 2, (inf.stride,) * 2)) * len(inf.scales) * (
                2 if inf.flip else 1)  # fmt: skip
            if n > NATIVE_WINDOWS_WARN:
                log.warning(f"dgss-predict: {path} is {rgb.shape[1]}×{rgb.shape[0]} at native size: {n} windows of "
                            f"{inf.crop} for this image (slow, and the logits alone take "
                            f"{method.num_classes * rgb.shape[0] * rgb.shape[1] * 4 / 2**30:.1f} GiB); size=auto "
                            "predicts at the checkpoint's test size")  # fmt: skip
        x, _ = pipeline(torch.from_numpy(rgb).permute(2, 0, 1), torch.zeros(rgb.shape[:2]))
        scores = method.predict_logits(x[None].to(device), rgb.shape[:2])
        write_prediction(scores[0].argmax(0).cpu().numpy(), rgb, classes, out, path.relative_to(root), cfg.alpha,
                         cfg.label_ids)  # fmt: skip
    log.info(f"{len(images)} predictions in {out}")
    return {"images": len(images), "output": str(out)}


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    run_cli(predict, cfg, "dgss-predict")


main = entry_point(hydra_main, "dgss-predict", "predict")

if __name__ == "__main__":
    main()
